"""Flow ``finetune``: a clean run's export → evaluate the base model → train → evaluate → save.

Orchestration only: training is ``tasks.training.train.train_embedding_model`` and evaluation
``tasks.training.evaluate`` (STS Benchmark per language, optionally the held-out split), each a thin
Prefect task here; where the export is read and the model put (a staging folder, promoted once it
trained, evaluated and has its eval.json) is ``storage.models.ModelStore``.

Started by hand (``embed-factory finetune``), by ``prefect deployment run 'finetune/finetune'``,
or by the deployment trigger when a ``clean`` flow run completes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE

from flows.artifacts import publish_finetune
from ground.costs import with_training
from ground.settings import FinetuneSettings, Settings, load_settings
from storage.corpus import CleanStore
from storage.ledger import read_ledger, write_ledger
from storage.models import DEFAULT_MODEL_NAME, FinetuneError, ModelStore, check_base_model, resolve_export
from storage.summaries import EvalDelta, Evaluation, FinetuneSummary, TrainFigures

# the CLI and the benchmarks check their input with these before starting a flow run
__all__ = [
    "FinetuneError",
    "FinetuneSummary",
    "check_base_model",
    "finetune",
    "finetune_run",
    "local_data_dir",
    "resolve_export",
]


def local_data_dir(settings: Settings) -> Path:
    """The local folder that training reads and writes; with S3 storage, the exports are mirrored there first."""
    return ModelStore.from_settings(settings).data_dir


# --- summaries ----------------------------------------------------------------------------------
def _train_figures(result: Any) -> TrainFigures:
    """The training result's figures for the summary (the per-step losses stay in the trainer's log)."""
    return TrainFigures.model_validate(
        {name: getattr(result, name, None) for name in TrainFigures.model_fields}, from_attributes=True
    )


def add_training_to_ledger(settings: Settings, clean_id: str, train_seconds: float | None) -> None:
    """The clean run's ledger gains this fine-tune's training seconds (a later fine-tune replaces them)."""
    store = CleanStore.from_settings(settings, clean_id)
    rows = read_ledger(store.ledger_path)
    if not rows:  # a clean run from before the ledger
        get_run_logger().info("no cost ledger in %s: training seconds not recorded", store.root)
        return
    write_ledger(store.ledger_path, with_training(rows, train_seconds or 0.0, settings.cost), store.compression)


# --- thin task wrappers ------------------------------------------------------------------------
@task(name="evaluate-base", cache_policy=NO_CACHE)
def evaluate_base(model: str | None, cfg: FinetuneSettings, heldout_path: Path | None) -> Evaluation:
    from tasks.training.evaluate import evaluate_model

    return evaluate_model(model, cfg, heldout_path)


@task(name="train", cache_policy=NO_CACHE)
def train(train_path: Path, out_dir: Path, cfg: FinetuneSettings, heldout_path: Path | None):
    from tasks.training.train import train_embedding_model

    return train_embedding_model(train_path, out_dir, cfg, heldout_path=heldout_path)


@task(name="evaluate-finetuned", cache_policy=NO_CACHE)
def evaluate_finetuned(model_dir: Path, cfg: FinetuneSettings, heldout_path: Path | None) -> Evaluation:
    from tasks.training.evaluate import evaluate_model

    return evaluate_model(str(model_dir), cfg, heldout_path)


@task(name="save-eval", cache_policy=NO_CACHE)
def save_eval(path: Path, before: Evaluation, after: Evaluation) -> EvalDelta:
    from tasks.training.evaluate import delta, save_results

    save_results(path, before, after)
    return delta(before, after)


# --- the flow ------------------------------------------------------------------------------------
def finetune_run(settings: Settings, clean_id: str | None = None) -> FinetuneSummary:
    """Resolve the export, evaluate, train, evaluate, save; returns the summary (also finetune.json)."""
    logger = get_run_logger()
    cfg = settings.finetune
    check_base_model(cfg.base_model)
    store = ModelStore.from_settings(settings)
    export = store.export(clean_id)
    final_dir = store.model_dir(cfg.base_model, export.clean_id)
    logger.info(
        "fine-tuning %s on %s (held-out: %s) into %s",
        cfg.base_model or DEFAULT_MODEL_NAME,
        export.train_path,
        export.heldout_path or "none",
        final_dir,
    )

    before = evaluate_base(cfg.base_model, cfg, export.heldout_path)
    with store.staging(final_dir) as staged:
        result = train(export.train_path, staged.root, cfg, export.heldout_path)
        trained = Path(result.model_dir)
        after = evaluate_finetuned(trained, cfg, export.heldout_path)
        change = save_eval(staged.eval_path(trained), before, after)
        placed = staged.promote(trained)

    summary = FinetuneSummary(
        clean_id=export.clean_id,
        base_model=cfg.base_model or DEFAULT_MODEL_NAME,
        train_path=str(export.train_path),
        heldout_path=str(export.heldout_path) if export.heldout_path else None,
        model_dir=str(placed.model_dir),
        eval_path=str(placed.eval_path),
        train=_train_figures(result),
        key_deltas=change.key_deltas(),
        before=before,
        after=after,
        delta=change,
        model_url=store.published_url(final_dir),
    )
    store.write_summary(final_dir, summary.model_dump(mode="json"))
    add_training_to_ledger(settings, export.clean_id, summary.train.train_seconds)
    if summary.model_url:
        store.publish(final_dir)  # the model, eval.json and finetune.json next to the export on S3
    logger.info(
        "model %s: %s steps, %s samples/s; key deltas %s",
        placed.model_dir,
        summary.train.steps,
        summary.train.samples_per_s,
        summary.key_deltas,
    )
    publish_finetune(summary)  # before/after/delta, training figures and the model link in the UI
    return summary


def _run_name() -> str:
    from prefect.runtime import flow_run

    clean_id = (flow_run.parameters or {}).get("clean_id")
    return f"finetune-{clean_id or 'latest'}"


@flow(name="finetune", flow_run_name=_run_name)
def finetune(
    clean_id: str | None = None, base_model: str | None = None, max_steps: int | None = None, profile: str | None = None
) -> FinetuneSummary:
    """Fine-tune an embedding model on a clean run's export (default: the latest) and evaluate it before and after.

    Args:
        clean_id: Clean run whose export to train on (default: the latest with an export).
        base_model: Model folder or Hugging Face cache name to start from (default: finetune.base_model,
            else the bundled all-MiniLM-L6-v2).
        max_steps: Stop training after this many optimizer steps (default: one epoch).
        profile: Settings profile: local or production (default: the environment's).
    """
    settings = load_settings(profile=profile)
    updates: dict[str, Any] = {}
    if base_model:
        updates["base_model"] = base_model
    if max_steps is not None:
        if max_steps < 1:
            raise FinetuneError(f"max_steps must be at least 1, not {max_steps}")
        updates["max_steps"] = max_steps
    settings = settings.model_copy(update={"finetune": settings.finetune.model_copy(update=updates)})
    return finetune_run(settings, clean_id)
