"""Prefect deployments: the four of ``prefect.yaml``, the local worker, ad-hoc runs, and the finetune trigger.

``prefect.yaml`` (repository root) declares the deployments ``generate``, ``clean``, ``finetune`` and
``pipeline`` (generate → clean → finetune as subflows): module-path entrypoints, a
``set_working_directory`` pull step, work pools and the pipeline's cron schedule (registered
switched off). ``prefect deploy --all`` reads it as it is; :func:`register_project` (``embed-factory
deploy``) reads the same file and registers the same deployments through Prefect's Python API,
filling its ``{{ $NAME }}`` placeholders from the settings (:func:`project_values`: the work pools
``prefect.work_pool`` / ``prefect.gpu_work_pool`` and the working directory) and switching the
schedule on when asked. :func:`start_worker` runs a process worker for the local pool;
:func:`trigger` starts one deployment run with parameters checked against its schema.

The ``finetune`` deployment and its trigger, wired for Prefect 3.9:

* The deployment ``finetune/finetune`` is built from the flow ``flows.finetune.finetune`` with a
  module-path entrypoint (``flows.finetune.finetune``), so any process that has this project
  installed can run it: no code storage, no image build.
* It carries one :class:`prefect.events.DeploymentEventTrigger` (named ``finetune-after-clean``):
  ``expect={"prefect.flow-run.Completed"}`` with ``match_related={"prefect.resource.role": "flow",
  "prefect.resource.name": "clean"}``, i.e. the Completed state event of any flow run whose flow is
  ``clean``; reactive, threshold 1, evaluated ``for_each`` flow run. Clean runs of the ``pipeline``
  flow (named ``… (pipeline)``, see ``flows/pipeline.py``) are excluded by a negative match on the
  flow run's name: the pipeline fine-tunes by itself. Registering the deployment
  turns the trigger into an automation owned by the deployment whose action is ``run-deployment``
  with ``parameters={"clean_id": "{{ flow_run.parameters['clean_id'] }}", "profile":
  "{{ flow_run.parameters.get('profile') }}"}``: the server renders those Jinja templates with the
  triggering event's flow run (the clean run) fetched from its API, so the fine-tune trains on
  exactly the export that clean run wrote.
* Locally, :func:`serve_finetune` serves it (``prefect.serve``): the serving process polls the API
  for scheduled runs of the deployment and runs each in a subprocess on this machine; that process
  is the local "process pool". Runs triggered while nothing serves wait as Scheduled and start once
  ``embed-factory serve`` runs again.
* In production, :func:`register_finetune` registers the same deployment (with the same trigger)
  on the GPU work pool :data:`GPU_WORK_POOL` (``gpu-pool``; ``docker-compose.yml``'s ``worker-gpu``
  runs ``prefect worker start --pool gpu-pool --type process`` in the project's image). Override the
  pool with ``EMBED_FACTORY_FINETUNE_WORK_POOL`` or ``embed-factory serve --work-pool NAME``.

Started by hand: ``prefect deployment run 'finetune/finetune'`` (latest export, default settings) or
``prefect deployment run 'finetune/finetune' -p clean_id=c1 -p max_steps=50``.

The Prefect server must run the event services (triggers and actions); ``prefect server start``
and Prefect's ephemeral/test servers do by default.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ground.settings import Settings

#: the flow the trigger listens to, and the deployment it runs
UPSTREAM_FLOW = "clean"
FLOW_NAME = "finetune"
DEPLOYMENT_NAME = "finetune"
FULL_NAME = f"{FLOW_NAME}/{DEPLOYMENT_NAME}"
TRIGGER_NAME = "finetune-after-clean"
COMPLETED_EVENT = "prefect.flow-run.Completed"
#: production work pool of the fine-tune (a process pool whose worker sits on a GPU machine)
GPU_WORK_POOL = os.environ.get("EMBED_FACTORY_FINETUNE_WORK_POOL", "gpu-pool")
TAGS = ["embed-factory", "finetune"]


class DeployError(RuntimeError):
    """A deployment cannot be served, registered or run as asked (the message says why)."""


def clean_completed_trigger(extra_parameters: dict[str, Any] | None = None):
    """The deployment trigger: a completed ``clean`` flow run starts a fine-tune on its clean_id.

    ``extra_parameters`` are fixed flow parameters added to every triggered run (e.g. ``max_steps``);
    they cannot override ``clean_id`` and ``profile``, which come from the clean run.
    """
    from prefect.events import DeploymentEventTrigger

    parameters: dict[str, Any] = dict(extra_parameters or {})
    parameters.update({
        # Rendered by the server when the trigger fires: `flow_run` is the triggering event's flow
        # run (the clean run), read from the API. A single-expression template keeps its JSON type.
        # `profile` is optional: a run of the clean deployment stores only the parameters it was given
        # (a missing key would fail the rendering), so .get() (None: the worker's environment).
        "clean_id": "{{ flow_run.parameters['clean_id'] }}",
        "profile": "{{ flow_run.parameters.get('profile') }}",
    })
    from flows.pipeline import SUBFLOW_SUFFIX

    return DeploymentEventTrigger(
        name=TRIGGER_NAME,
        description=f"Fine-tune on the export of every `{UPSTREAM_FLOW}` flow run that completes.",
        expect={COMPLETED_EVENT},
        # not the clean stage of a pipeline run, which fine-tunes by itself ("!": negative match)
        match={"prefect.resource.id": "prefect.flow-run.*", "prefect.resource.name": f"!*{SUBFLOW_SUFFIX}"},
        match_related={"prefect.resource.role": "flow", "prefect.resource.name": UPSTREAM_FLOW},
        for_each={"prefect.resource.id"},  # each clean flow run on its own
        posture="Reactive",
        threshold=1,
        within=0,
        parameters=parameters,
    )


def build_deployment(parameters: dict[str, Any] | None = None, work_pool: str | None = None,
                     job_variables: dict[str, Any] | None = None, trigger: bool = True):
    """The ``finetune/finetune`` RunnerDeployment with its trigger.

    ``parameters``: default flow parameters of the deployment (also added to triggered runs).
    ``work_pool``: None to serve it from this process; a pool name for :func:`register_finetune`.
    """
    from prefect.deployments.runner import EntrypointType

    from flows.finetune import finetune

    parameters = {k: v for k, v in (parameters or {}).items() if v is not None}
    return finetune.to_deployment(
        name=DEPLOYMENT_NAME,
        parameters=parameters,
        triggers=[clean_completed_trigger({k: v for k, v in parameters.items()
                                           if k not in ("clean_id", "profile")})] if trigger else [],
        description=("Fine-tune an embedding model on a clean run's export and evaluate it before and after "
                     f"(runs by itself when a `{UPSTREAM_FLOW}` flow run completes)."),
        tags=TAGS,
        work_pool_name=work_pool,
        job_variables=job_variables,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def serve_finetune(settings: Settings, parameters: dict[str, Any] | None = None, limit: int = 1,
                   query_seconds: float | None = None, print_starting_message: bool = True) -> None:
    """Serve the deployment with its trigger from this process (blocking; Ctrl-C or SIGTERM stops).

    ``limit``: fine-tunes at a time (1: one model trains at once, others wait). The Prefect API is
    the current one (``PREFECT_API_URL``; the CLI sets it). ``settings`` is checked for a usable
    fine-tune configuration; each run loads its own settings (profile, environment, config file).
    """
    from prefect import serve

    _check_settings(settings)
    serve(build_deployment(parameters), limit=limit, query_seconds=query_seconds,
          print_starting_message=print_starting_message)


def register_finetune(settings: Settings, work_pool: str | None = None, parameters: dict[str, Any] | None = None,
                      job_variables: dict[str, Any] | None = None):
    """Register the deployment and its trigger on a work pool (production: ``gpu-pool``); returns its id.

    A worker of that pool runs the triggered runs (``prefect worker start --pool gpu-pool``).
    """
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    _check_settings(settings)
    pool = work_pool or GPU_WORK_POOL
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            raise DeployError(f"work pool {pool!r} does not exist; create it with "
                              f"`prefect work-pool create {pool} --type process` (and start a worker: "
                              f"`prefect worker start --pool {pool}`)") from None
    return build_deployment(parameters, work_pool=pool, job_variables=job_variables).apply(work_pool_name=pool)


def _check_settings(settings: Settings) -> None:
    cfg = settings.finetune
    if not cfg.sts_languages:
        raise DeployError("finetune.sts_languages is empty: nothing to evaluate on")


# --- the deployments of prefect.yaml ------------------------------------------------------------------
#: the project file that `prefect deploy` and `embed-factory deploy` read (repository root)
PROJECT_FILE = Path(__file__).resolve().parents[1] / "prefect.yaml"
#: ``{{ $NAME }}`` placeholders of prefect.yaml (Prefect's environment-variable templating)
_ENV_PLACEHOLDER = re.compile(r"{{\s*\$(\w+)\s*}}")
PROJECT_DIR_VAR = "EMBED_FACTORY_PROJECT_DIR"
WORK_POOL_VAR = "EMBED_FACTORY_PREFECT__WORK_POOL"
GPU_WORK_POOL_VAR = "EMBED_FACTORY_PREFECT__GPU_WORK_POOL"
#: the pipeline's schedule slug in prefect.yaml (found again on every re-deploy)
PIPELINE_SCHEDULE_SLUG = "pipeline-nightly"


@dataclass
class DeploymentSpec:
    """One deployment of prefect.yaml, placeholders filled in."""

    name: str
    entrypoint: str
    description: str | None
    tags: list[str]
    parameters: dict[str, Any]
    work_pool: str
    work_queue: str | None
    job_variables: dict[str, Any]
    pull_steps: list[dict[str, Any]]
    schedules: list[dict[str, Any]]
    triggers: list[dict[str, Any]]
    concurrency_limit: int | None = None

    @property
    def flow_name(self) -> str:
        return self.entrypoint.rsplit(".", 1)[-1]

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{self.name}"


@dataclass
class Registered:
    full_name: str
    deployment_id: str
    work_pool: str
    schedules: list[str] = field(default_factory=list)  # "cron (active|inactive)"
    triggers: list[str] = field(default_factory=list)


class _PullSteps:
    """The pull steps of prefect.yaml as a ``RunnerStorage`` (what ``prefect deploy`` passes, too)."""

    def __init__(self, steps: list[dict[str, Any]]):
        self.steps = steps
        self._base_path = Path.cwd()

    def set_base_path(self, path: Path) -> None:
        self._base_path = path

    @property
    def destination(self) -> Path:
        return self._base_path

    @property
    def pull_interval(self) -> int | None:
        return None

    async def pull_code(self) -> None:  # the code is already where the pull step points
        return None

    def to_pull_step(self) -> list[dict[str, Any]]:
        return self.steps

    def __eq__(self, other: Any) -> bool:
        return self.steps == getattr(other, "steps", None)


def project_values(settings: Settings, project_dir: str | Path | None = None) -> dict[str, str]:
    """Values of prefect.yaml's ``{{ $NAME }}`` placeholders: the same names as the settings' variables.

    The working directory of every flow run (relative data folder, embed-factory.toml) is
    ``project_dir``, else ``$EMBED_FACTORY_PROJECT_DIR``, else the current directory.
    """
    prefect = settings.prefect
    return {
        PROJECT_DIR_VAR: str(Path(project_dir or os.environ.get(PROJECT_DIR_VAR) or Path.cwd()).resolve()),
        WORK_POOL_VAR: prefect.work_pool,
        GPU_WORK_POOL_VAR: prefect.gpu_work_pool or prefect.work_pool,
    }


def _render(value: Any, values: dict[str, str], where: str) -> Any:
    """Fill ``{{ $NAME }}`` from ``values``, then the environment (as ``prefect deploy`` does)."""
    if isinstance(value, dict):
        return {k: _render(v, values, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, values, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def fill(match: re.Match) -> str:
        name = match.group(1)
        found = values.get(name, os.environ.get(name))
        if found is None:
            raise DeployError(f"{where}: placeholder {match.group(0)} has no value; set the environment variable {name}")
        return found

    return _ENV_PLACEHOLDER.sub(fill, value)


def load_project(values: dict[str, str], path: Path = PROJECT_FILE) -> list[DeploymentSpec]:
    """The deployments of ``prefect.yaml`` with their placeholders filled in."""
    import yaml

    try:
        project = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DeployError(f"{path}: no such project file") from None
    except yaml.YAMLError as exc:
        raise DeployError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(project, dict) or not isinstance(project.get("deployments"), list):
        raise DeployError(f"{path}: expected a mapping with a `deployments` list")
    top_pull = project.get("pull") or []
    specs = []
    for i, raw in enumerate(project["deployments"]):
        where = f"{path.name}: deployments[{i}]"
        for key in ("name", "entrypoint"):
            if not raw.get(key):
                raise DeployError(f"{where}: `{key}` is missing")
        if ":" in raw["entrypoint"]:
            raise DeployError(f"{where}: use a module path entrypoint (flows.x.flow), not {raw['entrypoint']!r}")
        pool = raw.get("work_pool") or {}
        if not pool.get("name"):
            raise DeployError(f"{where}: `work_pool.name` is missing")
        specs.append(DeploymentSpec(
            name=raw["name"],
            entrypoint=raw["entrypoint"],
            description=raw.get("description"),
            tags=list(raw.get("tags") or []),
            parameters=dict(raw.get("parameters") or {}),
            work_pool=_render(pool["name"], values, f"{where}.work_pool.name"),
            work_queue=pool.get("work_queue_name"),
            job_variables=_render(dict(pool.get("job_variables") or {}), values, f"{where}.job_variables"),
            pull_steps=_render(raw["pull"] if "pull" in raw else top_pull, values, f"{where}.pull"),
            schedules=list(raw.get("schedules") or []),
            triggers=list(raw.get("triggers") or []),  # parameters stay Jinja templates for the server
            concurrency_limit=raw.get("concurrency_limit"),
        ))
    return specs


def _schedule(spec: dict[str, Any], active: bool | None) -> dict[str, Any]:
    """A prefect.yaml schedule entry as ``RunnerDeployment.apply(schedules=…)`` takes it."""
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

    if spec.get("cron"):
        schedule = CronSchedule(cron=spec["cron"], timezone=spec.get("timezone"))
    elif spec.get("interval"):
        from datetime import timedelta

        schedule = IntervalSchedule(interval=timedelta(seconds=spec["interval"]), timezone=spec.get("timezone"))
    else:
        raise DeployError(f"schedule {spec}: only `cron` and `interval` schedules are supported here")
    out: dict[str, Any] = {"schedule": schedule, "active": bool(spec.get("active", True)) if active is None else active}
    for key in ("slug", "parameters"):
        if spec.get(key):
            out[key] = spec[key]
    return out


def build_from_spec(spec: DeploymentSpec, schedule_active: bool | None = None):
    """A RunnerDeployment of one prefect.yaml entry and the schedules to apply with it.

    ``schedule_active``: None keeps each schedule's ``active`` from the file; True/False overrides it.
    """
    from prefect.deployments.runner import EntrypointType
    from prefect.events.schemas.deployment_triggers import DeploymentTriggerTypes
    from prefect.flows import load_flow_from_entrypoint
    from pydantic import TypeAdapter, ValidationError

    try:
        flow = load_flow_from_entrypoint(spec.entrypoint, use_placeholder_flow=False)
    except Exception as exc:  # an entrypoint that does not import is a project-file mistake
        raise DeployError(f"{spec.full_name}: entrypoint {spec.entrypoint!r} does not load: {exc}") from None
    adapter = TypeAdapter(DeploymentTriggerTypes)
    try:
        triggers = [adapter.validate_python({"name": f"{spec.name}__automation_{i}", **t})
                    for i, t in enumerate(spec.triggers, start=1)]
    except ValidationError as exc:
        raise DeployError(f"{spec.full_name}: invalid trigger: {exc.errors()[0]['msg']}") from None
    deployment = flow.to_deployment(
        name=spec.name, description=spec.description or flow.description, tags=spec.tags,
        parameters=spec.parameters, triggers=triggers, work_pool_name=spec.work_pool,
        work_queue_name=spec.work_queue, job_variables=spec.job_variables,
        concurrency_limit=spec.concurrency_limit, entrypoint_type=EntrypointType.MODULE_PATH,
    )
    deployment.storage = _PullSteps(spec.pull_steps)
    return deployment, [_schedule(s, schedule_active) for s in spec.schedules]


def ensure_work_pool(name: str, pool_type: str = "process") -> bool:
    """Create the work pool if it does not exist (with the worker type's default job template); True if created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        template = ProcessWorker.get_default_base_job_template() if pool_type == "process" else {}
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template))
        except ObjectAlreadyExists:  # created meanwhile by a worker or another deploy
            return False
        return True


