"""Flow ``ablate``: train the same base model on variants of one clean run and compare them.

Orchestration only. The variants and the table are ``tasks.training.ablation``; each variant's rows
go through the real export (``tasks.cleaning.export.export_corpus``, without a held-out split: the
export's held-out rows are left out of every variant and evaluate them all), then the usual training
(``tasks.training.train``) and evaluation (``tasks.training.evaluate``) per seed. Files are
``storage.ablation.AblationStore``; the table is also a flow artifact (``ablation-<clean_id>``).

The ``unfiltered`` source is the table the rank filter reads (``decontaminated``) with hard negatives
mined exactly as the clean run mines them (``tasks.cleaning.negatives.mine_hard_negatives`` over the same
exact search, embeddings from the clean run's cache) but with no ranking-consistency filter before it.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE

from flows.artifacts import publish_ablation
from ground import progress
from ground.settings import CleanSettings, FinetuneSettings, Settings, load_settings
from storage.ablation import AblationStore, example_ids
from storage.corpus import CleanStore
from storage.models import DEFAULT_MODEL_NAME, ModelStore, check_base_model
from storage.stages import STAGE_NAMES, table_before
from tasks.training.ablation import (
    BASE,
    PROGRESS_STAGE,
    AblationError,
    RunResult,
    Variant,
    parse_variants,
    run_key,
    runs_table,
    scores_by_dim,
    seed_list,
    summary_table,
    to_html,
    to_markdown,
    variant_rows,
    variant_settings,
)

#: row source -> the clean run's stage table it reads (storage/stages.py); ``unfiltered`` is mined again from
#: the table the rank filter reads
SOURCE_TABLES = {
    "filtered": STAGE_NAMES["negatives"].table,
    "judged": STAGE_NAMES["judge"].table,
    "unfiltered": table_before(STAGE_NAMES["rank_filter"].table),
}


@dataclass
class AblationSummary:
    """What the flow returns; also ``<clean>/ablation/ablation.json``."""

    clean_id: str
    base_model: str
    seeds: list[int]
    max_steps: int | None
    languages: list[str]
    variants: list[str]  # the variants trained, in table order
    skipped: dict[str, str]  # variant -> why it was not trained
    table: list[dict[str, Any]]  # the results table's rows (ABLATION_SCHEMA)
    results_path: str
    html_path: str
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


# --- the row sources ------------------------------------------------------------------------------
def mine_unfiltered(rows: pa.Table, cfg: CleanSettings, store: CleanStore) -> pa.Table:
    """The rank filter's input rows with hard negatives mined as the clean run mines them, minus the rank filter."""
    from tasks.cleaning.embed import embed_for_ranking
    from tasks.cleaning.negatives import mine_hard_negatives
    from tasks.cleaning.rank_filter import exact_positive_scores
    from tasks.cleaning.search import build_index, result_width, search

    vectors = embed_for_ranking(rows, cfg, store)  # from the clean run's embedding cache
    ids, scores = search(build_index(vectors.corpus_vecs, cfg), vectors.query_vecs, result_width(cfg))
    positive_scores = exact_positive_scores(vectors.query_vecs, vectors.corpus_vecs, vectors.positive_idx)
    mined = mine_hard_negatives(
        rows,
        ids,
        scores,
        vectors.corpus_texts,
        vectors.corpus_vecs,
        vectors.positive_idx,
        cfg,
        positive_scores=positive_scores,
    )
    return mined.kept


def row_sources(
    store: CleanStore, variants: list[Variant], cfg: CleanSettings
) -> tuple[dict[str, pa.Table], dict[str, str]]:
    """The stage rows the chosen variants need, and ``{variant: why skipped}`` for those without rows."""
    needed = {v.source for v in variants}
    sources: dict[str, pa.Table] = {}
    if "filtered" in needed:
        sources["filtered"] = store.read_stage(SOURCE_TABLES["filtered"])
    if "judged" in needed and store.has(SOURCE_TABLES["judged"]):
        sources["judged"] = store.read_stage(SOURCE_TABLES["judged"])
    if "unfiltered" in needed:
        sources["unfiltered"] = mine_unfiltered(store.read_stage(SOURCE_TABLES["unfiltered"]), cfg, store)
    skipped = {
        v.name: "skipped: no judge results" for v in variants if v.source == "judged" and "judged" not in sources
    }
    return sources, skipped


load_sources = task(row_sources, name="row-sources", cache_policy=NO_CACHE)


