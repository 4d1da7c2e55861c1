"""Running deployments on this machine: the finetune deployment served by this process, or a process worker."""

from __future__ import annotations

from typing import Any

from embed_factory.deployments.finetune_trigger import build_deployment, check_settings
from embed_factory.deployments.project import ensure_work_pool
from ground.settings import Settings


def serve_finetune(
    settings: Settings,
    parameters: dict[str, Any] | None = None,
    limit: int = 1,
    query_seconds: float | None = None,
    print_starting_message: bool = True,
) -> None:
    """Serve the deployment with its trigger from this process (blocking; Ctrl-C or SIGTERM stops).

    ``limit``: fine-tunes at a time (1: one model trains at once, others wait). The Prefect API is
    the current one (``PREFECT_API_URL``; the CLI sets it). ``settings`` is checked for a usable
    fine-tune configuration; each run loads its own settings (profile, environment, config file).
    """
    from prefect import serve

    check_settings(settings)
    serve(
        build_deployment(parameters),
        limit=limit,
        query_seconds=query_seconds,
        print_starting_message=print_starting_message,
    )


def start_worker(pool: str, limit: int | None = 1, run_once: bool = False, name: str | None = None) -> None:
    """Run a Prefect process worker for ``pool`` in this process (blocking; Ctrl-C stops it).

    It polls the API for scheduled runs of the pool's deployments and runs each in a subprocess;
    the pull step of the deployment moves that subprocess into the project directory.
    """
    import asyncio

    from prefect.workers.process import ProcessWorker

    ensure_work_pool(pool)
    asyncio.run(ProcessWorker(work_pool_name=pool, limit=limit, name=name).start(run_once=run_once))