def register_project(settings: Settings, schedule: bool | None = None, project_dir: str | Path | None = None,
                     path: Path = PROJECT_FILE, create_pools: bool = True) -> list[Registered]:
    """Register every deployment of prefect.yaml (and the finetune trigger) against the current Prefect API.

    ``schedule``: True switches the pipeline's schedule on, False off; None: ``prefect.pipeline_schedule``.
    Missing work pools are created as process pools (``create_pools``), else reported.
    """
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    _check_settings(settings)
    specs = load_project(project_values(settings, project_dir), path)
    active = settings.prefect.pipeline_schedule if schedule is None else schedule
    for pool in dict.fromkeys(s.work_pool for s in specs):
        if create_pools:
            ensure_work_pool(pool)
        else:
            with get_client(sync_client=True) as client:
                try:
                    client.read_work_pool(pool)
                except ObjectNotFound:
                    raise DeployError(f"work pool {pool!r} does not exist; create it with "
                                      f"`prefect work-pool create {pool} --type process`") from None
    registered = []
    for spec in specs:
        deployment, schedules = build_from_spec(spec, active if spec.schedules else None)
        deployment_id = deployment.apply(schedules=schedules or None)  # None: no schedules to set
        registered.append(Registered(
            spec.full_name, str(deployment_id), spec.work_pool,
            [f"{s['schedule'].cron if hasattr(s['schedule'], 'cron') else s['schedule'].interval} "
             f"({'active' if s['active'] else 'inactive'})" for s in schedules],
            [t.name for t in deployment.triggers]))
    return registered


