"""Flow ``clean``: raw shards → valid → deduped → rank-filtered → mined → export + catalog + report.

Orchestration only. The clean run is the plain list of steps :data:`STEPS`; each step names the stage
tables it writes (``storage/stages.py``), is a few calls of ``tasks/cleaning`` stages (as Prefect tasks)
and returns their results, which the loop commits through ``storage.corpus.CleanStore``. A step whose
tables exist is skipped, so a crashed clean run
resumes at its first missing table; embeddings are cached by text hash across runs. Validation
(per shard) and near-dedup (per task type) map onto the task runner of ``flows/runners.py``.
"""

from __future__ import annotations

import os
import time
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
from storage.fingerprint import check_resume, clean_fingerprint
from storage.ledger import read_ledger, write_ledger
from storage.location import StorePath
from storage.schemas import EXAMPLE_SCHEMA, count_by_type
from storage.shards import RunStore, list_runs, read_parquet_checked
from storage.stages import CLEAN_STAGES, STAGE_TABLES, enabled_stages, final_table, table_before
from tasks.cleaning.decontaminate import decontaminate as decontaminate_rows
from tasks.cleaning.dedup import exact_dedup, merge_near_parts, near_dedup_part, split_by_task_type
from tasks.cleaning.embed import EmbeddingCache, embed_for_ranking, encode_cached, make_embedder
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
@dataclass
class CleanContext:
    """What the steps share: the clean run's settings, store and inputs, the runner, one embedder."""

    settings: Settings
    store: CleanStore
    runs: list[str]
    shard_files: list[StorePath]
    runner: TaskRunner
    publish_to: str | None = None
    fingerprint: dict[str, Any] | None = None  # storage/fingerprint.py: written with the first table
    _embedder: Any = None  # made once: decontamination and the ranking embed share its model
    _tables: dict[str, pa.Table] = field(default_factory=dict)

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            self._embedder = make_embedder(self.cfg)
        return self._embedder

    @property
    def cfg(self) -> CleanSettings:
        return self.settings.clean

    def table(self, stage: str) -> pa.Table:
        """A committed stage table, read (and checked) once."""
        if stage not in self._tables:
            entry = STAGE_TABLES[stage]
            self._tables[stage] = self.store.read_stage(stage, entry.schema if entry.checked else None)
        return self._tables[stage]


class Laps:
    """Seconds per step (and per named part of a step), in the order they ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._since = time.monotonic()

    def start(self) -> None:
        self._since = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name] = round(now - self._since, 2)
        self._since = now


class Step:
    """One step of the clean run: ``name`` (its key in ``stage_seconds``), the stage tables it ``writes``
    (``storage/stages.py``) and ``run(ctx, rows, laps) -> {table: StageResult}`` over the table before its
    first (``rows``; None for the first step). Done when every table it writes exists; a step that writes
    none always runs; a switchable table's step runs while its setting is on."""

    name = ""
    writes: tuple[str, ...] = ()

    def enabled(self, cfg: CleanSettings) -> bool:
        return all(STAGE_TABLES[t].enabled(cfg) for t in self.writes)

    def reads(self) -> str | None:
        first = self.writes[0] if self.writes else None
        return table_before(first) if first and first != CLEAN_STAGES[0].table else None

    def run(self, ctx: CleanContext, rows: pa.Table | None, laps: Laps) -> dict[str, StageResult]:
        raise NotImplementedError


class ValidateShards(Step):
    name, writes = "validate", ("valid",)

    def run(self, ctx, rows, laps):
        files = ctx.shard_files
        futures = ctx.runner.map(validate_shard, {"path": files, "cfg": unmapped(ctx.cfg)}) if files else []
        results = [future.result() for future in futures]
        ctx.store.write_inputs(ctx.runs, ctx.fingerprint)
        if not results:
            return {"valid": StageResult.keep_all(EXAMPLE_SCHEMA.empty_table())}
        return {"valid": concat_results(results)}


class Dedup(Step):
    name, writes = "dedup", ("deduped",)

    def run(self, ctx, rows, laps):
        exact = dedup_exact(rows)
        parts = split_by_task_type(exact.kept)
        futures = (
            ctx.runner.map(
                dedup_near, {"task_type": list(parts), "part": list(parts.values()), "cfg": unmapped(ctx.cfg)}
            )
            if parts
            else []
        )
        near = merge_near_parts(exact.kept, [future.result() for future in futures])
        checkpoint("dedup.done")
        return {"deduped": StageResult(near.kept, pa.concat_tables([exact.dropped, near.dropped]))}


