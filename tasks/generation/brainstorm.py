"""Brainstorm task instructions with personas as system prompts, and keep the unique ones.

A round asks, per task type, enough brainstorm requests to cover that type's deficit of unique
instructions, scaled by the yield the type's previous round showed (``next_overshoot``); rounds
repeat until every type reaches its target (or ``max_rounds``). Each round's plan depends only on
the settings and the shards already stored, so a re-run plans the same shards and skips the
finished ones.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from ground import progress
from ground.seeding import stable_seed
from llm.client import LLMClient, RequestFailed, Sampling
from personas.sampling import PersonaSampler
from personas.sources import Persona
from prompts.render import render_brainstorm
from prompts.task_types import get_task_type
from storage.schemas import INSTRUCTION_SCHEMA
from storage.shards import RunStore, ShardRecord, now_utc, reject_row
from tasks.generation.intents import Encode, Intents, cluster_intents

#: brainstorm answers overlap; the first round asks for this much more than the deficit
OVERSHOOT = 1.5
#: later rounds ask deficit / yield of the round before, with this margin (yield falls as a type fills) ...
YIELD_MARGIN = 1.25
#: ... and never more than this many times the deficit (a round that gained nothing)
MAX_OVERSHOOT = 8.0


@dataclass(frozen=True)
class BrainstormRequest:
    request_id: str
    task_type: str
    persona: Persona
    n: int
    seed: int


@dataclass(frozen=True)
class BrainstormShard:
    shard_id: str
    requests: tuple[BrainstormRequest, ...]


def instruction_key(text: str) -> str:
    """The key brainstormed instructions are deduplicated on (the ``normalized`` column of the instructions).

    Whitespace collapsed and casefolded, punctuation stripped from the ends only: "Retrieve recipes, that ..."
    stays apart from "Retrieve recipes that ..." (unlike ``tasks.cleaning.dedup.dedup_key`` of the examples).
    """
    text = " ".join(text.split()).casefold()
    return re.sub(r"^[\W_]+|[\W_]+$", "", text)


def asked_for(deficit: int, overshoot: float, per_request: int) -> int:
    """Brainstorm requests a round sends for a type's deficit at that overshoot."""
    return math.ceil(deficit * overshoot / per_request) if deficit > 0 else 0


def next_overshoot(deficit_before: int, deficit_after: int, asked: int, overshoot: float) -> float:
    """The overshoot for a type's next round, from what its last round yielded.

    ``asked`` instructions (requests × per request) closed ``deficit_before - deficit_after`` of the
    deficit; the next round asks the remaining deficit divided by that yield, with ``YIELD_MARGIN``,
    between ``OVERSHOOT`` and ``MAX_OVERSHOOT``. A type that did not take part keeps ``overshoot``.
    """
    if asked <= 0:
        return overshoot
    gained = deficit_before - deficit_after
    if gained <= 0:
        return MAX_OVERSHOOT
    return min(MAX_OVERSHOOT, max(OVERSHOOT, YIELD_MARGIN * asked / gained))


def next_overshoots(
    overshoot: Mapping[str, float], planned: Mapping[str, int], missing: Mapping[str, int], per_request: int
) -> dict[str, float]:
    """Every type's overshoot for the next round: ``planned`` are the deficits the last round was planned for
    at ``overshoot`` (``OVERSHOOT`` where absent), ``missing`` the deficits it left."""
    sized = dict(overshoot)
    for task_type, before in planned.items():
        factor = overshoot.get(task_type, OVERSHOOT)
        asked = asked_for(before, factor, per_request) * per_request
        sized[task_type] = next_overshoot(before, missing[task_type], asked, factor)
    return sized


def plan_round(
    round_idx: int,
    deficits: Mapping[str, int],
    sampler: PersonaSampler,
    per_request: int,
    shard_size: int,
    seed: int,
    overshoot: Mapping[str, float] | None = None,
) -> list[BrainstormShard]:
    """The shards of one brainstorm round; a pure function of its arguments.

    ``overshoot``: per type, how many times its deficit to ask for (``OVERSHOOT`` where absent).
    """
    requests: list[BrainstormRequest] = []
    for task_type in sorted(deficits):
        factor = (overshoot or {}).get(task_type, OVERSHOOT)
        for i in range(asked_for(deficits[task_type], factor, per_request)):
            request_id = f"b{round_idx:03d}-{task_type}-{i:06d}"
            requests.append(
                BrainstormRequest(
                    request_id, task_type, sampler.draw(request_id), per_request, seed=stable_seed(seed, request_id)
                )
            )
    return [
        BrainstormShard(f"b{round_idx:03d}-{k:05d}", tuple(requests[start : start + shard_size]))
        for k, start in enumerate(range(0, len(requests), shard_size))
    ]


