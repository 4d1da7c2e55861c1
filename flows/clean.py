"""Flow ``clean``: raw shards → valid → deduped → rank-filtered → mined → export + catalog + report.

Orchestration only. The clean run is the plain list of steps :data:`STEPS`; each step names the stage
tables it writes (``storage/stages.py``), reads the table before it from its committed Parquet file in
record batches, and yields its output in parts (rows in order), which :func:`run_stages` appends to the
tables' writers and commits atomically when the step is done (``storage/stage_io.py``): no table is held
for the whole flow. A streamed stage (``tasks/cleaning/stage.py``) is fed batch by batch; a global one
(dedup, the ranking search) decides from the columns it needs and then emits rows streaming. A step whose
tables exist is skipped, so a crashed clean run resumes at its first missing table; embeddings are cached
by text hash across runs. Validation (per shard) and dedup's reading (per batch: ids, digests, MinHash
signatures) map onto the task runner of ``flows/runners.py``, a window of them at a time.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
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
from storage.schemas import EXAMPLE_SCHEMA
from storage.shards import RunStore, list_runs, read_parquet_checked
from storage.stage_io import BATCH_ROWS, empty_table, open_parquet, release_unused_memory, released
from storage.stages import CLEAN_STAGES, STAGE_TABLES, enabled_stages, final_table, table_before
from tasks.cleaning.decontaminate import Decontaminate
from tasks.cleaning.dedup_stream import DEDUP_COLUMNS, DedupFacts, dedup_decisions, dedup_facts
from tasks.cleaning.embed import embed_for_ranking, file_encoder, make_embedder
from tasks.cleaning.export import BATCH_ROWS as EXPORT_BATCH_ROWS
from tasks.cleaning.export import EXPORT_COLUMNS, KEY_COLUMNS, ExportRows, export_corpus, write_dataset_card
from tasks.cleaning.judge import judge_corpus
from tasks.cleaning.negatives import BLOCK_ROWS, filter_and_mine_block, filter_and_mine_blocks
from tasks.cleaning.publish import publish_dataset
from tasks.cleaning.report import write_report
from tasks.cleaning.search import SplitCursor, iter_split, result_width
from tasks.cleaning.stage import Stage
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


dedup_facts_task = task(dedup_facts, name="dedup-facts", cache_policy=NO_CACHE)
embed = task(embed_for_ranking, name="embed", cache_policy=NO_CACHE)
rank_filter_and_mine = task(
    filter_and_mine_block,
    name="rank-filter-and-mine",
    cache_policy=NO_CACHE,
    task_run_name="rank-filter-and-mine-{start}",
)
llm_judge = task(judge_corpus, name="llm-judge", cache_policy=NO_CACHE)

#: shards validated (dedup's batches read) at once: their results are held until written, so memory is this
#: many shards; the fewest that keep two cores busy (16 shards held ~2.5 GiB on 200k bench rows)
MAP_WINDOW = 4
#: the columns the ranking embed reads
EMBED_COLUMNS = ("instruction", "query", "positive", "negative")


# --- the steps -----------------------------------------------------------------------------------
@dataclass
class CleanContext:
    """What the steps share: the clean run's settings, store and inputs, the runner, one embedder.

    Nothing else: each step reads its input table from its committed file, batch by batch."""

    settings: Settings
    store: CleanStore
    runs: list[str]
    shard_files: list[StorePath]
    runner: TaskRunner
    publish_to: str | None = None
    fingerprint: dict[str, Any] | None = None  # storage/fingerprint.py: written with the first table
    batch_rows: int = BATCH_ROWS  # rows per batch a streamed stage is fed
    block_rows: int = BLOCK_ROWS  # queries per block of the rank filter + mining
    _embedder: Any = None  # made once: decontamination and the ranking embed share its model

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            self._embedder = make_embedder(self.cfg)
        return self._embedder

    @property
    def cfg(self) -> CleanSettings:
        return self.settings.clean

    def batches(self, stage: str, rows: int | None = None) -> Iterator[pa.Table]:
        """A committed stage table in batches of ``rows`` (default :attr:`batch_rows`); one empty table when
        it has no rows, so that a stage still says what it writes."""
        empty = True
        for batch in self.store.iter_stage(stage, batch_rows=rows or self.batch_rows):
            empty = False
            yield batch
        if empty:
            entry = STAGE_TABLES[stage]
            yield empty_table(self.store.stage_path(stage), entry.schema if entry.checked else None)


#: one part of a step's output: rows (kept and dropped) for some of the tables it writes, in row order
Part = dict[str, StageResult]


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
    (``storage/stages.py``) and ``run(ctx, reads, laps)``: the parts of its output, in row order, each
    appended to the tables' writers as it comes (``reads``: the table before its first; None for the
    first step). Done when every table it writes exists; a step that writes none always runs; a
    switchable table's step runs while its setting is on."""

    name = ""
    writes: tuple[str, ...] = ()

    def enabled(self, cfg: CleanSettings) -> bool:
        return all(STAGE_TABLES[t].enabled(cfg) for t in self.writes)

    def reads(self) -> str | None:
        first = self.writes[0] if self.writes else None
        return table_before(first) if first and first != CLEAN_STAGES[0].table else None

    def run(self, ctx: CleanContext, reads: str | None, laps: Laps) -> Iterator[Part]:
        raise NotImplementedError


