"""`embed-factory deploy` / `trigger` against a Prefect server, and a worker that runs a triggered run.

* Against the session's Prefect test server: ``register_project`` registers the four deployments
  exactly as the real ``prefect deploy --all`` does from the same file (pools, pull step, schedule,
  parameters, trigger); ``--schedule`` switches the schedule on; the CLI's user errors.
* ``embed-factory deploy`` registers and runs a real process worker; ``embed-factory trigger generate``
  (6 examples, 2 task types, the stub LLM server: the model is not the subject here) completes
  and its shards are in the (relative) data folder of the flow run's working directory; then
  ``embed-factory trigger clean`` completes and the finetune trigger has the worker fine-tune on it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embed_factory.deployments import project as prefect_yaml
from ground.settings import load_settings
from support.cli_process import ROOT, cli
from support.deployments import EXPECTED, TINY, wait_for_worker
from support.processes import start_deploy, stop


# --- against a Prefect server ----------------------------------------------------------------------------
async def _read_deployments() -> dict:
    from prefect import get_client

    async with get_client() as client:
        out = {}
        for name in EXPECTED:
            d = await client.read_deployment_by_name(f"{name}/{name}")
            automations = await client.read_resource_related_automations(f"prefect.deployment.{d.id}")
            out[name] = {
                "id": d.id,
                "entrypoint": d.entrypoint,
                "work_pool": d.work_pool_name,
                "pull_steps": d.pull_steps,
                "parameters": d.parameters,
                "tags": sorted(d.tags),
                "description": d.description,
                "schema": d.parameter_openapi_schema,
                "schedules": sorted((s.slug, s.schedule.cron, s.active) for s in d.schedules),
                "triggers": sorted(
                    (
                        a.name,
                        str(a.trigger.match),
                        str(a.trigger.match_related),
                        str(getattr(a.actions[0], "parameters", None)),
                    )
                    for a in automations
                ),
            }
        return out


async def _remove_everything(pools=("local-pool",)) -> None:
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        for name in EXPECTED:
            try:
                d = await client.read_deployment_by_name(f"{name}/{name}")
            except ObjectNotFound:
                continue
            for run in await client.read_flow_runs(deployment_filter=_deployment_filter(d.id)):
                await client.delete_flow_run(run.id)
            await client.delete_resource_owned_automations(f"prefect.deployment.{d.id}")
            await client.delete_deployment(d.id)
        for pool in pools:
            try:
                await client.delete_work_pool(pool)
            except ObjectNotFound:
                pass


def _deployment_filter(deployment_id):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))


@pytest.fixture
def clean_server(prefect_api_url, monkeypatch):
    """The session's test server, without this file's deployments, pools and runs before and after."""
    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)
    for name in (
        "EMBED_FACTORY_PREFECT__WORK_POOL",
        "EMBED_FACTORY_PREFECT__GPU_WORK_POOL",
        "EMBED_FACTORY_PREFECT__PIPELINE_SCHEDULE",
        prefect_yaml.PROJECT_DIR_VAR,
    ):
        monkeypatch.delenv(name, raising=False)
    asyncio.run(_remove_everything())
    yield prefect_api_url
    asyncio.run(_remove_everything())


def test_register_matches_prefect_deploy(clean_server, tmp_path):
    """`prefect deploy --all` on prefect.yaml and register_project register the same deployments."""
    settings = load_settings()
    prefect_yaml.ensure_work_pool("local-pool")
    env = {
        "PREFECT_API_URL": clean_server,
        "EMBED_FACTORY_PREFECT__WORK_POOL": "local-pool",
        "EMBED_FACTORY_PREFECT__GPU_WORK_POOL": "local-pool",
        prefect_yaml.PROJECT_DIR_VAR: str(tmp_path),
    }
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    by_prefect = asyncio.run(_read_deployments())
    t_prefect = time.monotonic() - started

    started = time.monotonic()
    registered = prefect_yaml.register_project(settings, project_dir=tmp_path)
    t_ours = time.monotonic() - started
    ours = asyncio.run(_read_deployments())
    print(f"prefect deploy --all {t_prefect:.1f}s, register_project {t_ours:.1f}s")

    assert [r.full_name for r in registered] == [f"{n}/{n}" for n in EXPECTED]
    for name in EXPECTED:
        assert ours[name] == by_prefect[name], name  # same ids too: re-registered, not duplicated
        assert ours[name]["entrypoint"] == EXPECTED[name]
        assert ours[name]["work_pool"] == "local-pool"
        assert ours[name]["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(tmp_path)}}
        ]
    assert ours["pipeline"]["schedules"] == [("pipeline-nightly", "0 3 * * *", False)]
    assert [t[0] for t in ours["finetune"]["triggers"]] == ["finetune-after-clean"]
    assert "!* (pipeline)" in ours["finetune"]["triggers"][0][1]
    assert "flow_run.parameters['clean_id']" in ours["finetune"]["triggers"][0][3]
    assert ours["pipeline"]["schema"]["properties"]["examples"]["description"]

    # one flag switches the schedule on (and re-deploying without it switches it off again)
    prefect_yaml.register_project(settings, schedule=True, project_dir=tmp_path)
    assert asyncio.run(_read_deployments())["pipeline"]["schedules"] == [("pipeline-nightly", "0 3 * * *", True)]
    prefect_yaml.register_project(settings, project_dir=tmp_path)
    assert asyncio.run(_read_deployments())["pipeline"]["schedules"] == [("pipeline-nightly", "0 3 * * *", False)]


def test_cli_trigger_user_errors(clean_server, tmp_path):
    env = {"PREFECT_API_URL": clean_server}
    result = cli("trigger", "pipeline", env=env)
    assert result.returncode == 1
    assert "no deployment 'pipeline'" in result.stderr

    prefect_yaml.register_project(load_settings(), project_dir=tmp_path)
    for args, message in [
        (
            ["trigger", "pipelin"],  # a bare name is one of prefect.yaml's, checked before the server
            "no deployment 'pipelin' in prefect.yaml (deployments: pipeline, ",
        ),
        (["trigger", "pipeline", "-p", "examples=many"], "parameter examples: 'many' is not integer or null"),
        (["trigger", "generate", "--param", "oops"], "expected NAME=VALUE"),
        (["trigger", "generate"], "parameter run_id is required"),
    ]:
        result = cli(*args, env=env)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert message in result.stderr.replace("\n", ""), (args, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 3, result.stderr

    # --no-wait: the run is created (Scheduled: no worker here) and the command returns at once
    result = cli("trigger", "clean", "-p", "clean_id=c-nowait", "--no-wait", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("clean/clean: flow run ") and " Scheduled " in result.stdout, result.stdout


# --- a real worker runs a triggered deployment ------------------------------------------------------------
def wait_for_triggered_finetune(clean_id: str, log: Path, timeout: float = 300):
    """The finetune flow run that the trigger created for ``clean_id``, once final (fails unless Completed)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            runs = [
                r
                for r in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["finetune"])))
                if (r.parameters or {}).get("clean_id") == clean_id
            ]
        if runs and runs[0].state and runs[0].state.is_final():
            assert len(runs) == 1 and runs[0].state.is_completed(), (runs[0].state, log.read_text()[-4000:])
            return runs[0]
        if time.monotonic() > deadline:
            pytest.fail(
                f"no completed finetune run for {clean_id} within {timeout:.0f}s ({runs}):\n{log.read_text()[-4000:]}"
            )
        time.sleep(2)