# --- training and evaluation -----------------------------------------------------------------------
@task(name="export-variant", cache_policy=NO_CACHE, task_run_name="export-{variant.name}")
def export_variant(variant: Variant, rows: pa.Table, out_dir: Path, cfg: CleanSettings) -> Path:
    """The variant's rows as training files, through the real export (every row in ``train``)."""
    from tasks.cleaning.export import export_corpus

    export_corpus(rows, out_dir, cfg.model_copy(update={"heldout_fraction": 0.0}))
    return out_dir / "train.parquet"


@task(name="evaluate-base", cache_policy=NO_CACHE)
def evaluate_base(cfg: FinetuneSettings, heldout: Path | None) -> RunResult:
    from tasks.training.evaluate import evaluate_model

    return RunResult(BASE, None, scores_by_dim(evaluate_model(cfg.base_model, cfg, heldout)))


@task(name="train-and-evaluate", cache_policy=NO_CACHE, task_run_name="train-{name}-seed-{train_cfg.seed}")
def train_and_evaluate(
    name: str, train_path: Path, out_dir: Path, train_cfg: FinetuneSettings, eval_cfg: FinetuneSettings, heldout
) -> RunResult:
    """Train with ``train_cfg`` (its seed), evaluate with ``eval_cfg`` (the same STS sample for every run)."""
    from tasks.training.evaluate import evaluate_model
    from tasks.training.train import train_embedding_model

    evaluations = []

    def evaluate(model) -> None:  # on the trained model in memory, before it is saved
        evaluations.append(evaluate_model(model, eval_cfg, heldout))

    try:
        result = train_embedding_model(train_path, out_dir, train_cfg, eval_callback=evaluate)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)  # only the scores are kept
    return RunResult(
        name,
        train_cfg.seed,
        scores_by_dim(evaluations[-1]),
        train_rows=result.rows,
        negatives=result.hard_negatives,
        steps=result.steps,
        train_seconds=round(result.train_seconds, 2),
    )


# --- the flow ---------------------------------------------------------------------------------------
def ablation_settings(
    settings: Settings, max_steps: int | None, languages: list[str] | None, base_model: str | None
) -> FinetuneSettings:
    updates: dict[str, Any] = {}
    if max_steps is not None:
        if max_steps < 1:
            raise AblationError(f"max_steps must be at least 1, not {max_steps}")
        updates["max_steps"] = max_steps
    if languages:
        updates["sts_languages"] = list(languages)
    if base_model:
        updates["base_model"] = base_model
    return settings.finetune.model_copy(update=updates)


def ablate_run(
    settings: Settings,
    clean_id: str,
    seeds: int = 2,
    variants: list[str] | None = None,
) -> AblationSummary:
    """Every chosen variant x seed: export, train, evaluate; then the table, its files and its artifact."""
    logger = get_run_logger()
    started = time.monotonic()
    cfg = settings.finetune
    check_base_model(cfg.base_model)
    chosen = parse_variants(variants)
    seed_values = seed_list(seeds, cfg.seed)
    export = ModelStore.from_settings(settings).export(clean_id)  # a clear error for an unknown clean run
    store = AblationStore.from_settings(settings, export.clean_id)
    heldout_ids = example_ids(export.heldout_path)
    sources, skipped = load_sources(store.clean, chosen, settings.clean)
    trained = [v for v in chosen if v.name not in skipped]
    for name, why in skipped.items():
        logger.info("variant %s %s", name, why)
    if not trained:
        raise AblationError(f"no variant to train on clean run {export.clean_id}: {'; '.join(skipped.values())}")

    progress.add_total(PROGRESS_STAGE, 1 + len(trained) * len(seed_values))
    runs = [evaluate_base(cfg, export.heldout_path)]
    progress.advance(PROGRESS_STAGE)
    done: dict[tuple, RunResult] = {}  # identical runs (same rows and settings) are trained once
    with store.scratch() as scratch:
        for variant in trained:
            rows = variant_rows(variant, sources, heldout_ids)
            train_path = export_variant(variant, rows, scratch / variant.name, settings.clean)
            for seed in seed_values:
                train_cfg = variant_settings(variant, cfg, seed)
                key = run_key(variant, train_cfg)
                if key in done:
                    first = done[key]
                    result = RunResult(**{**asdict(first), "variant": variant.name, "same_as": first.variant})
                else:
                    result = train_and_evaluate(
                        variant.name, train_path, scratch / f"model-{variant.name}-{seed}", train_cfg, cfg,
                        export.heldout_path,
                    )  # fmt: skip
                    done[key] = result
                runs.append(result)
                progress.advance(PROGRESS_STAGE)
                logger.info("variant %s seed %d: %s", variant.name, seed, result.scores)

    runs_t = runs_table(runs)
    summary_t = summary_table(runs_t)
    has_ndcg = any(ndcg is not None for r in runs for _, ndcg in r.scores.values())
    notes = _notes(cfg, seed_values, trained, skipped, runs, has_ndcg)
    title = f"Ablation of clean run {export.clean_id} ({cfg.base_model or DEFAULT_MODEL_NAME})"
    summary = AblationSummary(
        clean_id=export.clean_id,
        base_model=cfg.base_model or DEFAULT_MODEL_NAME,
        seeds=seed_values,
        max_steps=cfg.max_steps,
        languages=list(cfg.sts_languages),
        variants=[v.name for v in trained],
        skipped=skipped,
        table=summary_t.to_pylist(),
        results_path=str(store.results_path),
        html_path=str(store.html_path),
        notes=notes,
        seconds=round(time.monotonic() - started, 1),
    )
    store.write(summary_t, runs_t, asdict(summary), to_html(summary_t, title, notes))
    _artifacts(export.clean_id, summary_t, title, notes)
    logger.info(
        "ablation of %s: %d runs in %.0fs; table in %s", export.clean_id, len(runs), summary.seconds, store.root
    )
    return summary


