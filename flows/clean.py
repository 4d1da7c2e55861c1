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

from embed_factory.settings import CleanSettings, Settings, load_settings
from storage.catalog import Catalog
from storage.corpus import CleanStore, StageResult
from storage.schemas import EXAMPLE_SCHEMA
from storage.shards import RunStore, list_runs, read_parquet_checked
from tasks.dedup import exact_dedup, near_dedup
from tasks.embed import EmbeddingCache, encode_cached, make_embedder, query_text
from tasks.export import export_corpus, publish_dataset, write_dataset_card
from tasks.negatives import mine_hard_negatives
from tasks.rank_filter import build_index, rank_filter
from tasks.report import write_report
from tasks.validate import validate_examples


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


@task(name="dedup", cache_policy=NO_CACHE)
def dedup(table: pa.Table, cfg: CleanSettings) -> tuple[StageResult, StageResult]:
    exact = exact_dedup(table)
    near = near_dedup(exact.kept, cfg)
    return exact, near


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
    logger = get_run_logger()
    cfg = settings.clean
    data_dir = settings.storage.data_dir
    store = CleanStore(data_dir, clean_id, settings.storage.compression)
    runs = runs or list_runs(data_dir)
    if not runs:
        raise ValueError(f"no generation runs under {data_dir}/runs; run `embed-factory run` first")
    seconds: dict[str, float] = {}

    def timed(name: str, started: float) -> None:
        seconds[name] = round(time.monotonic() - started, 2)
        logger.info("stage %s done in %.1fs", name, seconds[name])

    shard_files = [path for run_id in runs for path in sorted((RunStore(data_dir, run_id).root / "examples").glob("*.parquet"))]
    if not store.has("valid"):
        started = time.monotonic()
        store.write_inputs(runs)
        results = [future.result() for future in validate_shard.map(shard_files, cfg=unmapped(cfg))] if shard_files else []
        kept = pa.concat_tables([r.kept for r in results]) if results else EXAMPLE_SCHEMA.empty_table()
        dropped = pa.concat_tables([r.dropped for r in results]) if results else StageResult.dropped_rows([])
        store.write_stage("valid", StageResult(kept, dropped), drop_stage="validate")
        timed("validate", started)
    valid = store.read_stage("valid", EXAMPLE_SCHEMA)

    if not store.has("deduped"):
        started = time.monotonic()
        exact, near = dedup(valid, cfg)
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
    if publish_to:
        publish_dataset(store.export_dir, publish_to, token=os.environ.get("HF_TOKEN"))
    timed("export", started)

    catalog = Catalog(data_dir)
    catalog.refresh()
    report = write_report(catalog, clean_id, store.report_path)

    counts = {"raw": sum(store.count(path) for path in shard_files)}
    dropped_counts: dict[str, int] = {}
    for stage in ("valid", "deduped", "filtered", "mined"):
        counts[stage] = store.count(store.stage_path(stage))
    for path in sorted((store.root / "dropped").glob("*.parquet")):
        dropped_counts[path.stem] = store.count(path)
    logger.info("clean %s: %s; dropped %s", clean_id, counts, dropped_counts)
    return CleanSummary(clean_id, runs, counts, dropped_counts, str(store.export_dir), str(report), seconds)


@flow(name="clean", flow_run_name="clean-{clean_id}")
def clean(clean_id: str, runs: list[str] | None = None, publish_to: str | None = None,
          profile: str | None = None) -> dict[str, Any]:
    """Validate, deduplicate, rank-filter and mine hard negatives over generation runs; export the corpus."""
    return asdict(clean_run(load_settings(profile=profile), clean_id, runs, publish_to))