class DecontaminateStep(Step):
    """Drop rows near an eval text (clean.decontaminate); off, the rows pass through unchanged."""

    name, writes = "decontaminate", ("decontaminated",)

    def run(self, ctx, rows, laps):
        if not ctx.cfg.decontaminate:
            return {"decontaminated": StageResult.keep_all(rows)}
        embedder = ctx.embedder  # the ranking's embedder and cache: the positives are embedded once
        cache = EmbeddingCache(ctx.store.embeddings_dir(embedder.model_key))
        eval_texts = gather_eval_texts(ctx.settings)
        result = decontaminate_task(rows, eval_texts, ctx.cfg, lambda texts: encode_cached(texts, embedder, cache))
        get_run_logger().info("decontaminate: %d eval texts, %d rows dropped", len(eval_texts), result.dropped.num_rows)
        return {"decontaminated": result}


class RankFilterAndMine(Step):
    """Embed (lap ``embed``), then one search for the rank filter and mining (restricted to the rows it kept)."""

    name, writes = "filter_and_mine", ("filtered", "mined")

    def run(self, ctx, rows, laps):
        if rows.num_rows == 0:
            raise ValueError(f"no rows survived validation and dedup in {ctx.store.root}; nothing to filter")
        vectors = embed(rows, ctx.cfg, ctx.store, ctx.embedder)
        laps.lap("embed")
        filtered, mined = rank_filter_and_mine(rows, vectors, ctx.cfg)
        return {"filtered": filtered, "mined": mined}


class Judge(Step):
    """The LLM judge (clean.judge): false negatives replaced, positives relabelled or dropped."""

    name, writes = "judge", ("verified",)

    def run(self, ctx, rows, laps):
        return {"verified": llm_judge(rows, ctx.settings, ctx.store, get_run_logger())}


class Export(Step):
    """The export, rewritten from the last enabled stage table on every run."""

    name = "export"

    def run(self, ctx, rows, laps):
        store, cfg = ctx.store, ctx.cfg
        result = export_corpus(ctx.table(final_table(cfg)), store.export_dir, cfg)
        card = {
            "clean_id": store.clean_id,
            "runs": ctx.runs,
            "model": ctx.settings.llm_model,
            "embedding_model": cfg.embedding_model or "all-MiniLM-L6-v2",
        }
        write_dataset_card(store.export_dir, result, card)
        checkpoint("export.card")
        if ctx.publish_to:
            publish_dataset(store.export_dir, ctx.publish_to, token=os.environ.get("HF_TOKEN"))
        store.upload_export()  # on S3: the staged export goes up, card last
        return {}


#: the clean run, in order: each step's tables are a run of storage/stages.py's CLEAN_STAGES
STEPS: tuple[Step, ...] = (ValidateShards(), Dedup(), DecontaminateStep(), RankFilterAndMine(), Judge(), Export())


def concat_results(results: list[StageResult]) -> StageResult:
    return StageResult(pa.concat_tables([r.kept for r in results]), pa.concat_tables([r.dropped for r in results]))


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
        fingerprint = clean_fingerprint(settings, runs)
        check_resume(clean_id, store.read_fingerprint(), fingerprint)  # a changed resume stops here, one line
        remove_stale_temps(store.data_dir / "embeddings")  # stale temp files go
        ctx = CleanContext(settings, store, runs, example_shards(settings, runs), runner, publish_to, fingerprint)
        return summarize(ctx, run_stages(ctx, STEPS))


def example_shards(settings: Settings, runs: list[str]) -> list[StorePath]:
    """The example shard files of ``runs``, run by run, each run's in shard order."""
    return [
        path
        for run_id in runs
        for path in sorted((RunStore.from_settings(settings, run_id).root / "examples").glob("*.parquet"))
    ]


def run_stages(ctx: CleanContext, steps: tuple[Step, ...]) -> dict[str, float]:
    """Run each enabled step whose tables are not all committed; returns the seconds each step that ran took."""
    logger, laps = get_run_logger(), Laps()
    for step in steps:
        if step.writes and all(ctx.store.has(t) for t in step.writes):
            continue
        if not step.enabled(ctx.cfg):
            continue
        laps.start()
        reads = step.reads()
        for table, result in step.run(ctx, ctx.table(reads) if reads else None, laps).items():
            ctx.store.write_stage(table, result)
        laps.lap(step.name)
        logger.info("stage %s done in %.1fs", step.name, laps.seconds[step.name])
    return laps.seconds


def write_clean_ledger(ctx: CleanContext, seconds: dict[str, float]) -> None:
    """The clean run's cost ledger: its input runs' ledgers, its embed and search seconds (an earlier
    session's when those steps were skipped on resume) and the rows that reached the export."""
    store, earlier = ctx.store, read_ledger(ctx.store.ledger_path)
    generation = [row for run in ctx.runs for row in read_ledger(RunStore.from_settings(ctx.settings, run).ledger_path)]
    rows = clean_rows(
        store.clean_id,
        generation,
        count_by_type(ctx.table("deduped")),
        count_by_type(ctx.table(final_table(ctx.cfg))),  # what export_corpus wrote, row for row
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
    for stage in enabled_stages(ctx.cfg):
        counts[stage.table] = store.count(store.stage_path(stage.table))
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