async def run_brainstorm_shard(
    store: RunStore, shard: BrainstormShard, client: LLMClient, sampling: Sampling
) -> ShardRecord:
    """Send a shard's brainstorm requests concurrently and commit the answers as one shard."""

    async def one(request: BrainstormRequest):
        spec = get_task_type(request.task_type)
        prompt = render_brainstorm(spec, request.persona.text, request.n)
        try:
            result = await client.complete_json(prompt, sampling, request.seed)
        except RequestFailed as failure:
            progress.advance("brainstorm", ok=False)
            return request, prompt, failure
        progress.advance("brainstorm")
        return request, prompt, result

    rows, rejects = [], []
    created = now_utc()
    for request, prompt, outcome in await asyncio.gather(*(one(r) for r in shard.requests)):
        if isinstance(outcome, RequestFailed):
            rejects.append(
                reject_row(
                    example_id=f"{store.run_id}:{request.request_id}",
                    run_id=store.run_id,
                    shard_id=shard.shard_id,
                    stage="brainstorm",
                    task_type=request.task_type,
                    instruction=None,
                    persona_id=request.persona.persona_id,
                    prompt_version=prompt.prompt_version,
                    model=client.model,
                    created_at=created,
                    **outcome.reject_fields(),
                )
            )
            continue
        for instruction in outcome.parsed["tasks"]:
            rows.append(
                {
                    "run_id": store.run_id,
                    "shard_id": shard.shard_id,
                    "task_type": request.task_type,
                    "instruction": instruction,
                    "persona_id": request.persona.persona_id,
                    "persona": request.persona.text,
                    "prompt_version": prompt.prompt_version,
                    "model": client.model,
                    "prompt_tokens": outcome.prompt_tokens,
                    "completion_tokens": outcome.completion_tokens,
                    "latency_s": outcome.latency_s,
                    "created_at": created,
                }
            )
    return store.write_shard("brainstorm", shard.shard_id, rows, rejects)


def unique_instructions(
    brainstorm: pa.Table, targets: Mapping[str, int], encode: Encode | None = None, threshold: float | None = None
) -> pa.Table:
    """First occurrence of each normalized instruction per task type (shard order), with its intent.

    With ``encode`` and ``threshold``, instructions closer than the threshold share an intent
    (``tasks/generation/intents.py``); otherwise each instruction is its own intent. The first
    ``targets[type]`` intents of each type are kept, every instruction of them included.
    """
    seen: set[tuple[str, str]] = set()
    candidates: list[dict] = []
    # shard order; the sort is stable, so rows of one shard keep their order
    order = pc.sort_indices(brainstorm, sort_keys=[("shard_id", "ascending")]).to_pylist()
    columns = brainstorm.select(["task_type", "instruction", "persona_id", "persona"]).to_pylist()
    for i in order:
        row = columns[i]
        normalized = instruction_key(row["instruction"])
        if row["task_type"] not in targets or len(normalized) < 10 or (row["task_type"], normalized) in seen:
            continue
        seen.add((row["task_type"], normalized))
        candidates.append({**row, "normalized": normalized})
    types = [c["task_type"] for c in candidates]
    if encode is not None and threshold is not None and candidates:
        intents = cluster_intents(types, encode([c["instruction"] for c in candidates]), threshold)
    else:  # each instruction its own intent, numbered per type
        seen_per_type: dict[str, int] = {}
        numbers = []
        for t in types:
            numbers.append(seen_per_type.get(t, 0))
            seen_per_type[t] = numbers[-1] + 1
        intents = Intents(numbers, [None] * len(types))
    kept: list[dict] = []
    counts: dict[str, int] = {t: 0 for t in targets}
    for row, intent, nearest in zip(candidates, intents.intent, intents.nearest, strict=True):
        task_type = row["task_type"]
        if intent >= targets[task_type]:
            continue
        counts[task_type] += 1
        kept.append(
            {
                "instruction_id": f"{task_type}-{counts[task_type]:06d}",
                "task_type": task_type,
                "instruction": row["instruction"],
                "normalized": row["normalized"],
                "persona_id": row["persona_id"],
                "persona": row["persona"],
                "intent_id": f"{task_type}-i{intent + 1:06d}",
                "nearest_similarity": nearest,
            }
        )
    return pa.Table.from_pylist(kept, schema=INSTRUCTION_SCHEMA)


def deficits(instructions: pa.Table, targets: Mapping[str, int]) -> dict[str, int]:
    """Intents still missing per task type; a row without an intent id (older runs) is its own intent."""
    types = instructions["task_type"].to_pylist()
    ids = instructions["intent_id"].to_pylist() if "intent_id" in instructions.column_names else [None] * len(types)
    have: dict[str, set] = {}
    for row, (task_type, intent_id) in enumerate(zip(types, ids, strict=True)):
        have.setdefault(task_type, set()).add(intent_id or row)
    return {t: max(0, targets[t] - len(have.get(t, ()))) for t in targets}


# --- thin Prefect wrapper: one task run per shard (hundreds of requests), never per request ---

brainstorm_shard_task = task(
    run_brainstorm_shard,
    name="brainstorm-shard",
    cache_policy=NO_CACHE,
    task_run_name="brainstorm-{shard.shard_id}",
)