# --- the local worker -------------------------------------------------------------------------------
def start_worker(pool: str, limit: int | None = 1, run_once: bool = False, name: str | None = None) -> None:
    """Run a Prefect process worker for ``pool`` in this process (blocking; Ctrl-C stops it).

    It polls the API for scheduled runs of the pool's deployments and runs each in a subprocess;
    the pull step of the deployment moves that subprocess into the project directory.
    """
    import asyncio

    from prefect.workers.process import ProcessWorker

    ensure_work_pool(pool)
    asyncio.run(ProcessWorker(work_pool_name=pool, limit=limit, name=name).start(run_once=run_once))


# --- ad-hoc runs --------------------------------------------------------------------------------------
def parse_param_pairs(pairs: list[str]) -> dict[str, str]:
    """``["k=v", …]`` → ``{"k": "v"}`` (raw text; :func:`coerce_parameters` types it)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise DeployError(f"--param {pair!r}: expected NAME=VALUE, e.g. --param examples=12")
        if key in out:
            raise DeployError(f"--param {key} given twice")
        out[key] = value
    return out


def _json_types(prop: dict[str, Any], definitions: dict[str, Any]) -> set[str]:
    """The JSON types a parameter's schema allows (through anyOf/allOf/$ref)."""
    if "$ref" in prop:
        return _json_types(definitions.get(prop["$ref"].rsplit("/", 1)[-1], {}), definitions)
    types = set()
    if "type" in prop:
        types |= set(prop["type"] if isinstance(prop["type"], list) else [prop["type"]])
    if "enum" in prop and "type" not in prop:
        types |= {_JSON_TYPE.get(type(v), "string") for v in prop["enum"]}
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in prop.get(key, []):
            types |= _json_types(sub, definitions)
    return types


