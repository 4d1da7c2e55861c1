"""Flow ``clean``: raw shards → valid → deduped → rank-filtered → mined → export + catalog + report.

Orchestration only. The clean run is the plain list of steps :data:`STAGES`; each step is a few
calls of ``tasks/cleaning`` functions (as Prefect tasks) and commits its table through
``storage.corpus.CleanStore``. A step whose commit table exists is skipped, so a crashed clean run
resumes at its first missing table; embeddings are cached by text hash across runs. Validation
(per shard) and near-dedup (per task type) map onto the task runner of ``flows/runners.py``.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NONE as NO_CACHE
from prefect.task_runners import TaskRunner

from flows.artifacts import publish_clean
from flows.eval_texts import gather_eval_texts
from flows.runners import stage_runner
from ground.costs import clean_rows
from ground.faults import checkpoint
from ground.settings import CleanSettings, Settings, load_settings
from storage.atomic import remove_stale_temps
from storage.catalog import Catalog
from storage.corpus import CleanStore, StageResult
from storage.ledger import read_ledger, write_ledger
from storage.location import StorePath
from storage.schemas import EXAMPLE_SCHEMA
from storage.shards import RunStore, list_runs, read_parquet_checked
from tasks.cleaning.decontaminate import decontaminate as decontaminate_rows
from tasks.cleaning.dedup import exact_dedup, merge_near_parts, near_dedup_part, split_by_task_type
from tasks.cleaning.embed import EmbeddingCache, RankingVectors, embed_for_ranking, encode_cached, make_embedder
from tasks.cleaning.export import export_corpus, write_dataset_card
from tasks.cleaning.judge import judge_corpus
from tasks.cleaning.negatives import filter_and_mine
from tasks.cleaning.publish import publish_dataset
from tasks.cleaning.report import write_report
from tasks.cleaning.validate import validate_examples


@dataclass
class CleanSummary:
    clean_id: str
    runs: list[str]
    counts: dict[str, int]
    dropped: dict[str, int]
    export_dir: str
    report: str
    stage_seconds: dict[str, float] = field(default_factory=dict)


# --- Prefect tasks over the tasks/cleaning functions --------------------------------------------
@task(name="validate-shard", cache_policy=NO_CACHE, task_run_name="validate-{path.parent.parent.name}-{path.stem}")
def validate_shard(path, cfg: CleanSettings) -> StageResult:
    return validate_examples(read_parquet_checked(path, EXAMPLE_SCHEMA), cfg)


@task(name="dedup-near", cache_policy=NO_CACHE, task_run_name="dedup-near-{task_type}")
def dedup_near(task_type: str, part: pa.Table, cfg: CleanSettings) -> StageResult:
    return near_dedup_part(part, cfg)


dedup_exact = task(exact_dedup, name="dedup-exact", cache_policy=NO_CACHE)
embed = task(embed_for_ranking, name="embed", cache_policy=NO_CACHE)
rank_filter_and_mine = task(filter_and_mine, name="rank-filter-and-mine", cache_policy=NO_CACHE)
decontaminate_task = task(decontaminate_rows, name="decontaminate", cache_policy=NO_CACHE)
llm_judge = task(judge_corpus, name="llm-judge", cache_policy=NO_CACHE)


# --- the steps -----------------------------------------------------------------------------------
#: stage tables checked against (and cast to) a schema when read; the others are read as written
TABLE_SCHEMAS = {"valid": EXAMPLE_SCHEMA, "deduped": EXAMPLE_SCHEMA, "decontaminated": EXAMPLE_SCHEMA}


@dataclass
class CleanContext:
    """What the steps share: the clean run's store and inputs, the runner, and the tables committed so far."""

    settings: Settings
    store: CleanStore
    runs: list[str]
    shard_files: list[StorePath]
    runner: TaskRunner
    publish_to: str | None = None
    vectors: RankingVectors | None = None  # from the embed step, for the filter step
    _embedder: Any = None  # made once: decontamination and the ranking embed share its model

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            self._embedder = make_embedder(self.cfg)
        return self._embedder

    _tables: dict[str, pa.Table] = field(default_factory=dict)

    @property
    def cfg(self) -> CleanSettings:
        return self.settings.clean

    def table(self, stage: str) -> pa.Table:
        """A committed stage table, read (and checked) once."""
        if stage not in self._tables:
            self._tables[stage] = self.store.read_stage(stage, TABLE_SCHEMAS.get(stage))
        return self._tables[stage]


