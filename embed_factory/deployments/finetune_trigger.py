"""The ``finetune`` deployment and its trigger, wired for Prefect 3.9:

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
* Locally, :func:`embed_factory.deployments.serving.serve_finetune` serves it (``prefect.serve``):
  the serving process polls the API for scheduled runs of the deployment and runs each in a
  subprocess on this machine; that process is the local "process pool". Runs triggered while
  nothing serves wait as Scheduled and start once ``embed-factory serve`` runs again.
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

import os
from typing import Any

from embed_factory.deployments import DeployError
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


def clean_completed_trigger(extra_parameters: dict[str, Any] | None = None):
    """The deployment trigger: a completed ``clean`` flow run starts a fine-tune on its clean_id.

    ``extra_parameters`` are fixed flow parameters added to every triggered run (e.g. ``max_steps``);
    they cannot override ``clean_id`` and ``profile``, which come from the clean run.
    """
    from prefect.events import DeploymentEventTrigger

    parameters: dict[str, Any] = dict(extra_parameters or {})
    parameters.update(
        {
            # Rendered by the server when the trigger fires: `flow_run` is the triggering event's flow
            # run (the clean run), read from the API. A single-expression template keeps its JSON type.
            # `profile` is optional: a run of the clean deployment stores only the parameters it was given
            # (a missing key would fail the rendering), so .get() (None: the worker's environment).
            "clean_id": "{{ flow_run.parameters['clean_id'] }}",
            "profile": "{{ flow_run.parameters.get('profile') }}",
        }
    )
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


def build_deployment(
    parameters: dict[str, Any] | None = None,
    work_pool: str | None = None,
    job_variables: dict[str, Any] | None = None,
    trigger: bool = True,
):
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
        triggers=[clean_completed_trigger({k: v for k, v in parameters.items() if k not in ("clean_id", "profile")})]
        if trigger
        else [],
        description=(
            "Fine-tune an embedding model on a clean run's export and evaluate it before and after "
            f"(runs by itself when a `{UPSTREAM_FLOW}` flow run completes)."
        ),
        tags=TAGS,
        work_pool_name=work_pool,
        job_variables=job_variables,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def register_finetune(
    settings: Settings,
    work_pool: str | None = None,
    parameters: dict[str, Any] | None = None,
    job_variables: dict[str, Any] | None = None,
):
    """Register the deployment and its trigger on a work pool (production: ``gpu-pool``); returns its id.

    A worker of that pool runs the triggered runs (``prefect worker start --pool gpu-pool``).
    """
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    check_settings(settings)
    pool = work_pool or GPU_WORK_POOL
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            raise DeployError(
                f"work pool {pool!r} does not exist; create it with "
                f"`prefect work-pool create {pool} --type process` (and start a worker: "
                f"`prefect worker start --pool {pool}`)"
            ) from None
    return build_deployment(parameters, work_pool=pool, job_variables=job_variables).apply(work_pool_name=pool)


def check_settings(settings: Settings) -> None:
    """A usable fine-tune configuration, else a DeployError."""
    cfg = settings.finetune
    if not cfg.sts_languages:
        raise DeployError("finetune.sts_languages is empty: nothing to evaluate on")