def _notes(
    cfg: FinetuneSettings,
    seeds: list[int],
    trained: list[Variant],
    skipped: dict[str, str],
    runs: list[RunResult],
    has_heldout: bool,
) -> list[str]:
    """The lines under the table: what a cell is, what was evaluated, what was skipped or reused."""
    notes = [
        f"cells: mean ± sample standard deviation over seeds {', '.join(map(str, seeds))} "
        f"({cfg.max_steps or 'one epoch of'} steps each); base: the untrained model",
        f"STS: Spearman, mean over {', '.join(cfg.sts_languages)}, "
        f"{cfg.sts_max_pairs or 'all'} pairs per language (the same pairs for every run)",
        "held-out nDCG@10: the export's held-out split, left out of every variant's training rows"
        if has_heldout
        else "held-out nDCG@10: none (the export's held-out split has no retrieval rows)",
    ]
    notes += [f"{v.name}: {v.description}" for v in trained]
    notes += [f"{name}: {why}" for name, why in skipped.items()]
    notes += [f"{r.variant}: the same run as {r.same_as} (same rows and settings)" for r in runs if r.same_as]
    return list(dict.fromkeys(notes))


def _artifacts(clean_id: str, summary: pa.Table, title: str, notes: list[str]) -> None:
    from tasks.training.ablation import display_rows

    publish_ablation(clean_id, display_rows(summary).records(), to_markdown(summary, title, notes), title)


def _run_name() -> str:
    from prefect.runtime import flow_run

    return f"ablate-{(flow_run.parameters or {}).get('clean_id')}"


@flow(name="ablate", flow_run_name=_run_name)
def ablate(
    clean_id: str,
    max_steps: int | None = None,
    seeds: int = 2,
    variants: list[str] | None = None,
    languages: list[str] | None = None,
    base_model: str | None = None,
    profile: str | None = None,
) -> AblationSummary:
    """Train the same base model on variants of one clean run (unfiltered, filtered, filtered + judge, without
    hard negatives, homogeneous ratio 0 and 1) with the same steps and seeds; write the comparison table.

    Args:
        clean_id: Clean run whose stage tables the variants are made of.
        max_steps: Training steps of every run (default: one epoch each).
        seeds: Training seeds per variant (at least 2): finetune.seed, finetune.seed + 1, ...
        variants: Variants to train (default: all): unfiltered, filtered, filtered+judge, no-hard-negatives,
            homogeneous-0, homogeneous-1.
        languages: STS Benchmark languages to evaluate on (default: finetune.sts_languages).
        base_model: Model folder to start from (default: finetune.base_model, else the bundled all-MiniLM-L6-v2).
        profile: Settings profile: local or production (default: the environment's).
    """
    settings = load_settings(profile=profile)
    cfg = ablation_settings(settings, max_steps, languages, base_model)
    settings = settings.model_copy(update={"finetune": cfg})
    return ablate_run(settings, clean_id, seeds, variants)
