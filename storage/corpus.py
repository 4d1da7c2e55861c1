"""The cleaned corpus: stage tables of one clean run, the embedding cache, and the exports.

Layout of ``<data_dir>/clean/<clean_id>/``::

    inputs.json              the generation runs it read
    valid.parquet            rows that passed validation
    deduped.parquet          rows left after exact and near-duplicate removal
    filtered.parquet         rows whose positive ranks within the top k (+ positive_rank, positive_score)
    mined.parquet            filtered rows with hard negatives (+ hard_negatives, hard_negative_scores)
    dropped/<stage>.parquet  every dropped row with its stage and reason
    export/                  training files (KaLM JSONL/Parquet, sentence-transformers columns, held-out split)
    report.html

and ``<data_dir>/embeddings/<model_key>/*.parquet`` caches vectors by text hash across runs.
Every stage table is written atomically; a stage whose table exists is not recomputed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.shards import StorageError, atomic_write_bytes, atomic_write_parquet, read_parquet_checked

STAGES = ("valid", "deduped", "filtered", "mined")

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

#: columns the rank filter adds
FILTER_COLUMNS = [("positive_rank", pa.int32()), ("positive_score", pa.float32())]
#: columns hard-negative mining adds
MINED_COLUMNS = [("hard_negatives", pa.list_(pa.string())), ("hard_negative_scores", pa.list_(pa.float32()))]

EMBEDDING_CACHE_SCHEMA = pa.schema([("text_hash", pa.string()), ("vector", pa.list_(pa.float32()))])


@dataclass
class StageResult:
    """What every cleaning stage returns: the rows it kept and the rows it dropped (DROPPED_SCHEMA)."""

    kept: pa.Table
    dropped: pa.Table

    @staticmethod
    def dropped_rows(rows: list[dict[str, Any]]) -> pa.Table:
        return pa.Table.from_pylist(rows, schema=DROPPED_SCHEMA)


def text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


class CleanStore:
    def __init__(self, data_dir: Path, clean_id: str, compression: str = "zstd"):
        if not clean_id or "/" in clean_id or clean_id.startswith("."):
            raise ValueError(f"invalid clean id {clean_id!r}")
        self.clean_id = clean_id
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / "clean" / clean_id
        self.compression = compression

    def stage_path(self, stage: str) -> Path:
        return self.root / f"{stage}.parquet"

    def dropped_path(self, stage: str) -> Path:
        return self.root / "dropped" / f"{stage}.parquet"

    @property
    def export_dir(self) -> Path:
        return self.root / "export"

    @property
    def report_path(self) -> Path:
        return self.root / "report.html"

    def has(self, stage: str) -> bool:
        return self.stage_path(stage).exists()

    def write_stage(self, stage: str, result: StageResult, drop_stage: str | None = None) -> None:
        """Dropped rows first, then the stage table (its commit point)."""
        atomic_write_parquet(result.dropped.cast(DROPPED_SCHEMA), self.dropped_path(drop_stage or stage),
                             self.compression)
        atomic_write_parquet(result.kept, self.stage_path(stage), self.compression)

    def write_dropped(self, name: str, dropped: pa.Table) -> None:
        atomic_write_parquet(dropped.cast(DROPPED_SCHEMA), self.dropped_path(name), self.compression)

    def write_table(self, stage: str, table: pa.Table) -> None:
        atomic_write_parquet(table, self.stage_path(stage), self.compression)

    def read_stage(self, stage: str, schema: pa.Schema | None = None) -> pa.Table:
        """A stage table; with ``schema``, checked to have (and cast to) its columns, extra ones dropped."""
        path = self.stage_path(stage)
        if schema is not None:
            return read_parquet_checked(path, schema)
        try:
            return pq.read_table(path)
        except FileNotFoundError:
            raise StorageError(f"{path}: file not found") from None
        except (pa.ArrowException, OSError) as exc:
            raise StorageError(f"{path}: unreadable Parquet ({exc})") from None

    def count(self, path: Path) -> int:
        """Rows of a Parquet file, from its footer (nothing else is read)."""
        try:
            return pq.read_metadata(path).num_rows
        except (pa.ArrowException, OSError) as exc:
            raise StorageError(f"{path}: unreadable Parquet ({exc})") from None

    def write_inputs(self, run_ids: list[str]) -> None:
        atomic_write_bytes(self.root / "inputs.json", json.dumps({"runs": run_ids}, indent=1).encode())

    def embeddings_dir(self, model_key: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_key)
        return self.data_dir / "embeddings" / safe
