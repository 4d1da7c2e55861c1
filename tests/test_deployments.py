"""The deployments of prefect.yaml, `embed-factory deploy` / `trigger`, and a worker that runs a triggered run.

* No server: prefect.yaml passes Prefect's own project-file model, every entrypoint loads the flow
  it names, file parameters match the flow signatures, every flow parameter has a type and a
  description (the UI form), pools and the schedule per profile, the file's finetune trigger equals
  ``clean_completed_trigger()``, and Prefect's server-side matcher skips a pipeline's clean runs;
  ``--param`` parsing and its one-line errors.
* Against the session's Prefect test server: ``register_project`` registers the four deployments
  exactly as the real ``prefect deploy --all`` does from the same file (pools, pull step, schedule,
  parameters, trigger); ``--schedule`` switches the schedule on; the CLI's user errors.
* ``llm`` (~1-2 min): ``embed-factory deploy`` registers and runs a real process worker;
  ``embed-factory trigger generate`` (6 examples, 2 task types, the embedded vLLM server) completes
  and its shards are in the (relative) data folder of the flow run's working directory; then
  ``embed-factory trigger clean`` completes and the finetune trigger has the worker fine-tune on it.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from embed_factory.deployments import DeployError
from embed_factory.deployments import project as prefect_yaml
from embed_factory.deployments.finetune_trigger import clean_completed_trigger
from embed_factory.deployments.runs import coerce_parameters, parse_param_pairs
from ground.settings import load_settings
from processes import start_deploy, stop

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {
    "generate": "flows.generate.generate",
    "clean": "flows.clean.clean",
    "finetune": "flows.finetune.finetune",
    "pipeline": "flows.pipeline.pipeline",
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


def cli(*args: str, env: dict[str, str] | None = None, cwd=ROOT, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "embed_factory.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=timeout,
    )


def local_specs(**settings_overrides) -> list[prefect_yaml.DeploymentSpec]:
    settings = load_settings(**settings_overrides)
    return prefect_yaml.load_project(prefect_yaml.project_values(settings, ROOT))


# --- prefect.yaml, no server ----------------------------------------------------------------------------
def test_prefect_yaml_passes_prefects_own_model():
    from prefect.cli.deploy._models import PrefectYamlModel  # what `prefect deploy` validates the file with

    raw = yaml.safe_load(prefect_yaml.PROJECT_FILE.read_text())
    model = PrefectYamlModel.model_validate(raw)
    assert [d.name for d in model.deployments] == list(EXPECTED)
    assert {d.name: d.entrypoint for d in model.deployments} == EXPECTED
    assert raw["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $EMBED_FACTORY_PROJECT_DIR }}"}}
    ]


def test_entrypoints_load_and_parameters_match_the_flows():
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    for spec in local_specs():
        flow = load_flow_from_entrypoint(spec.entrypoint, use_placeholder_flow=False)
        assert flow.name == spec.name == spec.flow_name
        signature = inspect.signature(flow.fn)
        assert set(spec.parameters) <= set(signature.parameters), spec.name
        schema = parameter_schema(flow).model_dump()
        assert list(schema["properties"]) == list(signature.parameters)
        for name, prop in schema["properties"].items():  # the UI form: a type and a description each
            assert prop.get("description"), f"{spec.name}.{name} has no description (Args: in the docstring)"
            assert "<" not in prop["description"], f"{spec.name}.{name}: the UI renders <...> as a tag (hidden)"
            assert "type" in prop or "anyOf" in prop, f"{spec.name}.{name} has no type"
        assert spec.description


def test_pools_schedule_and_pull_step_per_profile(monkeypatch):
    monkeypatch.delenv("EMBED_FACTORY_PREFECT__WORK_POOL", raising=False)
    monkeypatch.delenv("EMBED_FACTORY_PREFECT__GPU_WORK_POOL", raising=False)
    local = {s.name: s for s in local_specs()}
    assert {s.work_pool for s in local.values()} == {"local-pool"}
    assert local["generate"].pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
    ]
    production = {s.name: s.work_pool for s in local_specs(profile="production")}
    assert production == {"generate": "cpu-pool", "clean": "gpu-pool", "finetune": "gpu-pool", "pipeline": "cpu-pool"}

    (schedule,) = local["pipeline"].schedules
    assert schedule["active"] is False and schedule["slug"] == prefect_yaml.PIPELINE_SCHEDULE_SLUG
    assert [s for n, s in local.items() if n != "pipeline" and s.schedules] == []
    assert prefect_yaml._schedule(schedule, None)["active"] is False  # off by default
    switched_on = prefect_yaml._schedule(schedule, True)
    assert switched_on["active"] is True and switched_on["schedule"].cron == "0 3 * * *"


def test_yaml_trigger_is_the_python_trigger():
    from prefect.events.schemas.deployment_triggers import DeploymentTriggerTypes
    from pydantic import TypeAdapter

    finetune = next(s for s in local_specs() if s.name == "finetune")
    (spec,) = finetune.triggers
    from_yaml = TypeAdapter(DeploymentTriggerTypes).validate_python(spec)
    assert from_yaml.model_dump() == clean_completed_trigger().model_dump()


@pytest.mark.parametrize("run_name, fires", [("clean-c1", True), ("clean-c1 (pipeline)", False)])
def test_trigger_skips_the_clean_stage_of_a_pipeline(run_name, fires):
    """Prefect's own server-side matcher on the Completed event of a clean flow run."""
    from uuid import uuid4

    from prefect.server.events.schemas.automations import EventTrigger
    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.types._datetime import now

    python_trigger = clean_completed_trigger()
    python_trigger.set_deployment_id(uuid4())
    automation = python_trigger.as_automation()
    trigger = EventTrigger.model_validate(automation.trigger.model_dump())
    event = ReceivedEvent(
        occurred=now("UTC"),
        event="prefect.flow-run.Completed",
        resource={"prefect.resource.id": f"prefect.flow-run.{uuid4()}", "prefect.resource.name": run_name},
        related=[
            {
                "prefect.resource.id": f"prefect.flow.{uuid4()}",
                "prefect.resource.role": "flow",
                "prefect.resource.name": "clean",
            }
        ],
        id=uuid4(),
    )
    assert trigger.covers(event) is fires
    other_flow = event.model_copy(update={"related": [{**event.related[0].root, "prefect.resource.name": "generate"}]})
    assert trigger.covers(other_flow) is False