_JSON_TYPE = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
              type(None): "null"}


def coerce_parameters(raw: dict[str, str], schema: dict[str, Any], deployment: str,
                      defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Type ``--param`` values by the deployment's parameter schema and validate them; one-line errors.

    A value is JSON when it parses as JSON (``6``, ``true``, ``null``, ``["a","b"]``), else text; for an
    array parameter, text is split on commas (``task_types=retrieval,sts``); for a text parameter,
    ``run_id=123`` stays the text ``"123"``. ``defaults``: the deployment's own parameters (they count
    for required parameters).
    """
    from prefect.exceptions import ParameterTypeError
    from prefect.utilities.schema_tools import ValidationError, validate

    props = schema.get("properties") or {}
    definitions = schema.get("definitions") or schema.get("$defs") or {}
    out: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in props:
            raise DeployError(f"{deployment} has no parameter {key!r}; parameters: {', '.join(props) or 'none'}")
        types = _json_types(props[key], definitions)
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        kind = _JSON_TYPE.get(type(value), "string")
        if isinstance(value, str) and "array" in types and "string" not in types:
            value = [item.strip() for item in value.split(",") if item.strip()]
        elif kind not in types and not (kind == "integer" and "number" in types) and "string" in types:
            value = text
        out[key] = value
    try:
        validate({**(defaults or {}), **out}, schema, raise_on_error=True, ignore_required=True)
    except (ValidationError, ParameterTypeError) as exc:
        raise DeployError(f"{deployment}: {_validation_message(str(exc), out, props, definitions)}") from None
    missing = [k for k in schema.get("required") or [] if k not in {**(defaults or {}), **out}]
    if missing:
        raise DeployError(f"{deployment}: parameter {missing[0]} is required: add --param {missing[0]}=VALUE")
    return out


def _validation_message(text: str, values: dict[str, Any], props: dict[str, Any], definitions: dict[str, Any]) -> str:
    """Prefect's "Validation failed for field 'x'. Failure reason: …" as one short line about the parameter."""
    found = re.match(r"Validation failed(?: for field '([^']+)')?\. Failure reason: (.*)", text, re.S)
    if not found:
        return text.splitlines()[0]
    where, reason = found.group(1), found.group(2).strip()
    if where is None:
        return reason
    key = re.split(r"[.\[]", where, maxsplit=1)[0]
    if "is not valid under any of the given schemas" in reason and key in props:
        expected = " or ".join(sorted(_json_types(props[key], definitions))) or "valid"
        reason = f"{values.get(key)!r} is not {expected}"
    return f"parameter {where}: {reason}"


