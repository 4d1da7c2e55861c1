"""The passages of a grounded run, ``runs/<run_id>/passages.parquet`` (``PASSAGE_SCHEMA``), written once.

A grounded run reads its corpus and matches personas once, on its first session; the table is written
atomically and every later session (a resume after a crash) plans from it, so a changed corpus or persona
source cannot change what a resumed run generates. The catalog's ``passages`` view reads them all.
"""

from __future__ import annotations

import pyarrow as pa

from storage.atomic import atomic_write_parquet
from storage.location import StorePath
from storage.schemas import PASSAGE_SCHEMA
from storage.shards import RunStore, read_parquet_checked

PASSAGES_FILE = "passages.parquet"


def passages_path(store: RunStore) -> StorePath:
    return store.root / PASSAGES_FILE


def write_passages(store: RunStore, table: pa.Table) -> None:
    atomic_write_parquet(
        table.select(PASSAGE_SCHEMA.names).cast(PASSAGE_SCHEMA), passages_path(store), store.compression
    )


def read_passages(store: RunStore) -> pa.Table | None:
    """The run's passages, or None before its first session wrote them."""
    path = passages_path(store)
    return read_parquet_checked(path, PASSAGE_SCHEMA) if path.exists() else None