@pytest.mark.parametrize(
    "clean_parameters, expected",
    [
        ({"clean_id": "c1"}, {"clean_id": "c1", "profile": None}),  # a clean deployment run given only its id
        ({"clean_id": "c1", "profile": None, "runs": None}, {"clean_id": "c1", "profile": None}),
        ({"clean_id": "c1", "profile": "production"}, {"clean_id": "c1", "profile": "production"}),
    ],
)
def test_trigger_parameters_render_from_the_clean_run(clean_parameters, expected):
    """The server's own rendering of the run-deployment action (a missing key must not break it)."""
    from types import SimpleNamespace

    from prefect.server.events.actions import RunDeployment
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    parameters = dict(clean_completed_trigger({"max_steps": 2}).parameters)
    RunDeployment._upgrade_v1_templates(parameters)  # what the server does with these templates
    context = HydrationContext(
        raise_on_error=True, render_jinja=True, jinja_context={"flow_run": SimpleNamespace(parameters=clean_parameters)}
    )
    assert hydrate(parameters, context) == {**expected, "max_steps": 2}


def test_a_placeholder_without_value_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    project = tmp_path / "prefect.yaml"
    project.write_text(
        "deployments:\n  - name: x\n    entrypoint: flows.clean.clean\n"
        "    work_pool:\n      name: '{{ $NOT_SET_ANYWHERE }}'\n"
    )
    with pytest.raises(DeployError, match=r"deployments\[0\]\.work_pool\.name: .*NOT_SET_ANYWHERE"):
        prefect_yaml.load_project({}, project)
    project.write_text("deployments:\n  - name: x\n    entrypoint: flows/clean.py:clean\n    work_pool: {name: p}\n")
    with pytest.raises(DeployError, match="module path entrypoint"):
        prefect_yaml.load_project({}, project)


