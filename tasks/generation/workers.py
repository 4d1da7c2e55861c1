"""Shards under claims, and the example shard as a task that runs on any worker process.

Every shard a session runs, inline or on a worker, runs under the shard's claim (``storage/claims.py``):
a shard another live worker holds is waited for (it commits it, or its claim goes stale and this worker
redoes it), so N writers of one run neither lose nor double a shard.

On a distributed task runner (``generation.task_runner = "dask"``) each example shard is one Prefect
task run on a worker process; the worker builds its own LLM client from the settings (a client holds
sockets and an event loop: it cannot be pickled) over its share of the endpoints (of each model), and returns the
shard's record with the client's counters, which the flow adds up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE

from ground.generators import LLMEndpoint, served_models
from ground.settings import Settings
from llm.client import ClientStats, LLMClient, Sampling
from storage.shards import RunStore, ShardKind, ShardRecord
from tasks.generation.generate import ExampleShard, run_example_shard

log = logging.getLogger(__name__)


async def run_claimed(
    store: RunStore, kind: ShardKind, shard_id: str, work: Callable[[], Awaitable[ShardRecord]]
) -> ShardRecord | None:
    """``work()`` (which commits the shard) while holding the shard's claim; None when another worker
    committed the shard first. A shard claimed by a live worker is polled until committed or stale."""
    poll = min(1.0, store.claims.ttl_s / 10)
    said = False
    while True:
        with store.claim(kind, shard_id) as claim:
            if claim is not None:
                if store.is_complete(kind, shard_id):  # committed by the worker we waited for
                    return None
                return await work()
        if store.is_complete(kind, shard_id):
            return None
        if not said:
            log.info("shard %s/%s is claimed by %s: waiting", kind, shard_id, store.claims.holder(f"{kind}/{shard_id}"))
            said = True
        await asyncio.sleep(poll)


def endpoint_share(urls: Sequence[str], index: int, workers: int) -> list[str]:
    """The endpoints of share ``index`` of ``workers``: every ``workers``-th URL; one URL each when they are fewer."""
    mine = list(urls[index % workers :: workers]) if len(urls) >= workers else []
    return mine or [urls[index % len(urls)]]


def model_share(endpoints: Sequence[LLMEndpoint], index: int, workers: int) -> list[LLMEndpoint]:
    """:func:`endpoint_share` of each served model's endpoints, so every share can ask every generator."""
    share = []
    for model in served_models(endpoints):
        mine = set(endpoint_share([e.url for e in endpoints if e.model == model], index, workers))
        share += [e for e in endpoints if e.model == model and e.url in mine]
    return share


@dataclasses.dataclass
class ShardDone:
    """What a worker returns for one shard: its record (None: committed by another) and its client's counters."""

    shard_id: str
    record: ShardRecord | None
    stats: dict[str, int]
    endpoints: list[dict[str, Any]]


def stats_counts(stats: ClientStats) -> dict[str, int]:
    """A client's integer counters (requests, attempts, tokens, ...), to add up over workers."""
    return {
        f.name: getattr(stats, f.name)
        for f in dataclasses.fields(stats)
        if isinstance(getattr(stats, f.name), int) and f.name != "in_flight"
    }


def add_stats(total: ClientStats, counts: dict[str, int]) -> None:
    for name, value in counts.items():
        if hasattr(total, name):
            setattr(total, name, getattr(total, name) + value)


def merge_endpoints(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Endpoint rows of several clients as one row per endpoint: counts and seconds out added; latencies are
    the highest any client saw (a bound: the workers' latency samples are not sent back)."""
    merged: dict[str, dict[str, Any]] = {}
    for row in rows:
        have = merged.get(row["endpoint"])
        if have is None:
            merged[row["endpoint"]] = dict(row)
            continue
        for key in ("requests", "failures", "out_of_rotation_s", "taken_out"):
            if isinstance(row.get(key), (int, float)) and isinstance(have.get(key), (int, float)):
                have[key] = have[key] + row[key]
        for key in ("median_latency_s", "p99_latency_s"):
            values = [v for v in (have.get(key), row.get(key)) if v is not None]
            have[key] = max(values) if values else None
        have["in_rotation"] = bool(have.get("in_rotation")) and bool(row.get("in_rotation"))
        have["last_reason"] = row.get("last_reason") or have.get("last_reason")
    return [merged[url] for url in sorted(merged)]


def run_example_shard_on_worker(
    settings: Settings, run_id: str, shard: ExampleShard, sampling: Sampling, endpoints: list[LLMEndpoint]
) -> ShardDone:
    """One example shard on whatever process runs this task: its own client over ``endpoints``, under the claim."""
    store = RunStore.from_settings(settings, run_id)

    async def run() -> ShardDone:
        async with LLMClient.from_settings(settings, logger=get_run_logger(), endpoints=endpoints) as client:
            record = await run_claimed(
                store, "examples", shard.shard_id, lambda: run_example_shard(store, shard, client, sampling)
            )
            return ShardDone(shard.shard_id, record, stats_counts(client.stats), client.router.report_rows())

    return asyncio.run(run())


# a sync task: a Dask worker runs it in its thread, with its own event loop for the client
example_shard_worker_task = task(
    run_example_shard_on_worker,
    name="generate-shard-worker",
    cache_policy=NO_CACHE,
    task_run_name="generate-{shard.shard_id}",
)
