"""Stage tables in bounded memory: read as record batches, written by appending batches, committed atomically.

A clean stage reads its input with :func:`iter_table` (``pq.ParquetFile.iter_batches``, re-cut into
tables of exactly ``batch_rows`` rows but the last, so a consumer's batches do not depend on how the file's
row groups fall) and appends its kept and dropped rows to a :class:`StageWriter`: one Parquet writer per
file (the table and each of its drop files), under temp names. :meth:`StageWriter.commit` closes them,
fsyncs, renames the drop files and then the table (the commit point; fault points ``stage.dropped`` /
``stage.table`` as :meth:`storage.corpus.CleanStore.write_stage`); an error or a kill before it leaves
nothing committed and at most temp files, which ``remove_stale_temps`` deletes. On S3 each file is built
in memory and sent in one PUT at commit (an object PUT is atomic), as ``storage/atomic.py`` does.

A write that fails (disk full, read-only) is one :class:`~storage.atomic.StorageError` line naming the
stage and the file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ground.faults import checkpoint
from storage.atomic import PARQUET_POINT, StorageError, os_reason, temp_path
from storage.location import StorePath, is_remote, parquet_source, put_bytes
from storage.mapped import release_mapped_pages
from storage.schemas import DROPPED_SCHEMA

#: glibc, for ``malloc_trim`` (None elsewhere: other C libraries have no such call)
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None
if _LIBC is not None and not hasattr(_LIBC, "malloc_trim"):
    _LIBC = None

#: rows per batch a streamed stage is fed (and the default of :func:`iter_table`): its memory, flat in the
#: rows of the run; 16k production-shaped rows (raw_text, parsed, documents) are ~0.2 GiB of Arrow buffers
BATCH_ROWS = 16_384


def release_unused_memory() -> None:
    """Hand memory that nothing uses back to the OS, between a stage's windows, blocks and steps:

    * cyclic garbage first (``gc.collect``): tables and arrays referenced from reference cycles (the task
      runner's futures and states make them) are otherwise freed only when the collector's oldest generation
      runs, so a stage's earlier batches stayed alive (validation's window grew 0.17 → 0.67 GiB of live Arrow
      memory over 16 shards of 5,000 rows until a collection);
    * the Arrow memory pool's freed pages (mimalloc, jemalloc keep them for reuse), and glibc's (``malloc_trim``);
    * the resident pages of the memory-mapped vector and text files (``storage/vector_files.py``): they stay in
      the page cache, and the next block maps what it reads.
    """
    gc.collect()
    pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    release_mapped_pages()


def released(parts: Iterable[Any]) -> Iterator[Any]:
    """``parts`` as they come, with :func:`release_unused_memory` after each is consumed: a streamed pass whose
    memory is one part's."""
    for part in parts:
        yield part
        release_unused_memory()


def open_parquet(path: StorePath) -> pq.ParquetFile:
    source, filesystem = parquet_source(path)
    try:
        return pq.ParquetFile(source, filesystem=filesystem)
    except FileNotFoundError:
        raise StorageError(f"{path}: file not found") from None
    except (pa.ArrowException, OSError) as exc:
        raise StorageError(f"{path}: unreadable Parquet ({exc})") from None


def rebatch(batches: Iterable[pa.RecordBatch | pa.Table], rows: int) -> Iterator[pa.Table]:
    """``batches`` re-cut into tables of exactly ``rows`` rows (the last: the rest; none for no rows)."""
    pending: list[pa.Table] = []
    have = 0
    for batch in batches:
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        pending.append(table)
        have += table.num_rows
        while have >= rows:
            joined = pa.concat_tables(pending)
            yield joined.slice(0, rows)
            rest = joined.slice(rows)
            pending, have = [rest], rest.num_rows
    if have:
        yield pa.concat_tables(pending)


def iter_table(
    path: StorePath,
    schema: pa.Schema | None = None,
    columns: Sequence[str] | None = None,
    batch_rows: int = BATCH_ROWS,
) -> Iterator[pa.Table]:
    """The rows of a Parquet file, ``batch_rows`` at a time, in file order.

    With ``schema``: checked to have (and cast to) its columns as ``read_parquet_checked`` does (columns
    added later, named in the schema's ``embed_factory.optional`` metadata, are nulls in older files);
    ``columns`` (with or without ``schema``) narrows what is read.
    """
    file = open_parquet(path)
    names = file.schema_arrow.names
    want = list(columns) if columns is not None else (schema.names if schema is not None else names)
    optional: set[str] = set()
    if schema is not None:
        optional = set((schema.metadata or {}).get(b"embed_factory.optional", b"").decode().split(","))
        missing = [n for n in want if n not in names and n not in optional]
        if missing:
            raise StorageError(f"{path}: missing column(s) {', '.join(missing)} (older schema?)")
    present = [n for n in want if n in names]
    try:
        for table in rebatch(file.iter_batches(batch_size=batch_rows, columns=present), batch_rows):
            if schema is not None:
                for name in want:
                    if name not in names:
                        table = table.append_column(name, pa.nulls(table.num_rows, schema.field(name).type))
                table = table.select(want).cast(pa.schema([schema.field(n) for n in want]))
            yield table
    except (pa.ArrowException, OSError) as exc:
        raise StorageError(f"{path}: unreadable Parquet ({exc})") from None