def streamed(stage: Stage | None, table: str, batches: Iterable[pa.Table]) -> Iterator[Part]:
    """A streamed stage (``tasks/cleaning/stage.py``) fed batch by batch (read them in its ``batch_rows``);
    None: every row passes."""
    for batch in released(batches):
        yield {table: stage.run_batch(batch) if stage is not None else StageResult.keep_all(batch)}


def window_map(ctx: CleanContext, fn: Any, name: str, items: Iterable[Any]) -> Iterator[Any]:
    """``fn(<name>=item, cfg=ctx.cfg)`` for each item, mapped on the runner :data:`MAP_WINDOW` items at a
    time; the results in order. Memory: one window's items and results."""
    items = iter(items)
    while window := list(itertools.islice(items, MAP_WINDOW)):
        for future in ctx.runner.map(fn, {name: window, "cfg": unmapped(ctx.cfg)}):
            yield future.result()
        del window
        release_unused_memory()  # the window's tables are gone: their buffers go back to the OS


class ValidateShards(Step):
    name, writes = "validate", ("valid",)

    def run(self, ctx, reads, laps):
        for result in window_map(ctx, validate_shard, "path", ctx.shard_files):
            yield {"valid": result}
        ctx.store.write_inputs(ctx.runs, ctx.fingerprint)
        if not ctx.shard_files:
            yield {"valid": StageResult.keep_all(EXAMPLE_SCHEMA.empty_table())}


class Dedup(Step):
    """Global: the facts of each batch (ids, digests, signatures; mapped on the runner), decided together,
    then the kept rows stream through."""

    name, writes = "dedup", ("deduped",)

    def run(self, ctx, reads, laps):
        batches = ctx.store.iter_stage(reads, DEDUP_COLUMNS, ctx.batch_rows)  # MAP_WINDOW of them in flight
        facts = DedupFacts.join(window_map(ctx, dedup_facts_task, "batch", batches), ctx.cfg)
        keep, dropped = dedup_decisions(facts, ctx.cfg)
        del facts
        checkpoint("dedup.done")
        yield {"deduped": StageResult(EXAMPLE_SCHEMA.empty_table(), dropped)}
        offset = 0
        for batch in released(ctx.batches(reads)):
            yield {"deduped": StageResult.keep_all(batch.filter(pa.array(keep[offset : offset + batch.num_rows])))}
            offset += batch.num_rows


class DecontaminateStep(Step):
    """Drop rows near an eval text (clean.decontaminate), batch by batch; off, the rows pass through unchanged."""

    name, writes = "decontaminate", ("decontaminated",)

    def run(self, ctx, reads, laps):
        stage = None
        if ctx.cfg.decontaminate:
            # the ranking's embedder and cache (the positives are embedded once), vectors memory-mapped
            eval_texts = gather_eval_texts(ctx.settings)
            stage = Decontaminate(eval_texts, ctx.cfg, file_encoder(ctx.embedder, ctx.store, "decontaminate"))
            get_run_logger().info("decontaminate: %d eval texts", len(eval_texts))
        yield from streamed(stage, "decontaminated", ctx.batches(reads, stage.batch_rows if stage else None))


