"""What the deployment tests share (app/test_deployments.py, app/test_deployment_server.py, app/test_ui.py): the
deployments, tiny clean and fine-tune settings, and waiting for a work pool's worker."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

EXPECTED = {
    "generate": "flows.generate.generate",
    "clean": "flows.clean.clean",
    "finetune": "flows.finetune.finetune",
    "pipeline": "flows.pipeline.pipeline",
    "import_data": "flows.importing.import_data",
}


# small, cheap clean and fine-tune settings for tiny corpora (environment, so the worker's flow runs get them)
TINY = {
    "EMBED_FACTORY_FINETUNE__STS_LANGUAGES": '["en"]',
    "EMBED_FACTORY_FINETUNE__STS_MAX_PAIRS": "40",
    "EMBED_FACTORY_FINETUNE__BATCH_SIZE": "4",
    "EMBED_FACTORY_FINETUNE__MAX_SEQ_LENGTH": "64",
    "EMBED_FACTORY_FINETUNE__EVAL_BATCH_SIZE": "32",
    "EMBED_FACTORY_FINETUNE__HARD_NEGATIVES": "1",
    "EMBED_FACTORY_FINETUNE__MATRYOSHKA_DIMS": "[256, 64]",
    "EMBED_FACTORY_FINETUNE__MATRYOSHKA_WEIGHTS": "[1.0, 0.3]",
    "EMBED_FACTORY_FINETUNE__MAX_STEPS": "2",
    "EMBED_FACTORY_CLEAN__RANK_TOP_K": "10",
    "EMBED_FACTORY_CLEAN__NEGATIVE_RANK_MIN": "1",
    "EMBED_FACTORY_CLEAN__NEGATIVE_RANK_MAX": "10",
    "EMBED_FACTORY_CLEAN__NEGATIVES_PER_QUERY": "2",
    "EMBED_FACTORY_CLEAN__HELDOUT_FRACTION": "0",
}


def wait_for_worker(pool: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until a worker of ``pool`` is online (it starts once `embed-factory deploy` has registered everything)."""
    from prefect import get_client
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            pytest.fail(f"`embed-factory deploy` exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        with get_client(sync_client=True) as client:
            try:
                if client.read_workers_for_work_pool(
                    pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))
                ):
                    return
            except (ObjectNotFound, PrefectHTTPStatusError):  # the pool is not there yet (404)
                pass
        if time.monotonic() > deadline:
            pytest.fail(f"no worker of {pool} came online in {timeout:.0f}s:\n{log.read_text()[-4000:]}")
        time.sleep(1)
