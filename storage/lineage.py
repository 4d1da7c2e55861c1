"""The lineage of imported and grounded runs: which input file and line (or document and passage) each row came from.

Generated rows carry their lineage in ``EXAMPLE_SCHEMA`` (persona, instruction, model...). An imported row
has none of that; its origin is a file and a line, kept beside the run's shards rather than in the example
schema (which every stage streams)::

    runs/<run_id>/lineage/<shard>.parquet     LINEAGE_SCHEMA: example_id -> source, file, line, layout

A grounded run (``generation.corpus``) writes the same files: its source is ``grounded``, the file the
document within the corpus, the line the passage's number in it, with the passage id, question type and
difficulty the run chose (the optional columns, null for imported rows).

A shard's lineage file is written before its data file, the shard's commit point (``storage/shards.py``),
like its rejects: a crash in between leaves no data file, the shard is redone and its lineage overwritten.
The catalog's ``lineage`` view reads them all, so ``raw JOIN lineage USING (example_id)`` answers where an
imported row came from, and the export's ``example_id`` joins it too.
"""

from __future__ import annotations

import shutil
from typing import Any

import pyarrow as pa

from storage.atomic import atomic_write_parquet
from storage.location import StorePath, is_remote
from storage.schemas import LINEAGE_SCHEMA
from storage.shards import RunStore, read_parquet_checked, rows_to_table

LINEAGE_DIR = "lineage"


def lineage_path(store: RunStore, shard_id: str) -> StorePath:
    return store.root / LINEAGE_DIR / f"{shard_id}.parquet"


#: the columns only some sources fill (a grounded run's passage, question type, difficulty): null when absent
OPTIONAL = tuple(LINEAGE_SCHEMA.metadata[b"embed_factory.optional"].decode().split(","))


def write_lineage(store: RunStore, shard_id: str, rows: list[dict[str, Any]]) -> None:
    """Write one shard's lineage (call before ``store.write_shard``: the data file commits the shard)."""
    rows = [{**dict.fromkeys(OPTIONAL), **row} for row in rows]
    atomic_write_parquet(rows_to_table(rows, LINEAGE_SCHEMA), lineage_path(store, shard_id), store.compression)


def read_lineage(store: RunStore) -> pa.Table:
    """Every lineage row of the run, shard by shard."""
    files = sorted((store.root / LINEAGE_DIR).glob("*.parquet"), key=str)
    if not files:
        return LINEAGE_SCHEMA.empty_table()
    return pa.concat_tables([read_parquet_checked(f, LINEAGE_SCHEMA) for f in files])


def discard_run(store: RunStore) -> None:
    """Remove a run's folder and everything in it: an import that can never complete (a bad input file)
    leaves nothing behind for a clean to pick up. Call it after the run's lock is released."""
    if is_remote(store.root):
        if store.root.exists():
            store.root.fs.rm(store.root.path, recursive=True)
        return
    shutil.rmtree(store.root, ignore_errors=True)
