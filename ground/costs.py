"""The cost ledger's arithmetic: what a run spent per task type, in GPU-hours, USD and USD per 1,000 accepted samples.

Pure functions over plain numbers and rows (dicts with the columns of ``storage.schemas.LEDGER_SCHEMA``);
the flows gather the inputs and ``storage`` writes the rows. How each figure is made:

- generation: one row per task type and generator model. Each model's endpoints ran for the run's wall
  seconds, shared across its task types in proportion to their tokens (prompt + completion); GPU-seconds =
  ``cost.llm_gpus_per_endpoint`` x the model's endpoints x that share. With 0 GPUs the LLM ran on the CPU:
  endpoints x the share are CPU seconds instead.
- clean: one row per task type and generator model (the rows' ``model``); the embed stage's seconds and the
  search stage's seconds (ranking filter + mining) are shared in proportion to the rows embedded per task type
  and model; GPU-seconds = ``cost.embedding_gpus`` x seconds.
- training: the fine-tune's train seconds are shared in proportion to the accepted (training) rows;
  GPU-seconds = ``cost.training_gpus`` x seconds.
- cost = GPU-hours x ``cost.gpu_hour_usd`` + CPU-hours x ``cost.cpu_hour_usd``; per 1,000 accepted samples =
  cost / accepted x 1,000, accepted being the rows that reached the export.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ground.settings import CostSettings

#: the generation columns a clean-scope row sums over its input runs
GENERATION_SUMS = ("requests", "llm_calls", "prompt_tokens", "completion_tokens", "examples")
GENERATION_SECONDS = ("generation_wall_s", "generation_gpu_s")


@dataclass(frozen=True)
class TypeUsage:
    """What one task type of a generation run asked of the LLM, counted from the run's own rows."""

    task_type: str
    prompt_version: str | None
    requests: int  # brainstorm + example requests, rejected ones included
    llm_calls: int  # chat completions, schema re-asks included
    prompt_tokens: int
    completion_tokens: int
    examples: int  # parsed examples
    model: str | None = None  # the generator model that answered; None: the run's one model

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def share(weights: Mapping[str, float], total: float) -> dict[str, float]:
    """``total`` split across the keys in proportion to ``weights`` (equal parts when every weight is 0)."""
    if not weights:
        return {}
    whole = sum(weights.values())
    if whole <= 0:
        return {key: total / len(weights) for key in weights}
    return {key: total * weight / whole for key, weight in weights.items()}


def price(row: dict[str, Any], cost: CostSettings) -> dict[str, Any]:
    """Fill ``gpu_hours``, ``cost_usd`` and ``cost_per_1k_accepted`` of a ledger row from its seconds."""
    gpu_s = sum(row.get(name) or 0.0 for name in ("generation_gpu_s", "clean_gpu_s", "train_gpu_s"))
    row["gpu_hours"] = gpu_s / 3600
    row["cost_usd"] = row["gpu_hours"] * cost.gpu_hour_usd + (row.get("cpu_s") or 0.0) / 3600 * cost.cpu_hour_usd
    accepted = row.get("accepted")
    row["cost_per_1k_accepted"] = row["cost_usd"] / accepted * 1000 if accepted else None
    return row


def now_utc() -> datetime:
    return datetime.now(UTC)