def resolve_deployment(name: str):
    """The deployment called ``name``: ``flow/deployment``, or a deployment name that is unique."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        if "/" in name:
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                pass
            found = []
        else:
            found = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(sorted(f"{_flow_name(client, d.flow_id)}/{d.name}" for d in found))
            raise DeployError(f"{name!r} names several deployments ({names}); give FLOW/DEPLOYMENT")
        known = sorted(f"{_flow_name(client, d.flow_id)}/{d.name}" for d in client.read_deployments())
        hint = f"deployments: {', '.join(known)}" if known else "no deployments yet; run `embed-factory deploy` first"
        raise DeployError(f"no deployment {name!r}; {hint}")


def _flow_name(client, flow_id) -> str:
    return client.read_flow(flow_id).name


def trigger(name: str, param_pairs: list[str], wait: bool = True, poll_s: float = 2.0,
            say: Callable[[str], None] = lambda _: None, worker_hint_s: float = 15.0):
    """Start a run of deployment ``name`` with ``--param`` pairs; with ``wait``, return it once final.

    Returns ``(flow_run, full_name)``. While it waits, each state change is reported through
    ``say``; a run still Scheduled after ``worker_hint_s`` with no online worker in its pool gets a hint.
    """
    import time

    from prefect import get_client
    from prefect.deployments import run_deployment

    deployment = resolve_deployment(name)
    with get_client(sync_client=True) as client:
        full_name = f"{_flow_name(client, deployment.flow_id)}/{deployment.name}"
    parameters = coerce_parameters(parse_param_pairs(param_pairs), deployment.parameter_openapi_schema or {},
                                   full_name, deployment.parameters)
    run = run_deployment(deployment.id, parameters=parameters, timeout=0, as_subflow=False)
    say(f"{full_name}: flow run {run.name!r} ({run.id}) {run.state_name}")
    if not wait:
        return run, full_name
    last, started, hinted = run.state_name, time.monotonic(), False
    with get_client(sync_client=True) as client:
        while not (run.state and run.state.is_final()):
            time.sleep(poll_s)
            run = client.read_flow_run(run.id)
            if run.state_name != last:
                last = run.state_name
                say(f"{run.name}: {last}")
            if (not hinted and run.state and run.state.is_scheduled() and deployment.work_pool_name
                    and time.monotonic() - started > worker_hint_s):
                hinted = True
                if not _online_workers(client, deployment.work_pool_name):
                    say(f"no worker of work pool {deployment.work_pool_name!r} is online; start one with "
                        f"`embed-factory deploy` or `prefect worker start --pool {deployment.work_pool_name}`")
    return run, full_name


def _online_workers(client, pool: str) -> list:
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

    try:
        return client.read_workers_for_work_pool(
            pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"])))
    except Exception:  # the hint is best effort
        return [None]
