"""The deployments of ``prefect.yaml``: read, fill in and register them through Prefect's Python API.

``prefect.yaml`` (repository root) declares the deployments ``generate``, ``clean``, ``finetune`` and
``pipeline`` (generate → clean → finetune as subflows): module-path entrypoints, a
``set_working_directory`` pull step, work pools and the pipeline's cron schedule (registered
switched off). ``prefect deploy --all`` reads it as it is; :func:`register_project` (``embed-factory
deploy``) reads the same file and registers the same deployments through Prefect's Python API,
filling its ``{{ $NAME }}`` placeholders from the settings (:func:`project_values`: the work pools
``prefect.work_pool`` / ``prefect.gpu_work_pool`` and the working directory) and switching the
schedule on when asked.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embed_factory.deployments import DeployError
from embed_factory.deployments.finetune_trigger import check_settings
from ground.settings import Settings

#: the project file that `prefect deploy` and `embed-factory deploy` read (repository root)
PROJECT_FILE = Path(__file__).resolve().parents[2] / "prefect.yaml"
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
            raise DeployError(
                f"{where}: placeholder {match.group(0)} has no value; set the environment variable {name}"
            )
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
        specs.append(
            DeploymentSpec(
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
            )
        )
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
        triggers = [
            adapter.validate_python({"name": f"{spec.name}__automation_{i}", **t})
            for i, t in enumerate(spec.triggers, start=1)
        ]
    except ValidationError as exc:
        raise DeployError(f"{spec.full_name}: invalid trigger: {exc.errors()[0]['msg']}") from None
    deployment = flow.to_deployment(
        name=spec.name,
        description=spec.description or flow.description,
        tags=spec.tags,
        parameters=spec.parameters,
        triggers=triggers,
        work_pool_name=spec.work_pool,
        work_queue_name=spec.work_queue,
        job_variables=spec.job_variables,
        concurrency_limit=spec.concurrency_limit,
        entrypoint_type=EntrypointType.MODULE_PATH,
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


def register_project(
    settings: Settings,
    schedule: bool | None = None,
    project_dir: str | Path | None = None,
    path: Path = PROJECT_FILE,
    create_pools: bool = True,
) -> list[Registered]:
    """Register every deployment of prefect.yaml (and the finetune trigger) against the current Prefect API.

    ``schedule``: True switches the pipeline's schedule on, False off; None: ``prefect.pipeline_schedule``.
    Missing work pools are created as process pools (``create_pools``), else reported.
    """
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    check_settings(settings)
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
                    raise DeployError(
                        f"work pool {pool!r} does not exist; create it with "
                        f"`prefect work-pool create {pool} --type process`"
                    ) from None
    registered = []
    for spec in specs:
        deployment, schedules = build_from_spec(spec, active if spec.schedules else None)
        deployment_id = deployment.apply(schedules=schedules or None)  # None: no schedules to set
        registered.append(
            Registered(
                spec.full_name,
                str(deployment_id),
                spec.work_pool,
                [
                    f"{s['schedule'].cron if hasattr(s['schedule'], 'cron') else s['schedule'].interval} "
                    f"({'active' if s['active'] else 'inactive'})"
                    for s in schedules
                ],
                [t.name for t in deployment.triggers],
            )
        )
    return registered