# --- --param ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline_schema() -> dict:
    spec = next(s for s in local_specs() if s.name == "pipeline")
    deployment, _ = prefect_yaml.build_from_spec(spec)
    return deployment._parameter_openapi_schema.model_dump(exclude_unset=True)


def test_params_are_typed_by_the_schema(pipeline_schema):
    raw = parse_param_pairs(
        [
            "examples=6",
            "task_types=retrieval,sts",
            "run_id=123",
            "finetune=false",
            "max_steps=null",
            "profile=local",
            "seed=7",
            'clean_id="c=1"',
        ]
    )
    assert coerce_parameters(raw, pipeline_schema, "pipeline/pipeline") == {
        "examples": 6,
        "task_types": ["retrieval", "sts"],
        "run_id": "123",
        "finetune": False,
        "max_steps": None,
        "profile": "local",
        "seed": 7,
        "clean_id": "c=1",
    }
    raw = parse_param_pairs(['task_types=["bitext"]'])
    assert coerce_parameters(raw, pipeline_schema, "p")["task_types"] == ["bitext"]


@pytest.mark.parametrize(
    "pairs, message",
    [
        (["examples"], "expected NAME=VALUE"),
        (["=3"], "expected NAME=VALUE"),
        (["seed=1", "seed=2"], "--param seed given twice"),
        (["nope=1"], "has no parameter 'nope'; parameters: run_id, examples"),
        (["examples=abc"], "parameter examples: 'abc' is not integer or null"),
        (["examples=1.5"], "parameter examples: 1.5 is not integer or null"),
        (["task_types=retrieval,poetry"], "parameter task_types[1]: 'poetry' is not one of"),
        (["profile=prod"], "parameter profile: 'prod' is not one of ['local', 'production']"),
        (["finetune=maybe"], "parameter finetune: 'maybe' is not of type 'boolean'"),
    ],
)
def test_bad_params_are_one_line_errors(pipeline_schema, pairs, message):
    with pytest.raises(DeployError) as caught:
        coerce_parameters(parse_param_pairs(pairs), pipeline_schema, "pipeline/pipeline")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_required_parameter_is_named():
    spec = next(s for s in local_specs() if s.name == "generate")
    deployment, _ = prefect_yaml.build_from_spec(spec)
    schema = deployment._parameter_openapi_schema.model_dump(exclude_unset=True)
    with pytest.raises(DeployError, match="parameter run_id is required: add --param run_id=VALUE"):
        coerce_parameters({"examples": "3"}, schema, "generate/generate")
    with pytest.raises(DeployError, match="parameter examples: 'x' is not integer or null"):
        coerce_parameters({"examples": "x"}, schema, "generate/generate")  # type errors first


@pytest.mark.parametrize("command", ["deploy", "trigger"])
def test_cli_help(command):
    result = cli(command, "--help", timeout=120)
    assert result.returncode == 0
    assert "Usage" in result.stdout and ("--no-worker" in result.stdout or "--no-wait" in result.stdout)


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
            ["trigger", "pipelin"],
            "no deployment 'pipelin'; deployments: clean/clean, finetune/finetune, generate/generate",
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


@pytest.mark.llm
def test_deploy_then_trigger_generate_runs_on_the_worker(llm_base_url, clean_server, tmp_path):
    project = tmp_path / "project"  # the flow run's working directory (prefect.yaml's pull step)
    project.mkdir()
    # a relative data folder: the shards land under the project only if the run starts there
    env = {
        **os.environ,
        **TINY,
        "PREFECT_API_URL": clean_server,
        "EMBED_FACTORY_KEEP_LLM": "1",
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
