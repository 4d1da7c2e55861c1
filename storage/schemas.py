"""Arrow schemas of every table and file the factory writes: runs, clean runs, the embedding cache, exports.

The one schema module: the columns of every table are defined here and nowhere else.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = 1

#: one parsed example, with full lineage
EXAMPLE_SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),  # run_id/shard/index: unique and stable across re-runs
        ("run_id", pa.string()),
        ("shard_id", pa.string()),
        ("task_type", pa.string()),
        ("instruction", pa.string()),
        ("instruction_id", pa.string()),
        ("persona_id", pa.string()),  # persona that brainstormed the instruction (null for STS/bitext)
        ("persona", pa.string()),
        ("placeholders", pa.string()),  # JSON object
        ("prompt_version", pa.string()),
        ("model", pa.string()),
        ("sampling", pa.string()),  # JSON object: temperature, top_p, max_tokens, seed
        ("attempts", pa.int32()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("latency_s", pa.float32()),
        ("finish_reason", pa.string()),
        ("query", pa.string()),
        ("positive", pa.string()),
        ("negative", pa.string()),
        ("parsed", pa.string()),  # JSON object as the model returned it (validated)
        ("raw_text", pa.string()),
        ("created_at", pa.timestamp("ms", tz="UTC")),
    ],
    metadata={"embed_factory.table": "examples", "embed_factory.schema_version": str(SCHEMA_VERSION)},
)

#: one request that ended without a parsed example
REJECT_SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),
        ("run_id", pa.string()),
        ("shard_id", pa.string()),
        ("stage", pa.string()),  # "brainstorm" or "generate"
        ("task_type", pa.string()),
        ("instruction", pa.string()),
        ("persona_id", pa.string()),
        ("prompt_version", pa.string()),
        ("model", pa.string()),
        ("attempts", pa.int32()),
        ("reason", pa.string()),
        ("finish_reason", pa.string()),
        ("raw_text", pa.string()),
        ("created_at", pa.timestamp("ms", tz="UTC")),
    ],
    metadata={"embed_factory.table": "rejects", "embed_factory.schema_version": str(SCHEMA_VERSION)},
)

#: one brainstormed instruction as returned (before dedup), with the persona that produced it
BRAINSTORM_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("shard_id", pa.string()),
        ("task_type", pa.string()),
        ("instruction", pa.string()),
        ("persona_id", pa.string()),
        ("persona", pa.string()),
        ("prompt_version", pa.string()),
        ("model", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("latency_s", pa.float32()),
        ("created_at", pa.timestamp("ms", tz="UTC")),
    ],
    metadata={"embed_factory.table": "brainstorm", "embed_factory.schema_version": str(SCHEMA_VERSION)},
)

#: the unique-instruction table (normalized-text dedup of the brainstorm table)
INSTRUCTION_SCHEMA = pa.schema(
    [
        ("instruction_id", pa.string()),
        ("task_type", pa.string()),
        ("instruction", pa.string()),
        ("normalized", pa.string()),
        ("persona_id", pa.string()),
        ("persona", pa.string()),
        # semantic dedup (tasks/generation/intents.py); absent from runs made before it, read as nulls
        ("intent_id", pa.string()),
        ("nearest_similarity", pa.float32()),  # cosine to the most similar other instruction of the type
    ],
    metadata={
        "embed_factory.table": "instructions",
        "embed_factory.schema_version": str(SCHEMA_VERSION),
        "embed_factory.optional": "intent_id,nearest_similarity",
    },
)

# --- the clean run (storage/corpus.py) ----------------------------------------------------------

#: one dropped row: which stage dropped it and why
DROPPED_SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),
        ("run_id", pa.string()),
        ("task_type", pa.string()),
        ("stage", pa.string()),  # the stage that dropped it: a drop name of storage/stages.py
        ("reason", pa.string()),  # short machine-friendly reason, e.g. "empty_query", "near_duplicate"
        ("detail", pa.string()),  # human detail, e.g. "duplicate of <example_id>", "positive rank 73"
    ],
    metadata={"embed_factory.table": "dropped"},
)

#: columns the rank filter adds to the example columns (filtered.parquet)
FILTER_COLUMNS = [("positive_rank", pa.int32()), ("positive_score", pa.float32())]
#: columns hard-negative mining adds to the filtered columns (mined.parquet)
MINED_COLUMNS = [("hard_negatives", pa.list_(pa.string())), ("hard_negative_scores", pa.list_(pa.float32()))]

#: columns mining also adds for the LLM judge (tasks/cleaning/judge.py): each chosen negative's 1-based rank,
#: the usable candidates it did not pick (replacements, best first, at most negatives_per_query), and the
#: best-ranked retrieved text that is not the positive or the query
CANDIDATE_COLUMNS = [
    ("hard_negative_ranks", pa.list_(pa.int32())),
    ("spare_negatives", pa.list_(pa.string())),
    ("spare_negative_scores", pa.list_(pa.float32())),
    ("spare_negative_ranks", pa.list_(pa.int32())),
    ("top_retrieved", pa.string()),
    ("top_retrieved_rank", pa.int32()),
    ("top_retrieved_score", pa.float32()),
]

#: columns the LLM judge adds to the mined columns (verified.parquet): positive replaced by a retrieved text,
#: and how many negatives judged relevant were removed (and replaced from the spares where there were some)
JUDGE_COLUMNS = [("judge_relabelled", pa.bool_()), ("judge_replaced", pa.int32())]

#: one LLM-judge decision, ``clean/<clean_id>/judged/part-*.parquet``: does ``candidate`` answer the row's query?
JUDGED_SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),
        ("task_type", pa.string()),
        ("candidate_hash", pa.string()),  # text_hash of the candidate text (the resume key, with prompt_version)
        ("candidate", pa.string()),
        ("candidate_rank", pa.int32()),  # 1-based rank in the filter's search; null when unknown
        ("role", pa.string()),  # positive | negative | replacement | top_retrieved
        ("prompt_version", pa.string()),
        ("model", pa.string()),
        ("verdict", pa.string()),  # relevant | partially_relevant | not_relevant | error
        ("reason", pa.string()),  # the judge's rationale, or the request's failure
        ("created_at", pa.timestamp("ms", tz="UTC")),
    ],
    metadata={"embed_factory.table": "judged", "embed_factory.schema_version": str(SCHEMA_VERSION)},
)

#: the embedding cache of earlier versions, ``<data_dir>/embeddings/<model_key>/*.parquet``: vectors by text
#: hash; read once to migrate it to segments (``storage/embedding_cache.py``)
EMBEDDING_CACHE_SCHEMA = pa.schema([("text_hash", pa.string()), ("vector", pa.list_(pa.float32()))])

# --- the export (training files) -----------------------------------------------------------------

#: KaLM-Embedding / FlagEmbedding records (``<split>.jsonl`` and ``<split>.parquet``)
KALM_SCHEMA = pa.schema(
    [
        ("query", pa.string()),
        ("pos", pa.list_(pa.string())),
        ("neg", pa.list_(pa.string())),
        ("task_name", pa.string()),
        ("example_id", pa.string()),
    ]
)


def st_schema(negatives: int) -> pa.Schema:
    """sentence-transformers columns (``<split>_st.parquet``): anchor, positive, negative_1..negative_n."""
    names = ["anchor", "positive"] + [f"negative_{i}" for i in range(1, negatives + 1)]
    return pa.schema([(name, pa.string()) for name in names])


# --- the cost ledger (ground/costs.py): runs/<run_id>/ledger.parquet and clean/<clean_id>/ledger.parquet ---

#: one row per ledger scope and task type. scope "generate": a generation run's LLM spend (accepted is null);
#: scope "clean": a clean run, its input runs' generation summed, its embedding/search, the fine-tune on its
#: export, and the rows that reached the export. Seconds are wall seconds; *_gpu_s are GPUs x wall seconds.
LEDGER_SCHEMA = pa.schema(
    [
        ("scope", pa.string()),  # "generate" | "clean"
        ("run_id", pa.string()),  # the generation run (scope generate); null for scope clean
        ("clean_id", pa.string()),  # the clean run (scope clean); null for scope generate
        ("task_type", pa.string()),
        ("model", pa.string()),
        ("prompt_version", pa.string()),
        ("endpoints", pa.int32()),  # LLM endpoints the run used
        ("llm_gpus_per_endpoint", pa.int32()),  # 0: the LLM ran on the CPU
        ("requests", pa.int64()),  # brainstorm + example requests (rejected ones included)
        ("llm_calls", pa.int64()),  # chat completions, schema re-asks included
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("examples", pa.int64()),  # parsed examples
        ("generation_wall_s", pa.float64()),  # the run's wall seconds, shared by tokens
        ("generation_gpu_s", pa.float64()),
        ("embed_s", pa.float64()),  # scope clean: the embed stage, shared by rows embedded
        ("search_s", pa.float64()),  # scope clean: the ranking search + mining, shared by rows searched
        ("clean_gpu_s", pa.float64()),
        ("train_s", pa.float64()),  # scope clean: the fine-tune on its export, shared by training rows
        ("train_gpu_s", pa.float64()),
        ("cpu_s", pa.float64()),  # wall seconds of the parts that ran on the CPU (priced at cost.cpu_hour_usd)
        ("accepted", pa.int64()),  # rows that reached the export (scope clean)
        ("gpu_hours", pa.float64()),
        ("cost_usd", pa.float64()),
        ("cost_per_1k_accepted", pa.float64()),
        # the plan stored with the run before it started (scope generate; null without one)
        ("plan_source", pa.string()),  # "history: <runs>" | "pilot: <n> requests"
        ("predicted_requests", pa.float64()),
        ("predicted_tokens", pa.float64()),
        ("predicted_wall_s", pa.float64()),
        ("predicted_gpu_hours", pa.float64()),
        ("predicted_cost_usd", pa.float64()),
        ("created_at", pa.timestamp("ms", tz="UTC")),
    ],
    metadata={"embed_factory.table": "ledger", "embed_factory.schema_version": str(SCHEMA_VERSION)},
)

# --- ablations (storage/ablation.py) -------------------------------------------------------------

#: one training run of an ablation, per evaluated Matryoshka dim (``<clean>/ablation/runs.parquet``)
ABLATION_RUN_SCHEMA = pa.schema(
    [
        ("variant", pa.string()),
        ("seed", pa.int64()),  # null for the untrained base model
        ("dim", pa.int32()),
        ("sts_spearman", pa.float64()),  # mean over the evaluated languages
        ("heldout_ndcg10", pa.float64()),  # null without a held-out split
        ("train_rows", pa.int64()),
        ("negatives", pa.int32()),  # negative columns per training row
        ("steps", pa.int32()),
        ("train_seconds", pa.float64()),
        ("same_as", pa.string()),  # a variant whose identical run (data and settings) was reused
    ]
)

#: the ablation table: variant x dim, mean and spread over seeds (``<clean>/ablation/results.parquet``)
ABLATION_SCHEMA = pa.schema(
    [
        ("variant", pa.string()),
        ("dim", pa.int32()),
        ("seeds", pa.int32()),
        ("sts_spearman_mean", pa.float64()),
        ("sts_spearman_std", pa.float64()),  # sample standard deviation over seeds (null with one)
        ("heldout_ndcg10_mean", pa.float64()),
        ("heldout_ndcg10_std", pa.float64()),
        ("train_rows", pa.int64()),
        ("negatives", pa.int32()),
        ("steps", pa.int32()),
    ]
)

#: ledger columns measured from wall clocks (or priced from them): they differ between two runs of the same
#: plan, so a file-for-file comparison of runs (the fault suite's snapshots) leaves them out
LEDGER_WALL_CLOCK_COLUMNS = (
    "generation_wall_s",
    "generation_gpu_s",
    "embed_s",
    "search_s",
    "clean_gpu_s",
    "train_s",
    "train_gpu_s",
    "cpu_s",
    "gpu_hours",
    "cost_usd",
    "cost_per_1k_accepted",
    "predicted_wall_s",
    "predicted_gpu_hours",
    "predicted_cost_usd",
)


def count_by_type(table: pa.Table, column: str = "task_type") -> dict[str, int]:
    """Rows per value of ``column`` (task type by default), in order of first appearance."""
    if table.num_rows == 0:
        return {}
    counts = pc.value_counts(table.column(column)).to_pylist()
    return {c["values"]: c["counts"] for c in counts}


# --- imported runs (storage/lineage.py) ----------------------------------------------------------

#: where one imported example came from, ``runs/<run_id>/lineage/<shard>.parquet`` (catalog view ``lineage``)
LINEAGE_SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),  # the example's id in the run's examples shards
        ("run_id", pa.string()),
        ("source", pa.string()),  # "imported" | "grounded"
        ("file", pa.string()),  # the input file (or datasets folder): an absolute local path or an s3:// URL
        ("line", pa.int64()),  # 1-based: the JSONL line, or the row of a Parquet file or datasets folder
        ("layout", pa.string()),  # kalm | triplet | query_positive (tasks/importing/layouts.py); null if grounded
        # grounded runs (source "grounded"; file: the document within the corpus, line: the passage's number in it)
        ("passage_id", pa.string()),  # the positive's passage (PASSAGE_SCHEMA)
        ("question_type", pa.string()),  # the config stage's answer (prompts/grounded.py)
        ("difficulty", pa.string()),
    ],
    metadata={
        "embed_factory.table": "lineage",
        "embed_factory.schema_version": str(SCHEMA_VERSION),
        "embed_factory.optional": "passage_id,question_type,difficulty",
    },
)

# --- grounded runs (storage/passages.py) ---------------------------------------------------------

#: one passage of a grounded run's corpus, ``runs/<run_id>/passages.parquet`` (catalog view ``passages``)
PASSAGE_SCHEMA = pa.schema(
    [
        ("passage_id", pa.string()),  # a hash of the passage's text: the same on every machine and re-run
        ("document", pa.string()),  # where it is within the corpus: "page.md", "docs.jsonl#12"
        ("position", pa.int32()),  # 1-based: the passage's number within its document
        ("words", pa.int32()),
        ("text", pa.string()),
        ("personas", pa.list_(pa.string())),  # the top-k persona ids by embedding similarity, best first
        ("persona_scores", pa.list_(pa.float32())),  # their cosine similarities
    ],
    metadata={"embed_factory.table": "passages", "embed_factory.schema_version": str(SCHEMA_VERSION)},
)
