"""Grounded generation: per passage, a config answer (persona, question type, difficulty), then its query.

:func:`plan_grounded` turns the run's passages table (``storage/passages.py``: the passages with their
top-k personas) into shards of requests, a pure function of the table, the persona pool and the seed: the
passages are taken in an order seeded by ``generation.seed`` (at most ``examples`` of them), each once, and
each request samples its query length and language from the retrieval task type's placeholders.

:func:`run_grounded_shard` sends each request's two prompts (``prompts/grounded.py``) and commits the
shard: its lineage first (``storage/lineage.py``: passage, question type, difficulty), then the examples
and rejects. Each row is a ``retrieval`` row whose positive is the passage and whose negative is a passage
of another document (drawn with the seed; the clean's mining adds hard negatives from the same corpus),
so the clean treats it as any retrieval row. A passage whose config or query fails is a reject; it is not
asked again in the run (a passage is generated once per run).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from ground import progress
from ground.seeding import rng_for, stable_seed
from llm.client import LLMClient, RequestFailed, Sampling
from prompts.grounded import GROUNDED_INSTRUCTION, PROMPT_VERSION, QUERY_PLACEHOLDERS, render_config, render_query
from prompts.placeholders import Choice
from prompts.task_types import get_task_type
from storage.lineage import write_lineage
from storage.shards import RunStore, ShardRecord, now_utc, reject_row

TASK_TYPE = "retrieval"
SOURCE = "grounded"


@dataclass(frozen=True)
class GroundedRequest:
    example_id: str
    passage_id: str
    document: str
    position: int
    passage: str
    candidates: tuple[tuple[str, str], ...]  # (persona_id, persona) of the top-k, best first
    negative: str | None
    placeholders: Mapping[str, Any] = field(hash=False)  # query_length, language
    seed: int = 0


@dataclass(frozen=True)
class GroundedShard:
    shard_id: str
    requests: tuple[GroundedRequest, ...]


def passage_order(passage_ids: Sequence[str], seed: int) -> list[int]:
    """The passages' indices in the run's order: seeded, independent of the corpus' file order."""
    return sorted(range(len(passage_ids)), key=lambda i: (stable_seed(seed, passage_ids[i]), passage_ids[i]))


def plan_grounded(
    run_id: str,
    passages: pa.Table,
    personas: Mapping[str, str],
    wanted: int,
    seed: int,
    shard_size: int,
    overrides: Mapping[str, Sequence[Any]] | None = None,
) -> list[GroundedShard]:
    """Shards of one request per passage for ``wanted`` passages (all, if fewer); a pure function.

    ``personas``: persona id -> text (the run's pool); ``overrides``: the retrieval type's placeholder
    overrides (``generation.placeholder_overrides["retrieval"]``)."""
    space = get_task_type(TASK_TYPE).placeholders
    merged = space.merged({name: Choice(values) for name, values in (overrides or {}).items()})
    rows = passages.to_pylist()
    order = passage_order([r["passage_id"] for r in rows], seed)[:wanted]
    requests = []
    for index in order:
        row = rows[index]
        key = f"q-{row['passage_id']}"
        rng = rng_for(seed, key)
        negative = _negative_passage(rows, row, rng)
        requests.append(
            GroundedRequest(
                example_id=f"{run_id}:{key}",
                passage_id=row["passage_id"],
                document=row["document"],
                position=row["position"],
                passage=row["text"],
                candidates=tuple((pid, personas[pid]) for pid in row["personas"]),
                negative=negative,
                placeholders={name: merged[name].sample(rng) for name in QUERY_PLACEHOLDERS},
                seed=stable_seed(seed, key),
            )
        )
    return [
        GroundedShard(f"q00-{k:05d}", tuple(requests[start : start + shard_size]))
        for k, start in enumerate(range(0, len(requests), shard_size))
    ]


def _negative_passage(rows: list[dict[str, Any]], row: dict[str, Any], rng) -> str | None:
    """A passage of another document (seeded draws), else another passage of the same one; None if it is alone."""
    for _ in range(32):
        other = rows[rng.randrange(len(rows))]
        if other["document"] != row["document"]:
            return other["text"]
    others = [r for r in rows if r["passage_id"] != row["passage_id"]]  # a corpus of (nearly) one document
    return others[rng.randrange(len(others))]["text"] if others else None


@dataclass(frozen=True)
class _Answered:
    config: dict[str, Any]
    query: Any  # the query's Completion
    prompt_tokens: int
    completion_tokens: int
    attempts: int


