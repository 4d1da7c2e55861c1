"""Generate examples: plan example requests into shards, and run one shard against the LLM.

Brainstormed types get one example per unique instruction (without the persona in the prompt;
the persona that brainstormed the instruction is kept as lineage). STS and bitext generate
directly with their fixed instruction. Top-up rounds re-use instructions with fresh placeholders
when failures left a type short of its target.

A mix of generator models (``mix``: per task type, each model's weight, ``ground/generators.py``) gives each
request its model at planning time, so a resumed shard asks the same model again; the row records it (``model``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from ground import progress
from ground.generators import assign
from ground.seeding import rng_for, stable_seed
from llm.client import LLMClient, RequestFailed, Sampling
from prompts.budget import fit_placeholders, request_max_tokens
from prompts.placeholders import Choice
from prompts.render import render_example
from prompts.task_types import check_placeholder_overrides, get_task_type
from storage.shards import RunStore, ShardRecord, now_utc, reject_row


@dataclass(frozen=True)
class ExampleRequest:
    example_id: str
    task_type: str
    instruction: str
    instruction_id: str | None
    persona_id: str | None
    persona: str | None
    placeholders: Mapping[str, Any] = field(hash=False)
    seed: int = 0
    generator: str | None = None  # the model asked (a mix of generators); None: the client's model


@dataclass(frozen=True)
class ExampleShard:
    shard_id: str
    requests: tuple[ExampleRequest, ...]


def split_targets(total: int, task_types: Sequence[str]) -> dict[str, int]:
    """Spread ``total`` examples evenly over the task types (remainder to the first ones)."""
    base, extra = divmod(total, len(task_types))
    return {t: base + (1 if i < extra else 0) for i, t in enumerate(task_types)}


def plan_examples(
    run_id: str,
    round_idx: int,
    wanted: Mapping[str, int],
    instructions: pa.Table,
    seed: int,
    shard_size: int,
    placeholder_overrides: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
    answer_room: int | None = None,
    mix: Mapping[str, Mapping[str, float]] | None = None,
) -> list[ExampleShard]:
    """Requests for ``wanted[type]`` examples per type, cut into shards; a pure function.

    ``placeholder_overrides[type][name]`` replaces that placeholder's distribution (uniform values).
    ``answer_room``: the most completion tokens a request may take; a length placeholder whose answer would
    not fit is lowered to the largest of its values that does (``prompts/budget.py``).
    ``mix[type]``: the generator models' weights; each request gets one (exact quotas, seeded order).
    """
    check_placeholder_overrides(placeholder_overrides or {})
    overrides = {
        t: {name: Choice(values) for name, values in names.items()}
        for t, names in (placeholder_overrides or {}).items()
    }
    by_type: dict[str, list[dict]] = {}
    for row in instructions.to_pylist():
        by_type.setdefault(row["task_type"], []).append(row)
    requests: list[ExampleRequest] = []
    for task_type in sorted(wanted):
        spec = get_task_type(task_type)
        pool = by_type.get(task_type, [])
        if spec.brainstorms and not pool:
            continue  # no instruction survived brainstorming; reported by the flow
        weights = (mix or {}).get(task_type)
        generators = (
            assign(weights, wanted[task_type], rng_for(seed, f"r{round_idx:02d}-{task_type}-generators"))
            if weights
            else [None] * wanted[task_type]
        )
        for i in range(wanted[task_type]):
            key = f"r{round_idx:02d}-{task_type}-{i:06d}"
            rng = rng_for(seed, key)
            if spec.brainstorms:
                inst = pool[i % len(pool)]
                instruction, instruction_id = inst["instruction"], inst["instruction_id"]
                persona_id, persona = inst["persona_id"], inst["persona"]
            else:
                instruction, instruction_id, persona_id, persona = spec.fixed_instruction, None, None, None
            requests.append(
                ExampleRequest(
                    example_id=f"{run_id}:{key}",
                    task_type=task_type,
                    instruction=instruction,
                    instruction_id=instruction_id,
                    persona_id=persona_id,
                    persona=persona,
                    placeholders=_fitted(spec, spec.placeholders.sample(rng, overrides.get(task_type)), answer_room),
                    seed=stable_seed(seed, key),
                    generator=generators[i],
                )
            )
    return [
        ExampleShard(f"g{round_idx:02d}-{k:05d}", tuple(requests[start : start + shard_size]))
        for k, start in enumerate(range(0, len(requests), shard_size))
    ]


def _fitted(spec, placeholders: dict[str, Any], answer_room: int | None) -> dict[str, Any]:
    if answer_room is None:
        return placeholders
    return fit_placeholders(spec.name, spec.placeholders, placeholders, answer_room)


def request_sampling(request: ExampleRequest, sampling: Sampling) -> Sampling:
    """The request's sampling: ``max_tokens`` as its placeholders need, at least the configured, at most the room."""
    wanted = request_max_tokens(
        request.task_type, request.placeholders, sampling.max_tokens, sampling.max_tokens_ceiling
    )
    return replace(sampling, max_tokens=wanted)


