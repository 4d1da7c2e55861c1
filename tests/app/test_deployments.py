"""The deployments of prefect.yaml and `embed-factory deploy` / `trigger` parameters, without a server.

prefect.yaml passes Prefect's own project-file model, every entrypoint loads the flow it names, file
parameters match the flow signatures, every flow parameter has a type and a description (the UI
form), pools and the schedule per profile, the file's finetune trigger equals
``clean_completed_trigger()``, and Prefect's server-side matcher skips a pipeline's clean runs;
``--param`` parsing and its one-line errors. Against a server: ``test_deployment_server.py``.
"""

from __future__ import annotations

import inspect

import pytest
import yaml

from embed_factory.deployments import DeployError
from embed_factory.deployments import project as prefect_yaml
from embed_factory.deployments.finetune_trigger import clean_completed_trigger
from embed_factory.deployments.runs import coerce_parameters, parse_param_pairs
from ground.settings import load_settings
from support.cli_process import ROOT, cli
from support.deployments import EXPECTED


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
    assert production == {
        "generate": "cpu-pool",
        "clean": "gpu-pool",
        "finetune": "gpu-pool",
        "pipeline": "cpu-pool",
        "import_data": "cpu-pool",
    }

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