def generation_rows(
    run_id: str,
    model: str,
    usage: Iterable[TypeUsage],
    wall_s: float,
    endpoints: int | Mapping[str, int],
    cost: CostSettings,
    predicted: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The generate-scope ledger rows of a run, one per task type and model (``model``: the one of usage rows
    that name none); ``endpoints``: per model (or one count for all); ``predicted[task_type]``: its plan's
    figures, if any (a plan covers one model: with several, no row carries them)."""
    usage = list(usage)
    models = {u.model or model for u in usage}
    walls: dict[tuple[str, str], float] = {}
    for m in models:  # each model's endpoints ran the whole run: its wall shared by its task types' tokens
        tokens = {u.task_type: u.tokens for u in usage if (u.model or model) == m}
        walls |= {(t, m): w for t, w in share(tokens, wall_s).items()}
    plan = (predicted or {}) if len(models) == 1 else {}
    gpus = cost.llm_gpus_per_endpoint
    created = now_utc()
    rows = []
    for u in usage:
        m = u.model or model
        wall = walls[(u.task_type, m)]
        serving = endpoints if isinstance(endpoints, int) else endpoints.get(m, 1)
        row = {
            "scope": "generate",
            "run_id": run_id,
            "task_type": u.task_type,
            "model": m,
            "prompt_version": u.prompt_version,
            "endpoints": serving,
            "llm_gpus_per_endpoint": gpus,
            "requests": u.requests,
            "llm_calls": u.llm_calls,
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "examples": u.examples,
            "generation_wall_s": wall,
            "generation_gpu_s": gpus * serving * wall,
            "cpu_s": serving * wall if gpus == 0 else 0.0,
            "created_at": created,
            **dict(plan.get(u.task_type, {})),
        }
        rows.append(price(row, cost))
    return rows


def clean_rows(
    clean_id: str,
    generation: Iterable[Mapping[str, Any]],
    embedded: Mapping[tuple[str, str], int],
    accepted: Mapping[tuple[str, str], int],
    embed_s: float,
    search_s: float,
    cost: CostSettings,
) -> list[dict[str, Any]]:
    """The clean-scope rows: per (task type, model), the input runs' generation rows summed, plus this clean's
    embedding and search (shared by ``embedded`` rows) and its ``accepted`` rows; training comes later
    (:func:`with_training`)."""
    by_key: dict[tuple[str, str], dict[str, Any]] = {}
    for gen in generation:
        row = by_key.setdefault(
            (gen["task_type"], gen.get("model")),
            {name: 0 for name in GENERATION_SUMS} | {name: 0.0 for name in (*GENERATION_SECONDS, "cpu_s")},
        )
        for name in (*GENERATION_SUMS, *GENERATION_SECONDS, "cpu_s"):
            row[name] += gen.get(name) or 0
        for name in ("prompt_version", "endpoints", "llm_gpus_per_endpoint"):
            row.setdefault(name, gen.get(name))
    keys = sorted(set(by_key) | set(accepted) | set(embedded), key=lambda k: (k[0], k[1] or ""))
    weights = {k: embedded.get(k, 0) for k in keys}
    embeds, searches = share(weights, embed_s), share(weights, search_s)
    gpus = cost.embedding_gpus
    created = now_utc()
    rows = []
    for key in keys:
        row = by_key.get(key, {name: 0 for name in GENERATION_SUMS})
        seconds = embeds[key] + searches[key]
        row |= {
            "scope": "clean",
            "clean_id": clean_id,
            "task_type": key[0],
            "model": key[1],
            "embed_s": embeds[key],
            "search_s": searches[key],
            "clean_gpu_s": gpus * seconds,
            "cpu_s": (row.get("cpu_s") or 0.0) + (seconds if gpus == 0 else 0.0),
            "accepted": accepted.get(key, 0),
            "created_at": created,
        }
        rows.append(price(row, cost))
    return rows


def with_training(rows: Iterable[Mapping[str, Any]], train_s: float, cost: CostSettings) -> list[dict[str, Any]]:
    """Clean-scope rows with a fine-tune's train seconds shared by accepted rows (replacing an earlier one)."""
    rows = [dict(row) for row in rows]
    trains = share({(row["task_type"], row.get("model")): row.get("accepted") or 0 for row in rows}, train_s)
    gpus = cost.training_gpus
    for row in rows:
        earlier_cpu = (row.get("train_s") or 0.0) if not row.get("train_gpu_s") else 0.0
        seconds = trains[(row["task_type"], row.get("model"))]
        row["train_s"] = seconds
        row["train_gpu_s"] = gpus * seconds
        row["cpu_s"] = (row.get("cpu_s") or 0.0) - earlier_cpu + (seconds if gpus == 0 else 0.0)
        price(row, cost)
    return rows


def totals(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The rows summed (a run's total line); cost per 1,000 accepted from the sums."""
    rows = list(rows)
    names = (*GENERATION_SUMS, *GENERATION_SECONDS, "embed_s", "search_s", "clean_gpu_s", "train_s", "train_gpu_s")
    out: dict[str, Any] = {name: sum(row.get(name) or 0 for row in rows) for name in names}
    for name in ("cpu_s", "gpu_hours", "cost_usd", "predicted_requests", "predicted_tokens", "predicted_cost_usd"):
        values = [row.get(name) for row in rows if row.get(name) is not None]
        out[name] = sum(values) if values else None
    accepted = [row.get("accepted") for row in rows if row.get("accepted") is not None]
    out["accepted"] = sum(accepted) if accepted else None
    out["cost_per_1k_accepted"] = (out["cost_usd"] or 0) / out["accepted"] * 1000 if out["accepted"] else None
    return out


def relative_error(predicted: float | None, actual: float | None) -> float | None:
    """(predicted - actual) / actual; None when either is missing or actual is 0."""
    if predicted is None or not actual:
        return None
    return (predicted - actual) / actual


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def ledger_markdown(rows: Iterable[Mapping[str, Any]], title: str = "Cost ledger") -> str:
    """A run's ledger rows as a markdown table (one line per scope and task type, then the total per scope)."""
    rows = list(rows)
    if not rows:
        return f"### {title}\n\nNo ledger rows yet.\n"
    head = (
        "| scope | id | task type | LLM calls | prompt tok | completion tok | gen wall s | gen GPU-s "
        "| embed+search s | train GPU-s | accepted | GPU-h | USD | USD / 1k accepted |"
    )
    lines = [f"### {title}", "", head, "|" + "---|" * 14]

    def line(scope: str, ident: str, task: str, r: Mapping[str, Any]) -> str:
        cells = [
            scope,
            ident,
            task,
            _fmt(r.get("llm_calls")),
            _fmt(r.get("prompt_tokens")),
            _fmt(r.get("completion_tokens")),
            _fmt(r.get("generation_wall_s"), 1),
            _fmt(r.get("generation_gpu_s"), 1),
            _fmt((r.get("embed_s") or 0) + (r.get("search_s") or 0), 1),
            _fmt(r.get("train_gpu_s"), 1),
            _fmt(r.get("accepted")),
            _fmt(r.get("gpu_hours"), 4),
            _fmt(r.get("cost_usd"), 4),
            _fmt(r.get("cost_per_1k_accepted"), 4),
        ]
        return "| " + " | ".join(cells) + " |"

    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["scope"], row.get("run_id") or row.get("clean_id") or ""), []).append(row)
    for (scope, ident), group in groups.items():
        mixed = len({r.get("model") for r in group}) > 1  # a mix of generators: a line per type and model
        ordered = sorted(group, key=lambda r: (r["task_type"], r.get("model") or ""))
        lines += [line(scope, ident, r["task_type"] + (f" ({r.get('model')})" if mixed else ""), r) for r in ordered]
        lines.append(line(f"**{scope}**", f"**{ident}**", "**total**", totals(group)))
    lines += [
        "",
        "Generation GPU-seconds = GPUs per endpoint x endpoints x wall seconds, shared across task types by tokens; "
        "embedding/search seconds are shared by rows embedded, training seconds by accepted rows.",
    ]
    return "\n".join(lines) + "\n"