def validate(ctx: CleanContext) -> None:
    files = ctx.shard_files
    futures = ctx.runner.map(validate_shard, {"path": files, "cfg": unmapped(ctx.cfg)}) if files else []
    results = [future.result() for future in futures]
    ctx.store.write_inputs(ctx.runs)
    kept = pa.concat_tables([r.kept for r in results]) if results else EXAMPLE_SCHEMA.empty_table()
    dropped = pa.concat_tables([r.dropped for r in results]) if results else StageResult.dropped_rows([])
    ctx.store.write_stage("valid", StageResult(kept, dropped), drop_stage="validate")


def dedup(ctx: CleanContext) -> None:
    exact = dedup_exact(ctx.table("valid"))
    parts = split_by_task_type(exact.kept)
    futures = (
        ctx.runner.map(dedup_near, {"task_type": list(parts), "part": list(parts.values()), "cfg": unmapped(ctx.cfg)})
        if parts
        else []
    )
    near = merge_near_parts(exact.kept, [future.result() for future in futures])
    checkpoint("dedup.done")
    ctx.store.write_dropped("dedup_exact", exact.dropped)
    ctx.store.write_stage("deduped", near, drop_stage="dedup_near")


def decontaminate(ctx: CleanContext) -> None:
    """Drop rows near an eval text (clean.decontaminate); off, the deduped rows pass through unchanged."""
    result = StageResult(ctx.table("deduped"), StageResult.dropped_rows([]))
    if ctx.cfg.decontaminate:
        embedder = ctx.embedder  # the ranking's embedder and cache: the positives are embedded once
        cache = EmbeddingCache(ctx.store.embeddings_dir(embedder.model_key))
        eval_texts = gather_eval_texts(ctx.settings)
        result = decontaminate_task(
            result.kept, eval_texts, ctx.cfg, lambda texts: encode_cached(texts, embedder, cache)
        )
        get_run_logger().info("decontaminate: %d eval texts, %d rows dropped", len(eval_texts), result.dropped.num_rows)
    ctx.store.write_stage("decontaminated", result, drop_stage="decontaminate")


def embed_deduped(ctx: CleanContext) -> None:
    deduped = ctx.table("decontaminated")
    if deduped.num_rows == 0:
        raise ValueError(f"no rows survived validation and dedup in {ctx.store.root}; nothing to filter")
    ctx.vectors = embed(deduped, ctx.cfg, ctx.store, ctx.embedder)


def filter_and_mine_deduped(ctx: CleanContext) -> None:
    # mining reuses the filter's one search, restricted to the rows it kept
    filtered, mined = rank_filter_and_mine(ctx.table("decontaminated"), ctx.vectors, ctx.cfg)
    ctx.store.write_stage("filtered", filtered, drop_stage="rank_filter")
    ctx.store.write_stage("mined", mined, drop_stage="negatives")


def judge_mined(ctx: CleanContext) -> None:
    """The LLM judge (clean.judge): false negatives replaced, positives relabelled or dropped."""
    judged = llm_judge(ctx.table("mined"), ctx.settings, ctx.store, get_run_logger())
    ctx.store.write_stage("verified", judged, drop_stage="judge")


def export(ctx: CleanContext) -> None:
    store, cfg = ctx.store, ctx.cfg
    result = export_corpus(ctx.table("verified" if cfg.judge else "mined"), store.export_dir, cfg)
    write_dataset_card(
        store.export_dir,
        result,
        {
            "clean_id": store.clean_id,
            "runs": ctx.runs,
            "model": ctx.settings.llm_model,
            "embedding_model": cfg.embedding_model or "all-MiniLM-L6-v2",
        },
    )
    checkpoint("export.card")
    if ctx.publish_to:
        publish_dataset(store.export_dir, ctx.publish_to, token=os.environ.get("HF_TOKEN"))
    store.upload_export()  # on S3: the staged export goes up, card last


@dataclass(frozen=True)
class Stage:
    name: str  # its key in CleanSummary.stage_seconds
    run: Callable[[CleanContext], None]
    commit: str | None  # the stage table whose existence means this step is done; None: it always runs
    enabled: Callable[[CleanSettings], bool] | None = None  # a switchable step: skipped while this says False


#: the clean run, in order
STAGES = (
    Stage("validate", validate, commit="valid"),
    Stage("dedup", dedup, commit="deduped"),
    Stage("decontaminate", decontaminate, commit="decontaminated"),
    Stage("embed", embed_deduped, commit="mined"),  # its vectors serve only the next step
    Stage("filter_and_mine", filter_and_mine_deduped, commit="mined"),
    Stage("judge", judge_mined, commit="verified", enabled=lambda cfg: cfg.judge),
    Stage("export", export, commit=None),  # rewritten from mined on every run
)


