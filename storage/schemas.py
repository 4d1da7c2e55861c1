"""Arrow schemas of every table and file the factory writes: runs, clean runs, the embedding cache, exports.

The one schema module: the columns of every table are defined here and nowhere else.
"""

from __future__ import annotations

import pyarrow as pa

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
    ],
    metadata={"embed_factory.table": "instructions", "embed_factory.schema_version": str(SCHEMA_VERSION)},
)

# --- the clean run (storage/corpus.py) ----------------------------------------------------------

#: one dropped row: which stage dropped it and why
DROPPED_SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),
        ("run_id", pa.string()),
        ("task_type", pa.string()),
        ("stage", pa.string()),  # validate | dedup_exact | dedup_near | rank_filter | negatives
        ("reason", pa.string()),  # short machine-friendly reason, e.g. "empty_query", "near_duplicate"
        ("detail", pa.string()),  # human detail, e.g. "duplicate of <example_id>", "positive rank 73"
    ],
    metadata={"embed_factory.table": "dropped"},
)

#: columns the rank filter adds to the example columns (filtered.parquet)
FILTER_COLUMNS = [("positive_rank", pa.int32()), ("positive_score", pa.float32())]
#: columns hard-negative mining adds to the filtered columns (mined.parquet)
MINED_COLUMNS = [("hard_negatives", pa.list_(pa.string())), ("hard_negative_scores", pa.list_(pa.float32()))]

#: the embedding cache, ``<data_dir>/embeddings/<model_key>/*.parquet``: vectors by text hash
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
