"""A run's predicted spend before it starts (``embed-factory plan``, ``run --dry-run``): pure arithmetic.

Two sources, history first:

- **history**: the generate-scope ledger rows of earlier runs with the same model and, per task type, the
  same prompt version. Per parsed example: requests, prompt and completion tokens, and endpoint-seconds
  (wall seconds x the endpoints that run had); the wall time for the configured endpoints is
  endpoint-seconds / endpoints. Linear in the examples: a run's fixed overhead (start-up, the first
  brainstorm round) is spread over its examples, so a plan much larger than its history overestimates.
- **pilot**: a few real requests per task type (``tasks/generation/pilot.py``), sent at once: tokens per
  request, the share that parsed, instructions per brainstorm request, and the pilot's tokens per second
  (at the pilot's concurrency, so a rough wall time).

GPU-hours and cost follow the ledger's rules (``ground/costs.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ground.settings import CostSettings


@dataclass
class TypePlan:
    task_type: str
    examples: int
    requests: float
    prompt_tokens: float
    completion_tokens: float
    wall_s: float  # this type's share of the run's wall time
    gpu_hours: float
    cost_usd: float

    @property
    def tokens(self) -> float:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Plan:
    source: str  # "history: run-a, run-b" or "pilot: 12 requests"
    model: str
    endpoints: int
    by_type: list[TypePlan]
    accepted: float | None = None  # predicted rows reaching the export (from earlier clean runs), if known

    def _sum(self, name: str) -> float:
        return sum(getattr(t, name) for t in self.by_type)

    @property
    def examples(self) -> int:
        return int(self._sum("examples"))

    @property
    def requests(self) -> float:
        return self._sum("requests")

    @property
    def tokens(self) -> float:
        return self._sum("tokens")

    @property
    def wall_s(self) -> float:
        return self._sum("wall_s")

    @property
    def gpu_hours(self) -> float:
        return self._sum("gpu_hours")

    @property
    def cost_usd(self) -> float:
        return self._sum("cost_usd")

    @property
    def cost_per_1k_accepted(self) -> float | None:
        return self.cost_usd / self.accepted * 1000 if self.accepted else None

    def predicted_columns(self) -> dict[str, dict[str, Any]]:
        """Per task type, the ``predicted_*`` ledger columns."""
        return {
            t.task_type: {
                "plan_source": self.source,
                "predicted_requests": t.requests,
                "predicted_tokens": t.tokens,
                "predicted_wall_s": t.wall_s,
                "predicted_gpu_hours": t.gpu_hours,
                "predicted_cost_usd": t.cost_usd,
            }
            for t in self.by_type
        }

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        return cls(**{**data, "by_type": [TypePlan(**t) for t in data["by_type"]]})


@dataclass
class PilotUsage:
    """What a pilot's requests of one task type cost and gave."""

    task_type: str
    brainstorm_requests: int = 0
    brainstorm_tokens: int = 0
    instructions: int = 0  # instructions the brainstorm requests returned
    example_requests: int = 0
    example_tokens: int = 0
    prompt_share: float = 0.5  # prompt tokens / all tokens over the pilot's requests of this type
    parsed: int = 0
    rejected: list[str] = field(default_factory=list)


def _type_plan(task_type: str, n: int, requests: float, tokens: float, prompt_share: float, endpoint_s: float,
               endpoints: int, cost: CostSettings) -> TypePlan:  # fmt: skip
    wall = endpoint_s / max(endpoints, 1)
    gpus = cost.llm_gpus_per_endpoint
    gpu_hours = gpus * endpoints * wall / 3600
    cpu_hours = endpoints * wall / 3600 if gpus == 0 else 0.0
    return TypePlan(
        task_type,
        n,
        requests,
        tokens * prompt_share,
        tokens * (1 - prompt_share),
        wall,
        gpu_hours,
        gpu_hours * cost.gpu_hour_usd + cpu_hours * cost.cpu_hour_usd,
    )


def plan_from_history(
    history: Iterable[Mapping[str, Any]],
    targets: Mapping[str, int],
    model: str,
    endpoints: int,
    cost: CostSettings,
    acceptance: Mapping[str, float] | None = None,
) -> Plan | None:
    """The plan from earlier generate-scope rows (already filtered to the model and prompt versions);
    None when a wanted task type has no earlier parsed example. ``acceptance[type]``: accepted / examples."""
    by_type: dict[str, list[Mapping[str, Any]]] = {}
    for row in history:
        by_type.setdefault(row["task_type"], []).append(row)
    plans, runs = [], set()
    for task_type, n in targets.items():
        rows = by_type.get(task_type, [])
        examples = sum(r["examples"] or 0 for r in rows)
        if not examples:
            return None
        runs.update(r["run_id"] for r in rows)
        prompt = sum(r["prompt_tokens"] or 0 for r in rows)
        tokens = prompt + sum(r["completion_tokens"] or 0 for r in rows)
        endpoint_s = sum((r["generation_wall_s"] or 0.0) * (r["endpoints"] or 1) for r in rows)
        plans.append(
            _type_plan(
                task_type,
                n,
                sum(r["requests"] or 0 for r in rows) / examples * n,
                tokens / examples * n,
                prompt / tokens if tokens else 0.5,
                endpoint_s / examples * n,
                endpoints,
                cost,
            )
        )
    accepted = None
    if acceptance and all(t in acceptance for t in targets):
        accepted = sum(acceptance[t] * n for t, n in targets.items())
    return Plan(f"history: {', '.join(sorted(runs))}", model, endpoints, plans, accepted)


def plan_from_pilot(
    pilot: Iterable[PilotUsage],
    pilot_wall_s: float,
    pilot_endpoints: int,
    targets: Mapping[str, int],
    instructions_per_brainstorm: int,
    model: str,
    endpoints: int,
    cost: CostSettings,
) -> Plan:
    """The plan from a pilot: requests = examples / parsed share (+ brainstorm requests for the instructions),
    tokens per request as measured, wall time = tokens / the pilot's tokens per endpoint-second."""
    pilot = {p.task_type: p for p in pilot}
    pilot_tokens = sum(p.brainstorm_tokens + p.example_tokens for p in pilot.values())
    endpoint_s_per_token = pilot_wall_s * pilot_endpoints / pilot_tokens if pilot_tokens else 0.0
    plans, sent = [], 0
    for task_type, n in targets.items():
        p = pilot.get(task_type) or PilotUsage(task_type)
        sent += p.brainstorm_requests + p.example_requests
        parsed_share = max(p.parsed / p.example_requests, 0.1) if p.example_requests else 1.0
        example_requests = n / parsed_share
        tokens = example_requests * (p.example_tokens / p.example_requests if p.example_requests else 0.0)
        requests = example_requests
        if p.brainstorm_requests:
            per_request = max(p.instructions / p.brainstorm_requests, 1.0)
            brainstorms = math.ceil(n / min(per_request, instructions_per_brainstorm))
            requests += brainstorms
            tokens += brainstorms * p.brainstorm_tokens / p.brainstorm_requests
        plans.append(
            _type_plan(task_type, n, requests, tokens, p.prompt_share, tokens * endpoint_s_per_token, endpoints, cost)
        )
    return Plan(f"pilot: {sent} requests", model, endpoints, plans)
