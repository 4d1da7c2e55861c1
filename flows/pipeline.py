"""Flow ``pipeline``: generate → clean → finetune, each stage the existing flow run as a subflow.

Orchestration only: the stages are ``flows.generate.generate``, ``flows.clean.clean`` and
``flows.finetune.finetune``, called as subflows, so the Prefect UI shows one pipeline run with
three child flow runs and their task runs. The deployment ``pipeline/pipeline`` (``prefect.yaml``)
runs it on the process work pool; its nightly cron schedule is registered switched off unless
``embed-factory deploy --schedule`` (or ``prefect.pipeline_schedule = true``).

The subflow runs are named ``<stage>-<id> (pipeline)``: the ``finetune`` deployment's trigger (a
completed ``clean`` flow run starts a fine-tune, ``embed_factory/deployments/finetune_trigger.py``)
skips clean runs whose name ends in :data:`SUBFLOW_SUFFIX`, because the pipeline fine-tunes by itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prefect import flow, get_run_logger

from flows.artifacts import publish_pipeline
from flows.clean import CleanSummary, clean
from flows.finetune import finetune as finetune_flow
from flows.generate import GenerateSummary, generate
from ground.costs import ledger_markdown
from ground.settings import TaskTypeName, load_settings
from storage.corpus import CleanStore
from storage.ledger import read_ledger
from storage.shards import RunStore
from storage.summaries import FinetuneSummary

#: the end of every subflow run name of a ``pipeline`` run; the finetune trigger
#: (embed_factory/deployments/finetune_trigger.py) skips clean runs whose name ends so: the pipeline fine-tunes itself
SUBFLOW_SUFFIX = " (pipeline)"


def default_run_id() -> str:
    """``run-YYYYmmdd-HHMMSS-hex6``: the flow run's scheduled start (UTC) and id, so stable for one flow run."""
    from prefect.runtime import flow_run

    started = flow_run.scheduled_start_time
    run_uuid = (flow_run.id or "").replace("-", "")
    return f"run-{started:%Y%m%d-%H%M%S}-{run_uuid[:6] or 'local'}"


def pipeline_ledger(run_id: str, clean_id: str, profile: str | None) -> str:
    """The cost ledger of the pipeline's generation run and clean run (fine-tune included) as markdown."""
    settings = load_settings(profile=profile)
    run_rows = read_ledger(RunStore.from_settings(settings, run_id).ledger_path)
    return ledger_markdown(run_rows + read_ledger(CleanStore.from_settings(settings, clean_id).ledger_path))


def _run_name() -> str:
    from prefect.runtime import flow_run

    return f"pipeline-{(flow_run.parameters or {}).get('run_id') or default_run_id()}"


@dataclass
class PipelineSummary:
    """What the pipeline flow returns: its ids and each stage's own summary."""

    run_id: str
    clean_id: str
    generate: GenerateSummary
    clean: CleanSummary
    finetune: FinetuneSummary | None


@flow(name="pipeline", flow_run_name=_run_name)
async def pipeline(
    run_id: str | None = None,
    examples: int | None = None,
    task_types: list[TaskTypeName] | None = None,
    seed: int | None = None,
    unique_instructions: int | None = None,
    clean_id: str | None = None,
    clean_all_runs: bool = True,
    finetune: bool = True,
    base_model: str | None = None,
    max_steps: int | None = None,
    profile: Literal["local", "production"] | None = None,
) -> PipelineSummary:
    """Generate examples, clean them into a training corpus, fine-tune an embedding model on it.

    Args:
        run_id: Generation run id; re-use one to resume that run (default: a new one, run-DATE-TIME-HEX).
        examples: Target number of parsed examples over all task types (default: the profile's).
        task_types: Task types to generate (default: all six).
        seed: Sampling seed for personas and placeholders (default: generation.seed).
        unique_instructions: Target unique brainstormed instructions (default: what examples needs).
        clean_id: Id of the clean run (default: the run id with clean- in place of run-).
        clean_all_runs: Clean every generation run in the data folder (as `embed-factory run` does); off: only this run.
        finetune: Fine-tune on the clean run's export after cleaning.
        base_model: Model to fine-tune (default: finetune.base_model, else the bundled all-MiniLM-L6-v2).
        max_steps: Stop training after this many optimizer steps (default: one epoch).
        profile: Settings profile for every stage: local or production (default: the environment's).
    """
    logger = get_run_logger()
    run_id = run_id or default_run_id()
    clean_id = clean_id or f"clean-{run_id.removeprefix('run-')}"

    generated = await generate.with_options(flow_run_name=f"generate-{run_id}{SUBFLOW_SUFFIX}")(
        run_id=run_id,
        examples=examples,
        task_types=task_types,
        seed=seed,
        unique_instructions=unique_instructions,
        profile=profile,
    )
    cleaned = clean.with_options(flow_run_name=f"clean-{clean_id}{SUBFLOW_SUFFIX}")(
        clean_id=clean_id, runs=None if clean_all_runs else [run_id], profile=profile
    )
    tuned = None
    if finetune:
        tuned = finetune_flow.with_options(flow_run_name=f"finetune-{clean_id}{SUBFLOW_SUFFIX}")(
            clean_id=clean_id, base_model=base_model, max_steps=max_steps, profile=profile
        )
    logger.info(
        "pipeline %s: %d examples, %d rows after cleaning, model %s",
        run_id,
        generated.examples,
        cleaned.counts.get("mined", 0),
        tuned.model_dir if tuned else "(not fine-tuned)",
    )
    publish_pipeline(generated, cleaned, tuned, ledger_markdown=pipeline_ledger(run_id, clean_id, profile))
    return PipelineSummary(run_id, clean_id, generated, cleaned, tuned)