class RankFilterAndMine(Step):
    """Embed (lap ``embed``), then the rank filter and mining per block of queries (one search each)."""

    name, writes = "filter_and_mine", ("filtered", "mined")

    def run(self, ctx, reads, laps):
        if ctx.store.count(ctx.store.stage_path(reads)) == 0:
            raise ValueError(f"no rows survived validation and dedup in {ctx.store.root}; nothing to filter")
        rows = ctx.store.iter_stage(reads, EMBED_COLUMNS)  # record batches: one block of texts at a time
        vectors = embed(rows, ctx.cfg, ctx.store, ctx.embedder)
        laps.lap("embed")
        blocks = ctx.batches(reads, ctx.block_rows)
        searched = None
        if ctx.cfg.search_blocks > 1:  # the search's query blocks on the runner's workers (from the flow body)
            split = iter_split(
                vectors.corpus_vecs, vectors.query_vecs, result_width(ctx.cfg), ctx.cfg, runner=ctx.runner
            )
            searched = SplitCursor(split)
        parts = filter_and_mine_blocks(blocks, vectors, ctx.cfg, rank_filter_and_mine, searched)
        for filtered, mined in released(parts):  # a block's results, and the pages it read, go once written
            yield {"filtered": filtered, "mined": mined}
        ctx.store.remove_ranking_files()  # the vectors are in the embedding cache; a resume rebuilds them


class Judge(Step):
    """The LLM judge (clean.judge): false negatives replaced, positives relabelled or dropped."""

    name, writes = "judge", ("verified",)

    def run(self, ctx, reads, laps):
        yield {"verified": llm_judge(ctx.store.read_stage(reads), ctx.settings, ctx.store, get_run_logger())}


class Export(Step):
    """The export, rewritten from the last enabled stage table on every run, batch by batch."""

    name = "export"

    def run(self, ctx, reads, laps):
        store, cfg = ctx.store, ctx.cfg
        final = final_table(cfg)
        schema = open_parquet(store.stage_path(final)).schema_arrow
        keys = store.iter_stage(final, [n for n in KEY_COLUMNS if n in schema.names])
        batches = released(store.iter_stage(final, [n for n in EXPORT_COLUMNS if n in schema.names], EXPORT_BATCH_ROWS))
        result = export_corpus(ExportRows(schema, keys, batches), store.export_dir, cfg)
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
        yield from ()


#: the clean run, in order: each step's tables are a run of storage/stages.py's CLEAN_STAGES
STEPS: tuple[Step, ...] = (ValidateShards(), Dedup(), DecontaminateStep(), RankFilterAndMine(), Judge(), Export())


# --- the flow ------------------------------------------------------------------------------------
def clean_run(
    settings: Settings, clean_id: str, runs: list[str] | None = None, publish_to: str | None = None
) -> CleanSummary:
    store = CleanStore.from_settings(settings, clean_id)
    runs = runs or list_runs(store.data_dir)
    if not runs:
        raise ValueError(f"no generation runs under {store.data_dir}/runs; run `embed-factory run` first")
    # the CPU-heavy stages (validation per shard, dedup's reading per batch) map onto threads or Dask
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
    """Run each enabled step whose tables are not all committed; returns the seconds each step that ran took.

    A step's parts are appended to its tables' writers as they come (``stage.batch`` fault point after
    each); its tables are committed together once it is done, so a crash leaves them committed or not."""
    logger, laps = get_run_logger(), Laps()
    for step in steps:
        if step.writes and all(ctx.store.has(t) for t in step.writes):
            continue
        if not step.enabled(ctx.cfg):
            continue
        laps.start()
        with contextlib.ExitStack() as stack:
            writers = {t: stack.enter_context(ctx.store.stage_writer(t)) for t in step.writes}
            for part in step.run(ctx, step.reads(), laps):
                for table, result in part.items():
                    writers[table].append(result.kept, result.dropped)
                checkpoint("stage.batch")
            for writer in writers.values():
                writer.commit()
        release_unused_memory()  # the step's tables are written: a later step starts from what is live
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
        store.count_by_type_and_model("deduped"),
        store.count_by_type_and_model(final_table(ctx.cfg)),  # what the export wrote, row for row
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
    publish_clean(catalog, summary)  # the funnel, drop reasons, samples and links in the UI
    return summary


@flow(name="clean", flow_run_name="clean-{clean_id}")
def clean(
    clean_id: str, runs: list[str] | None = None, publish_to: str | None = None, profile: str | None = None
) -> CleanSummary:
    """Validate, deduplicate, rank-filter and mine hard negatives over generation runs; export the corpus.

    Args:
        clean_id: Id of this clean run; re-use one to resume it at its first missing stage.
        runs: Generation runs to include (default: every run in the data folder).
        publish_to: Also publish the export: a local folder or a Hugging Face dataset repo id (token from HF_TOKEN).
        profile: Settings profile: local or production (default: the environment's).
    """
    return clean_run(load_settings(profile=profile), clean_id, runs, publish_to)