def empty_table(path: StorePath, schema: pa.Schema | None = None) -> pa.Table:
    """No rows, with the columns :func:`iter_table` would give."""
    return (schema or open_parquet(path).schema_arrow).empty_table()


class ParquetSink:
    """One Parquet file written by appending tables, made visible only by :meth:`commit`."""

    def __init__(self, path: StorePath, what: str, compression: str):
        self.path, self.what, self.compression = path, what, compression
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._buffer: pa.BufferOutputStream | None = None
        self._tmp = None

    def _fail(self, exc: OSError) -> StorageError:
        return StorageError(f"{self.what}: cannot write {self.path}: {os_reason(exc)}")

    @property
    def schema(self) -> pa.Schema | None:
        return self._writer.schema if self._writer is not None else None

    def write(self, table: pa.Table) -> None:
        try:
            if self._writer is None:
                if is_remote(self.path):
                    self._buffer = pa.BufferOutputStream()
                    sink: Any = self._buffer
                else:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._tmp = sink = temp_path(self.path)
                self._writer = pq.ParquetWriter(sink, table.schema, compression=self.compression)
            elif table.schema != self._writer.schema:
                table = table.cast(self._writer.schema)
            if table.num_rows:  # the first call fixes the schema; a file of no rows has no row group
                self._writer.write_table(table)
            self.rows += table.num_rows
        except OSError as exc:
            raise self._fail(exc) from None

    def commit(self, point: str | None = None) -> None:
        if self._writer is None:
            raise ValueError(f"{self.what}: nothing written to {self.path}, not even a schema")
        try:
            self._writer.close()
            if self._buffer is not None:
                put_bytes(self.path, self._buffer.getvalue().to_pybytes())
            else:
                with open(self._tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                if point:
                    checkpoint(point)
                os.replace(self._tmp, self.path)
                self._tmp = None
        except OSError as exc:
            raise self._fail(exc) from None
        finally:
            self._writer, self._buffer = None, None

    def discard(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - the temp file goes anyway
                pass
            self._writer = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None


class StageWriter:
    """A stage table and its drop files (``drops``: the ``stage`` values its dropped rows may carry),
    appended part by part; committed by :meth:`commit`, discarded by :meth:`discard` (or both by ``with``)."""

    def __init__(self, stage: str, path: StorePath, drop_paths: dict[str, StorePath], compression: str = "zstd"):
        self.stage = stage
        self.table = ParquetSink(path, stage, compression)
        self.drops = {name: ParquetSink(p, stage, compression) for name, p in drop_paths.items()}

    @property
    def rows(self) -> int:
        return self.table.rows

    def append(self, kept: pa.Table, dropped: pa.Table) -> None:
        """Add kept rows (the first call fixes the table's schema) and dropped rows (DROPPED_SCHEMA)."""
        self.table.write(kept)
        stages = pc.unique(dropped.column("stage")).to_pylist() if dropped.num_rows else []
        if unknown := sorted(set(stages) - set(self.drops)):
            raise ValueError(
                f"{self.stage}: dropped rows of stage(s) {', '.join(map(str, unknown))}; expected {tuple(self.drops)}"
            )
        for name, sink in self.drops.items():
            rows = dropped.filter(pc.equal(dropped.column("stage"), name)) if stages else dropped
            sink.write(rows.cast(DROPPED_SCHEMA))

    def commit(self) -> None:
        """Drop files first, then the table: the commit point. Each file passes ``parquet.tmp`` (written and
        fsynced, not yet renamed), as every Parquet file that storage commits does."""
        for sink in self.drops.values():
            sink.commit(PARQUET_POINT)
        checkpoint("stage.dropped")
        self.table.commit(PARQUET_POINT)
        checkpoint("stage.table")

    def discard(self) -> None:
        for sink in (self.table, *self.drops.values()):
            sink.discard()

    def __enter__(self) -> StageWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.discard()
