"""Flow ``clean``: raw shards → valid → deduped → rank-filtered → mined → export + catalog + report.

Orchestration only: every stage is a function in ``tasks/`` wrapped as a Prefect task here, and
``storage/`` writes every stage table. A stage whose table exists is not recomputed, so a crashed
clean run resumes where it stopped; embeddings are cached by text hash across runs.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NONE as NO_CACHE
from prefect.task_runners import TaskRunner

from ground.faults import checkpoint
from ground.settings import CleanSettings, Settings, load_settings
from flows.runners import stage_runner
from storage.catalog import Catalog
from storage.corpus import CleanStore, StageResult
from storage.location import data_root
from storage.schemas import EXAMPLE_SCHEMA
from storage.shards import RunStore, list_runs, read_parquet_checked, remove_stale_temps
from tasks.cleaning.dedup import exact_dedup, merge_near_parts, near_dedup_part, split_by_task_type
from tasks.cleaning.embed import EmbeddingCache, encode_cached, make_embedder, query_text
from tasks.cleaning.export import export_corpus, publish_dataset, write_dataset_card
from tasks.cleaning.negatives import mine_hard_negatives
from tasks.cleaning.rank_filter import build_index, rank_filter
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


# --- thin task wrappers ------------------------------------------------------------------------
@task(name="validate-shard", cache_policy=NO_CACHE, task_run_name="validate-{path.parent.parent.name}-{path.stem}")
def validate_shard(path, cfg: CleanSettings) -> StageResult:
    return validate_examples(read_parquet_checked(path, EXAMPLE_SCHEMA), cfg)


@task(name="dedup-exact", cache_policy=NO_CACHE)
def dedup_exact(table: pa.Table) -> StageResult:
    return exact_dedup(table)


@task(name="dedup-near", cache_policy=NO_CACHE, task_run_name="dedup-near-{task_type}")
def dedup_near(task_type: str, part: pa.Table, cfg: CleanSettings) -> StageResult:
    return near_dedup_part(part, cfg)


@task(name="embed", cache_policy=NO_CACHE)
def embed(table: pa.Table, cfg: CleanSettings, store: CleanStore) -> dict[str, Any]:
    """Embed instructed queries and the corpus (unique positives ∪ negatives) once, with the cache."""
    embedder = make_embedder(cfg)
    cache = EmbeddingCache(store.embeddings_dir(embedder.model_key))  # fp32 and bf16 vectors kept apart
    queries = [query_text(i, q) for i, q in zip(table["instruction"].to_pylist(), table["query"].to_pylist())]
    positives = table["positive"].to_pylist()
    negatives = [n for n in table["negative"].to_pylist() if n]
    corpus = list(dict.fromkeys(positives + negatives))
    position = {text: i for i, text in enumerate(corpus)}
    return {
        "query_vecs": encode_cached(queries, embedder, cache),
        "corpus_texts": corpus,
        "corpus_vecs": encode_cached(corpus, embedder, cache),
        "positive_idx": np.array([position[p] for p in positives], dtype=np.int64),
    }


@task(name="rank-filter-and-mine", cache_policy=NO_CACHE)
def filter_and_mine(table: pa.Table, emb: dict[str, Any], cfg: CleanSettings) -> tuple[StageResult, StageResult]:
    index = build_index(emb["corpus_vecs"], cfg)
    filtered, search = rank_filter(table, emb["query_vecs"], emb["corpus_vecs"], emb["positive_idx"], cfg, index)
    # mining reuses the filter's one search, restricted to the rows it kept
    mined = mine_hard_negatives(filtered.kept, search.ids, search.scores, emb["corpus_texts"], emb["corpus_vecs"],
                                emb["positive_idx"][search.rows], cfg)
    return filtered, mined


# --- the flow ----------------------------------------------------------------------------------
def clean_run(settings: Settings, clean_id: str, runs: list[str] | None = None, publish_to: str | None = None) -> CleanSummary:
    data_dir = data_root(settings.storage)  # a local folder or an s3:// prefix
    store = CleanStore(data_dir, clean_id, settings.storage.compression)
    runs = runs or list_runs(data_dir)
    if not runs:
        raise ValueError(f"no generation runs under {data_dir}/runs; run `embed-factory run` first")
    # the CPU-heavy stages (validation per shard, near-dedup per task type) map onto threads or Dask
    with store.exclusive(), stage_runner(settings.clean) as runner:  # a second `clean` of the same id fails at once
        remove_stale_temps(store.data_dir / "embeddings")  # stale temp files go
        return _clean_stages(settings, store, runs, publish_to, runner)


def _clean_stages(settings: Settings, store: CleanStore, runs: list[str], publish_to: str | None,
                  runner: TaskRunner) -> CleanSummary:
    logger = get_run_logger()
    cfg = settings.clean
    data_dir, clean_id = store.data_dir, store.clean_id
    seconds: dict[str, float] = {}

    def timed(name: str, started: float) -> None:
        seconds[name] = round(time.monotonic() - started, 2)
        logger.info("stage %s done in %.1fs", name, seconds[name])

    shard_files = [path for run_id in runs for path in sorted((RunStore(data_dir, run_id).root / "examples").glob("*.parquet"))]
    if not store.has("valid"):
        started = time.monotonic()
        futures = runner.map(validate_shard, {"path": shard_files, "cfg": unmapped(cfg)}) if shard_files else []
        results = [future.result() for future in futures]
        store.write_inputs(runs)
        kept = pa.concat_tables([r.kept for r in results]) if results else EXAMPLE_SCHEMA.empty_table()
        dropped = pa.concat_tables([r.dropped for r in results]) if results else StageResult.dropped_rows([])
        store.write_stage("valid", StageResult(kept, dropped), drop_stage="validate")
        timed("validate", started)
    valid = store.read_stage("valid", EXAMPLE_SCHEMA)

    if not store.has("deduped"):
        started = time.monotonic()
        exact = dedup_exact(valid)
        parts = split_by_task_type(exact.kept)
        futures = runner.map(dedup_near, {"task_type": list(parts), "part": list(parts.values()),
                                          "cfg": unmapped(cfg)}) if parts else []
        near = merge_near_parts(exact.kept, [future.result() for future in futures])
        checkpoint("dedup.done")
        store.write_dropped("dedup_exact", exact.dropped)
        store.write_stage("deduped", near, drop_stage="dedup_near")
        timed("dedup", started)
    deduped = store.read_stage("deduped", EXAMPLE_SCHEMA)

    if not store.has("mined"):
        if deduped.num_rows == 0:
            raise ValueError(f"no rows survived validation and dedup in {store.root}; nothing to filter")
        started = time.monotonic()
        emb = embed(deduped, cfg, store)
        timed("embed", started)
        started = time.monotonic()
        filtered, mined = filter_and_mine(deduped, emb, cfg)
        store.write_stage("filtered", filtered, drop_stage="rank_filter")
        store.write_stage("mined", mined, drop_stage="negatives")
        timed("filter_and_mine", started)
    mined_table = store.read_stage("mined")

    started = time.monotonic()
    result = export_corpus(mined_table, store.export_dir, cfg)
    write_dataset_card(store.export_dir, result, {"clean_id": clean_id, "runs": runs, "model": settings.llm_model,
                                                  "embedding_model": cfg.embedding_model or "all-MiniLM-L6-v2"})
    checkpoint("export.card")
    if publish_to:
        publish_dataset(store.export_dir, publish_to, token=os.environ.get("HF_TOKEN"))
    export_location = store.upload_export()  # on S3: the staged export goes up, card last
    timed("export", started)

    catalog = Catalog(data_dir)
    catalog.refresh()
    checkpoint("catalog.refreshed")
    report = write_report(catalog, clean_id, store.report_path)

    counts = {"raw": sum(store.count(path) for path in shard_files)}
    dropped_counts: dict[str, int] = {}
    for stage in ("valid", "deduped", "filtered", "mined"):
        counts[stage] = store.count(store.stage_path(stage))
    for path in sorted((store.root / "dropped").glob("*.parquet")):
        dropped_counts[path.stem] = store.count(path)
    logger.info("clean %s: %s; dropped %s", clean_id, counts, dropped_counts)
    return CleanSummary(clean_id, runs, counts, dropped_counts, str(export_location), str(report), seconds)


@flow(name="clean", flow_run_name="clean-{clean_id}")
def clean(clean_id: str, runs: list[str] | None = None, publish_to: str | None = None,
          profile: str | None = None) -> dict[str, Any]:
    """Validate, deduplicate, rank-filter and mine hard negatives over generation runs; export the corpus.

    Args:
        clean_id: Id of this clean run; re-use one to resume it at its first missing stage.
        runs: Generation runs to include (default: every run in the data folder).
        publish_to: Also publish the export: a local folder or a Hugging Face dataset repo id (token from HF_TOKEN).
        profile: Settings profile: local or production (default: the environment's).
    """
    return asdict(clean_run(load_settings(profile=profile), clean_id, runs, publish_to))