def _example_row(
    store: RunStore,
    shard_id: str,
    request: ExampleRequest,
    client: LLMClient,
    sampling: Sampling,
    prompt_version: str,
    outcome,
    created,
) -> dict[str, Any]:
    spec = get_task_type(request.task_type)
    query_key, pos_key, neg_key = spec.field_map
    parsed = outcome.parsed
    return {
        "example_id": request.example_id,
        "run_id": store.run_id,
        "shard_id": shard_id,
        "task_type": request.task_type,
        "instruction": request.instruction,
        "instruction_id": request.instruction_id,
        "persona_id": request.persona_id,
        "persona": request.persona,
        "placeholders": json.dumps(dict(request.placeholders), sort_keys=True),
        "prompt_version": prompt_version,
        "model": request.generator or client.model,
        "sampling": json.dumps(sampling.as_dict(request.seed if client.send_seed else None), sort_keys=True),
        "attempts": outcome.attempts,
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "latency_s": outcome.latency_s,
        "finish_reason": outcome.finish_reason,
        "query": parsed[query_key],
        "positive": parsed[pos_key],
        "negative": parsed[neg_key] if neg_key else None,
        "parsed": json.dumps(parsed, ensure_ascii=False, sort_keys=True),
        "raw_text": outcome.text,
        "created_at": created,
    }


async def run_example_shard(store: RunStore, shard: ExampleShard, client: LLMClient, sampling: Sampling) -> ShardRecord:
    """Send a shard's requests concurrently (bounded by the client) and commit the shard."""

    async def one(request: ExampleRequest):
        spec = get_task_type(request.task_type)
        prompt = render_example(spec, request.instruction, dict(request.placeholders))
        try:
            outcome = await client.complete_json(
                prompt, request_sampling(request, sampling), request.seed, request.generator
            )
        except RequestFailed as failure:
            progress.advance("generate", ok=False)
            return request, prompt.prompt_version, failure
        progress.advance("generate")
        return request, prompt.prompt_version, outcome

    rows, rejects = [], []
    created = now_utc()
    for request, version, outcome in await asyncio.gather(*(one(r) for r in shard.requests)):
        if isinstance(outcome, RequestFailed):
            rejects.append(
                reject_row(
                    example_id=request.example_id,
                    run_id=store.run_id,
                    shard_id=shard.shard_id,
                    stage="generate",
                    task_type=request.task_type,
                    instruction=request.instruction,
                    persona_id=request.persona_id,
                    prompt_version=version,
                    model=request.generator or client.model,
                    created_at=created,
                    **outcome.reject_fields(),
                )
            )
        else:
            used = request_sampling(request, sampling)
            rows.append(_example_row(store, shard.shard_id, request, client, used, version, outcome, created))
    return store.write_shard("examples", shard.shard_id, rows, rejects)


# --- thin Prefect wrapper: one task run per shard (hundreds of requests), never per request ---

example_shard_task = task(
    run_example_shard,
    name="generate-shard",
    cache_policy=NO_CACHE,
    task_run_name="generate-{shard.shard_id}",
)
