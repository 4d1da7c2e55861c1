"""The task runners: the one the clean flow maps its CPU-heavy stages onto (``settings.clean``), and the
one a generation run spreads its example shards over (``settings.generation``).

* ``task_runner = "thread"`` (default): the flow's own thread pool.
* ``task_runner = "dask"``: prefect-dask's ``DaskTaskRunner``, on the scheduler at ``dask_address``
  (an existing cluster, e.g. ``tcp://dask-scheduler:8786``) or else on a ``LocalCluster`` of
  ``dask_workers`` processes with one thread each. The cluster is started on the first submitted
  task, so a resumed clean run whose mapped stages are done starts none. Workers need this project
  installed and the data folder at the same path (a shared filesystem) or on S3.

Every mapped task returns its result to the flow, which merges them in a fixed order, so the output
does not depend on the runner.

Generation (``generation.task_runner``): ``"inline"`` (default) runs the shards in the flow's own event
loop; ``"dask"`` submits one task per example shard to a ``DaskTaskRunner`` (``generation.dask_address``,
else a ``LocalCluster`` of ``generation.workers`` processes), a window of them at a time
(:func:`run_windowed`). Each shard's task run shows under the flow run in the Prefect UI.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prefect.context import FlowRunContext
from prefect.task_runners import TaskRunner

from ground.settings import CleanSettings, GenerationSettings, Settings
from llm.client import ClientStats, Sampling
from tasks.generation.generate import ExampleShard
from tasks.generation.rounds import Execute, OnShard
from tasks.generation.workers import ShardDone, add_stats, example_shard_worker_task, model_share


@contextlib.contextmanager
def stage_runner(cfg: CleanSettings) -> Iterator[TaskRunner]:
    """A started task runner; call inside a flow run. ``runner.map(task, {...})`` as ``Task.map`` does."""
    if cfg.task_runner == "thread":
        context = FlowRunContext.get()
        if context is None or context.task_runner is None:
            raise RuntimeError("stage_runner needs a flow run (the thread runner is the flow's own)")
        yield context.task_runner
        return
    with dask_runner(cfg.dask_address, cfg.dask_workers) as runner:
        yield runner


@contextlib.contextmanager
def dask_runner(address: str | None, workers: int) -> Iterator[TaskRunner]:
    """A started DaskTaskRunner on the scheduler at ``address``, else on a LocalCluster of ``workers`` processes."""
    from prefect_dask import DaskTaskRunner

    if address:
        runner = DaskTaskRunner(address=address)
    else:
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})
    with runner:
        yield runner


@contextlib.contextmanager
def shard_runner(gen: GenerationSettings) -> Iterator[TaskRunner | None]:
    """The runner of a generation run's example shards: None for ``inline`` (the flow runs them itself)."""
    if gen.task_runner == "inline":
        yield None
        return
    with dask_runner(gen.dask_address, gen.workers) as runner:
        yield runner


def run_windowed(
    runner: TaskRunner, task: Any, parameters: Iterable[dict[str, Any]], window: int, on_result: Callable[[Any], None]
) -> None:
    """Submit ``task`` once per parameter set, at most ``window`` in flight; ``on_result`` gets each result as it
    ends. The first failure stops new submissions; the ones in flight end, then it is raised (blocking: call it
    from a thread)."""
    from distributed import as_completed

    todo = iter(parameters)
    by_key: dict[str, Any] = {}
    errors: list[BaseException] = []

    def submit_next() -> Any:
        params = next(todo, None)
        if params is None or errors:
            return None
        future = runner.submit(task, params)
        by_key[future.wrapped_future.key] = future
        return future.wrapped_future

    first = [f for f in (submit_next() for _ in range(window)) if f is not None]
    if not first:
        return
    done = as_completed(first)
    for wrapped in done:
        future = by_key.pop(wrapped.key)
        try:
            on_result(future.result())
        except BaseException as exc:  # noqa: BLE001 - re-raised below, once the others ended
            errors.append(exc)
        nxt = submit_next()
        if nxt is not None:
            done.add(nxt)
    if errors:
        raise errors[0]


def on_workers(
    runner: Any, settings: Settings, run_id: str, sampling: Sampling, stats: ClientStats, endpoints: list
) -> Execute:
    """Run a round's example shards as task runs on ``runner``'s workers; their client counters and endpoint rows
    are added to ``stats`` and ``endpoints``."""
    gen = settings.generation

    async def execute(shards: Sequence[ExampleShard], on_shard: OnShard | None) -> None:
        loop = asyncio.get_running_loop()

        def on_result(done: ShardDone) -> None:  # in run_windowed's thread
            add_stats(stats, done.stats)
            endpoints.extend(done.endpoints)
            if done.record is not None and on_shard is not None:
                loop.call_soon_threadsafe(on_shard, done.record)

        fleet = settings.llm_endpoints
        parameters = (
            {
                "settings": settings,
                "run_id": run_id,
                "shard": shard,
                "sampling": sampling,
                "endpoints": model_share(fleet, i, gen.workers),
            }
            for i, shard in enumerate(shards)
        )
        window = gen.workers * gen.shards_in_flight
        await asyncio.to_thread(run_windowed, runner, example_shard_worker_task, parameters, window, on_result)

    return execute