def test_deploy_then_trigger_generate_runs_on_the_worker(stub_llm_env, clean_server, tmp_path):
    project = tmp_path / "project"  # the flow run's working directory (prefect.yaml's pull step)
    project.mkdir()
    # a relative data folder: the shards land under the project only if the run starts there
    env = {
        **os.environ,
        **TINY,
        "PREFECT_API_URL": clean_server,
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "EMBED_FACTORY_STORAGE__DATA_DIR": "data",
    }
    log = tmp_path / "deploy.log"
    t0 = time.monotonic()
    worker = start_deploy(project, env, log)
    try:
        wait_for_worker("local-pool", worker, log)
        t_ready = time.monotonic()
        result = cli(
            "trigger",
            "generate",
            "-p",
            "run_id=dep-1",
            "-p",
            "examples=6",
            "-p",
            "task_types=retrieval,sts",
            env={"PREFECT_API_URL": clean_server},
            timeout=600,
        )
        t_done = time.monotonic()
        assert result.returncode == 0, result.stdout + result.stderr + log.read_text()[-4000:]
        assert "generate/generate: flow run generate-dep-1 Completed" in result.stdout
        shards = sorted((project / "data" / "runs" / "dep-1" / "examples").glob("*.parquet"))
        assert shards, f"no shards under {project}/data: the flow run did not start in the project directory"
        import pyarrow.parquet as pq

        rows = [row for path in shards for row in pq.read_table(path, columns=["task_type"]).to_pylist()]
        assert rows and {r["task_type"] for r in rows} <= {"retrieval", "sts"}, rows
        print(f"deploy + worker ready in {t_ready - t0:.1f}s; triggered generate completed in {t_done - t_ready:.1f}s")

        # a clean deployment run given only its id: on Completed, the finetune trigger starts a fine-tune
        result = cli("trigger", "clean", "-p", "clean_id=c-dep", env={"PREFECT_API_URL": clean_server}, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr + log.read_text()[-4000:]
        t_clean = time.monotonic()
        finetune = wait_for_triggered_finetune("c-dep", log)
        assert finetune.parameters == {"clean_id": "c-dep", "profile": None}, finetune.parameters
        assert (project / "data" / "models" / "all-MiniLM-L6-v2-c-dep" / "eval.json").exists()
        print(f"clean {t_clean - t_done:.1f}s, triggered finetune done {time.monotonic() - t_clean:.1f}s later")
    finally:
        stop(worker)
    text = log.read_text()
    assert "generate/generate" in text and "local-pool" in text  # the deployments table
