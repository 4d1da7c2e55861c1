"""The task runner that the clean flow maps its CPU-heavy stages onto, chosen by ``settings.clean``.

* ``task_runner = "thread"`` (default): the flow's own thread pool.
* ``task_runner = "dask"``: prefect-dask's ``DaskTaskRunner``, on the scheduler at ``dask_address``
  (an existing cluster, e.g. ``tcp://dask-scheduler:8786``) or else on a ``LocalCluster`` of
  ``dask_workers`` processes with one thread each. The cluster is started on the first submitted
  task, so a resumed clean run whose mapped stages are done starts none. Workers need this project
  installed and the data folder at the same path (a shared filesystem) or on S3.

Every mapped task returns its result to the flow, which merges them in a fixed order, so the output
does not depend on the runner.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect.context import FlowRunContext
from prefect.task_runners import TaskRunner

from ground.settings import CleanSettings


@contextlib.contextmanager
def stage_runner(cfg: CleanSettings) -> Iterator[TaskRunner]:
    """A started task runner; call inside a flow run. ``runner.map(task, {...})`` as ``Task.map`` does."""
    if cfg.task_runner == "thread":
        context = FlowRunContext.get()
        if context is None or context.task_runner is None:
            raise RuntimeError("stage_runner needs a flow run (the thread runner is the flow's own)")
        yield context.task_runner
        return
    from prefect_dask import DaskTaskRunner

    if cfg.dask_address:
        runner = DaskTaskRunner(address=cfg.dask_address)
    else:
        runner = DaskTaskRunner(
            cluster_kwargs={"n_workers": cfg.dask_workers, "threads_per_worker": 1, "processes": True}
        )
    with runner:
        yield runner