async def _ask(request: GroundedRequest, client: LLMClient, sampling: Sampling) -> _Answered:
    personas = [text for _, text in request.candidates]
    config = await client.complete_json(render_config(request.passage, personas), sampling, request.seed)
    persona = personas[int(config.parsed["persona"]) - 1]
    prompt = render_query(
        request.passage,
        persona,
        config.parsed["question_type"],
        config.parsed["difficulty"],
        dict(request.placeholders),
    )
    query = await client.complete_json(prompt, sampling, request.seed + 1)
    return _Answered(
        config.parsed,
        query,
        config.prompt_tokens + query.prompt_tokens,
        config.completion_tokens + query.completion_tokens,
        config.attempts + query.attempts,
    )


def _row(
    store: RunStore,
    shard_id: str,
    request: GroundedRequest,
    client: LLMClient,
    sampling: Sampling,
    answered: _Answered,
    created,
) -> dict[str, Any]:
    persona_id, persona = request.candidates[int(answered.config["persona"]) - 1]
    query = answered.query
    placeholders = {
        "query_length": request.placeholders["query_length"],
        # not "language": validation would hold the passage (the positive) to the query's language
        "query_language": request.placeholders["language"],
        "question_type": answered.config["question_type"],
        "difficulty": answered.config["difficulty"],
    }
    return {
        "example_id": request.example_id,
        "run_id": store.run_id,
        "shard_id": shard_id,
        "task_type": TASK_TYPE,
        "instruction": GROUNDED_INSTRUCTION,
        "instruction_id": None,
        "persona_id": persona_id,
        "persona": persona,
        "placeholders": json.dumps(placeholders, sort_keys=True),
        "prompt_version": PROMPT_VERSION,
        "model": client.model,
        "sampling": json.dumps(sampling.as_dict(request.seed if client.send_seed else None), sort_keys=True),
        "attempts": answered.attempts,
        "prompt_tokens": answered.prompt_tokens,
        "completion_tokens": answered.completion_tokens,
        "latency_s": query.latency_s,
        "finish_reason": query.finish_reason,
        "query": query.parsed["query"],
        "positive": request.passage,
        "negative": request.negative,
        "parsed": json.dumps({"config": answered.config, "query": query.parsed}, ensure_ascii=False, sort_keys=True),
        "raw_text": query.text,
        "created_at": created,
    }


def _lineage(store: RunStore, request: GroundedRequest, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "example_id": request.example_id,
        "run_id": store.run_id,
        "source": SOURCE,
        "file": request.document,
        "line": request.position,
        "layout": None,
        "passage_id": request.passage_id,
        "question_type": config["question_type"],
        "difficulty": config["difficulty"],
    }


async def run_grounded_shard(
    store: RunStore, shard: GroundedShard, client: LLMClient, sampling: Sampling
) -> ShardRecord:
    """Ask each request's config and query (concurrently, bounded by the client) and commit the shard."""

    async def one(request: GroundedRequest):
        try:
            answered = await _ask(request, client, sampling)
        except RequestFailed as failure:
            progress.advance("generate", ok=False)
            return request, failure
        progress.advance("generate")
        return request, answered

    rows, lineage, rejects = [], [], []
    created = now_utc()
    for request, outcome in await asyncio.gather(*(one(r) for r in shard.requests)):
        if isinstance(outcome, RequestFailed):
            rejects.append(
                reject_row(
                    example_id=request.example_id,
                    run_id=store.run_id,
                    shard_id=shard.shard_id,
                    stage="generate",
                    task_type=TASK_TYPE,
                    instruction=GROUNDED_INSTRUCTION,
                    persona_id=request.candidates[0][0] if request.candidates else None,
                    prompt_version=PROMPT_VERSION,
                    model=client.model,
                    created_at=created,
                    **outcome.reject_fields(),
                )
            )
        else:
            rows.append(_row(store, shard.shard_id, request, client, sampling, outcome, created))
            lineage.append(_lineage(store, request, outcome.config))
    write_lineage(store, shard.shard_id, lineage)  # before the data file, the shard's commit point
    return store.write_shard("examples", shard.shard_id, rows, rejects)


grounded_shard_task = task(
    run_grounded_shard,
    name="grounded-shard",
    cache_policy=NO_CACHE,
    task_run_name="grounded-{shard.shard_id}",
)