# --- the flow ------------------------------------------------------------------------------------
def clean_run(
    settings: Settings, clean_id: str, runs: list[str] | None = None, publish_to: str | None = None
) -> CleanSummary:
    store = CleanStore.from_settings(settings, clean_id)
    runs = runs or list_runs(store.data_dir)
    if not runs:
        raise ValueError(f"no generation runs under {store.data_dir}/runs; run `embed-factory run` first")
    # the CPU-heavy stages (validation per shard, near-dedup per task type) map onto threads or Dask
    with store.exclusive(), stage_runner(settings.clean) as runner:  # a second `clean` of the same id fails at once
        remove_stale_temps(store.data_dir / "embeddings")  # stale temp files go
        ctx = CleanContext(settings, store, runs, example_shards(settings, runs), runner, publish_to)
        return summarize(ctx, run_stages(ctx, STAGES))


def example_shards(settings: Settings, runs: list[str]) -> list[StorePath]:
    """The example shard files of ``runs``, run by run, each run's in shard order."""
    return [
        path
        for run_id in runs
        for path in sorted((RunStore.from_settings(settings, run_id).root / "examples").glob("*.parquet"))
    ]


def run_stages(ctx: CleanContext, stages: tuple[Stage, ...]) -> dict[str, float]:
    """Run each step whose commit table is missing; returns the seconds each step that ran took."""
    logger = get_run_logger()
    seconds: dict[str, float] = {}
    for stage in stages:
        if stage.commit is not None and ctx.store.has(stage.commit):
            continue
        if stage.enabled is not None and not stage.enabled(ctx.cfg):
            continue
        started = time.monotonic()
        stage.run(ctx)
        seconds[stage.name] = round(time.monotonic() - started, 2)
        logger.info("stage %s done in %.1fs", stage.name, seconds[stage.name])
    return seconds


def count_types(table: pa.Table) -> dict[str, int]:
    return dict(Counter(table.column("task_type").to_pylist()))


def write_clean_ledger(ctx: CleanContext, seconds: dict[str, float]) -> None:
    """The clean run's cost ledger: its input runs' ledgers, its embed and search seconds (an earlier
    session's when those steps were skipped on resume) and the rows that reached the export."""
    store, earlier = ctx.store, read_ledger(ctx.store.ledger_path)
    generation = [row for run in ctx.runs for row in read_ledger(RunStore.from_settings(ctx.settings, run).ledger_path)]
    rows = clean_rows(
        store.clean_id,
        generation,
        count_types(ctx.table("deduped")),
        count_types(ctx.table("verified" if ctx.cfg.judge else "mined")),  # what export_corpus wrote, row for row
        seconds.get("embed", sum(r["embed_s"] or 0.0 for r in earlier)),
        seconds.get("filter_and_mine", sum(r["search_s"] or 0.0 for r in earlier)),
        ctx.settings.cost,
    )
    write_ledger(store.ledger_path, rows, store.compression)


def summarize(ctx: CleanContext, seconds: dict[str, float]) -> CleanSummary:
    """Refresh the catalog, write the report, and count each table's rows from its footer."""
    store = ctx.store
    write_clean_ledger(ctx, seconds)
    catalog = Catalog.from_settings(ctx.settings)
    catalog.refresh()
    checkpoint("catalog.refreshed")
    report = write_report(catalog, store.clean_id, store.report_path)
    counts = {"raw": sum(store.count(path) for path in ctx.shard_files)}
    for stage in ("valid", "deduped", "decontaminated", "filtered", "mined") + (("verified",) if ctx.cfg.judge else ()):
        counts[stage] = store.count(store.stage_path(stage))
    dropped = {path.stem: store.count(path) for path in sorted((store.root / "dropped").glob("*.parquet"))}
    get_run_logger().info("clean %s: %s; dropped %s", store.clean_id, counts, dropped)
    summary = CleanSummary(store.clean_id, ctx.runs, counts, dropped, str(store.export_location), str(report), seconds)
    publish_clean(catalog, asdict(summary))  # the funnel, drop reasons, samples and links in the UI
    return summary


@flow(name="clean", flow_run_name="clean-{clean_id}")
def clean(
    clean_id: str, runs: list[str] | None = None, publish_to: str | None = None, profile: str | None = None
) -> dict[str, Any]:
    """Validate, deduplicate, rank-filter and mine hard negatives over generation runs; export the corpus.

    Args:
        clean_id: Id of this clean run; re-use one to resume it at its first missing stage.
        runs: Generation runs to include (default: every run in the data folder).
        publish_to: Also publish the export: a local folder or a Hugging Face dataset repo id (token from HF_TOKEN).
        profile: Settings profile: local or production (default: the environment's).
    """
    return asdict(clean_run(load_settings(profile=profile), clean_id, runs, publish_to))
