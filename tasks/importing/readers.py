"""Reading the inputs of an import as a stream of records, a bounded batch at a time.

An input path is a local path or an ``s3://`` URL (``storage/location.py``; S3 options from the storage
settings) naming one of:

* a JSONL file (``.jsonl``, ``.json``, ``.ndjson``, optionally ``.gz``): one JSON object per line, read
  line by line;
* a Parquet file (``.parquet``): read a row group batch at a time (``ParquetFile.iter_batches``);
* a ``datasets`` folder (``Dataset.save_to_disk``: ``state.json`` and ``data-*.arrow``): its Arrow stream
  files read a record batch at a time, the same files ``datasets.load_from_disk`` memory-maps (so S3
  folders work too, and nothing is copied); a ``DatasetDict`` folder names its splits;
* a folder of JSONL / Parquet files (its files, by name; not recursive).

:func:`read_records` yields ``(line, record)``: ``line`` is 1-based (the JSONL line, else the row), and
``record`` is a dict, or a :class:`BadLine` for a line that is no JSON object. A problem with a whole
file (missing, empty, unreadable, an unknown layout) raises :class:`ImportFileError` naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow as pa

from storage.location import StorePath, as_store_path, is_remote, is_url
from storage.records import (  # noqa: F401 - BadLine, BATCH_ROWS: re-exported for the import's callers
    BATCH_ROWS,
    BadLine,
    RecordFileError,
    batch_records,
    existing_input,
    jsonl_records,
    parquet_batches,
    record_kind,
)
from tasks.importing.layouts import LayoutProblem, detect_layout

#: the import's error is the format layer's (one class: a catch of either catches both)
ImportFileError = RecordFileError


@dataclass(frozen=True)
class Source:
    """One input: where it is, how it was named (in messages), what kind it is and its size (the resume check)."""

    path: StorePath
    shown: str
    kind: str  # jsonl | parquet | arrow
    size: int

    @property
    def location(self) -> str:
        """Where it is, whatever the working directory: an absolute path or the URL (lineage, resume check)."""
        return str(self.path) if is_remote(self.path) else str(self.path.resolve())


def _size(path: StorePath) -> int:
    return int(path.stat().st_size)


def _arrow_files(folder: StorePath, shown: str) -> list[StorePath]:
    try:
        state = json.loads((folder / "state.json").read_text())
        return [folder / entry["filename"] for entry in state["_data_files"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ImportFileError(f"{shown}: unreadable datasets folder (state.json: {exc})") from None


def resolve_sources(paths: list[str], storage_options: dict[str, Any] | None = None) -> list[Source]:
    """The inputs named by ``paths``, checked to exist and be of a known kind, folders expanded."""
    if not paths:
        raise ImportFileError("no input paths given")
    sources: list[Source] = []
    for given in paths:
        path = as_store_path(given, storage_options if is_url(given) else None)
        is_dir = existing_input(given, path)
        if not is_dir:
            kind = record_kind(path.name)
            if kind is None:
                raise ImportFileError(
                    f"{given}: unknown file type (expected .jsonl, .json, .ndjson, .gz of those, .parquet "
                    "or a datasets folder)"
                )
            sources.append(Source(path, given, kind, _size(path)))
        elif (path / "dataset_dict.json").exists():
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise ImportFileError(
                f"{given}: a DatasetDict (splits: {', '.join(splits) or 'none'}); name one split's folder, "
                f"e.g. {given.rstrip('/')}/{splits[0] if splits else 'train'}"
            )
        elif (path / "state.json").exists():
            files = _arrow_files(path, given)
            sources.append(Source(path, given, "arrow", sum(_size(f) for f in files)))
        else:
            inside = sorted((p for p in path.iterdir() if not p.is_dir() and record_kind(p.name)), key=lambda p: p.name)
            if not inside:
                raise ImportFileError(f"{given}: a folder with no .jsonl/.parquet files and no datasets state.json")
            sources += [Source(p, f"{given.rstrip('/')}/{p.name}", record_kind(p.name), _size(p)) for p in inside]
    return sources


def layout_of(columns: list[str], shown: str) -> str:
    try:
        return detect_layout(columns)
    except LayoutProblem as exc:
        raise ImportFileError(f"{shown}: {exc}") from None


# --- columnar files (JSONL and Parquet: storage/records.py) ---------------------------------------
def _arrow_batches(source: Source, batch_rows: int) -> tuple[list[str], Iterator[pa.RecordBatch]]:
    files = _arrow_files(source.path, source.shown)

    def opened(path: StorePath):
        try:
            return path.open("rb") if is_remote(path) else pa.memory_map(str(path))
        except (pa.ArrowException, OSError) as exc:
            raise ImportFileError(f"{source.shown}: unreadable datasets file {path.name} ({exc})") from None

    def stream_of(handle) -> pa.ipc.RecordBatchStreamReader:
        try:
            return pa.ipc.open_stream(handle)
        except (pa.ArrowException, OSError) as exc:
            raise ImportFileError(f"{source.shown}: unreadable datasets file ({exc})") from None

    if not files:
        raise ImportFileError(f"{source.shown}: empty file (the datasets folder lists no data files)")
    with opened(files[0]) as first:
        names = stream_of(first).schema.names

    def batches() -> Iterator[pa.RecordBatch]:
        for path in files:
            with opened(path) as handle:
                for batch in stream_of(handle):
                    for start in range(0, batch.num_rows, batch_rows):
                        yield batch.slice(start, batch_rows)

    return names, batches()


def _columnar_records(source: Source, batch_rows: int) -> Iterator[tuple[int, dict[str, Any]]]:
    if source.kind == "parquet":
        names, batches = parquet_batches(source.path, source.shown, batch_rows)
    else:
        names, batches = _arrow_batches(source, batch_rows)
    layout_of(names, source.shown)  # an unknown layout is the file's error, before any row
    yield from batch_records(batches, source.shown)


def read_records(source: Source, batch_rows: int = BATCH_ROWS) -> Iterator[tuple[int, dict[str, Any] | BadLine]]:
    """``(line, record or BadLine)`` of one input, in file order; an empty input is an ImportFileError."""
    records = (
        jsonl_records(source.path, source.shown) if source.kind == "jsonl" else _columnar_records(source, batch_rows)
    )
    empty = True
    for item in records:
        empty = False
        yield item
    if empty:
        raise ImportFileError(f"{source.shown}: empty file (no records)")


def sample_path() -> Path:
    """The bundled licence-clean triples file (``tasks/importing/data/README.md``), for trying an import."""
    return Path(str(resources.files("tasks.importing") / "data" / "sample_triples.jsonl"))
