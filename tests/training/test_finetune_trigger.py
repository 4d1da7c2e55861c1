"""The finetune deployment's trigger end to end (marked ``trigger``, ~1-2 min on 2 cores).

Against the session's Prefect test server (an ephemeral server, which runs the event services:
reactive triggers and actions), ``embed-factory serve`` serves the finetune deployment with its
trigger in a subprocess; a real ``clean`` flow run on a tiny generation run completes; a finetune flow
run of the deployment must appear with that clean run's clean_id and complete, and its model and
eval.json must be there. Everything started is stopped at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.processes import stop
from support.rows import make_generation_run

ROOT = Path(__file__).resolve().parents[2]


async def _finetune_runs(deployment_id):
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    async with get_client() as client:
        return await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )


async def _deployment_with_trigger():
    """The served deployment's id once it and its trigger's automation are registered, else None."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    from embed_factory.deployments.finetune_trigger import FULL_NAME, TRIGGER_NAME

    async with get_client() as client:
        try:
            deployment = await client.read_deployment_by_name(FULL_NAME)
        except ObjectNotFound:
            return None
        automations = await client.read_automations_by_name(TRIGGER_NAME)
        ours = [
            a
            for a in automations
            if any(getattr(action, "deployment_id", None) == deployment.id for action in a.actions)
        ]
        return deployment.id if ours else None


async def _delete_deployment(deployment_id):
    from prefect import get_client

    async with get_client() as client:
        await client.delete_resource_owned_automations(f"prefect.deployment.{deployment_id}")
        await client.delete_deployment(deployment_id)


@pytest.mark.trigger
def test_clean_completion_triggers_finetune(prefect_api_url, tiny_finetune, tmp_path, monkeypatch):
    from prefect.client.schemas.objects import StateType

    from flows.clean import clean

    data_dir = tiny_finetune
    make_generation_run(data_dir, "run-t", 24)
    # a corpus of 48 texts: mine negatives from ranks 2-10 (the defaults, 50-100, are beyond it)
    for key, value in {
        "RANK_TOP_K": "10",
        "NEGATIVE_RANK_MIN": "1",
        "NEGATIVE_RANK_MAX": "10",
        "NEGATIVES_PER_QUERY": "2",
    }.items():
        monkeypatch.setenv(f"EMBED_FACTORY_CLEAN__{key}", value)
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    t0 = time.monotonic()
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "embed_factory.cli", "serve", "--max-steps", "2"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
    deployment_id = None

    def fail(message: str):
        pytest.fail(f"{message}\n--- serve log ---\n{log_path.read_text(errors='replace')[-6000:]}")

    try:
        deadline = time.monotonic() + 90
        while deployment_id is None:
            if server.poll() is not None:
                fail(f"`embed-factory serve` exited with {server.returncode}")
            if time.monotonic() > deadline:
                fail("the finetune deployment and its trigger were not registered within 90 s")
            time.sleep(1)
            deployment_id = asyncio.run(_deployment_with_trigger())
        t_served = time.monotonic()
        assert asyncio.run(_finetune_runs(deployment_id)) == [], "no fine-tune before a clean run completes"

        summary = clean(clean_id="c-trig")  # the real clean flow, in this process; Completed fires the trigger
        assert summary.counts["mined"] > 0
        t_clean = time.monotonic()

        runs = []
        deadline = time.monotonic() + 60
        while not runs:
            if time.monotonic() > deadline:
                fail("no finetune flow run was created within 60 s of the clean run completing")
            time.sleep(1)
            runs = asyncio.run(_finetune_runs(deployment_id))
        t_created = time.monotonic()
        assert len(runs) == 1
        run = runs[0]
        assert run.parameters["clean_id"] == "c-trig", run.parameters  # templated from the clean run
        assert run.parameters["max_steps"] == 2

        deadline = time.monotonic() + 150
        while not (run.state and run.state.is_final()):
            if time.monotonic() > deadline:
                fail(f"the triggered finetune run did not finish within 150 s (state {run.state_name})")
            time.sleep(2)
            run = asyncio.run(_finetune_runs(deployment_id))[0]
        if run.state.type != StateType.COMPLETED:
            fail(f"the triggered finetune run ended {run.state_name}: {run.state.message}")
        t_done = time.monotonic()
        eval_json = data_dir / "models" / "all-MiniLM-L6-v2-c-trig" / "eval.json"
        assert eval_json.exists()
        assert set(json.loads(eval_json.read_text())) == {"before", "after", "delta"}
        print(
            f"serve registered in {t_served - t0:.1f}s, clean {t_clean - t_served:.1f}s, "
            f"trigger → run created {t_created - t_clean:.1f}s, fine-tune done {t_done - t_created:.1f}s"
        )
    finally:
        stop(server)
        if deployment_id is not None:
            asyncio.run(_delete_deployment(deployment_id))
