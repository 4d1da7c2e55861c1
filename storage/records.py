"""Reading record files a bounded batch at a time: JSONL (optionally gzipped) and Parquet, local or ``s3://``.

The format layer under every reader of outside data: ``embed-factory import`` (``tasks/importing/readers.py``)
and the documents of a grounded run (``storage/documents.py``). A JSONL line that is no JSON object is a
:class:`BadLine` (what is wrong, without file and line), for the caller to refuse or skip; a problem with a
whole file raises :class:`RecordFileError` naming the file as the user gave it (``shown``).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.location import StorePath, parquet_source

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
#: rows per batch a reader hands on (bounds the records in memory)
BATCH_ROWS = 4096


class RecordFileError(ValueError):
    """An input file that cannot be read; the message names the file (and line)."""


@dataclass(frozen=True)
class BadLine:
    """A JSONL line that is not a JSON object (what is wrong, without file and line)."""

    problem: str


def existing_input(given: str, path: StorePath) -> bool:
    """Whether the input ``path`` (named ``given`` by the user) is a folder; RecordFileError if it is missing or
    cannot be asked (local or s3://: credentials, network, a missing bucket)."""
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except Exception as exc:  # s3fs / botocore
        raise RecordFileError(f"{given}: cannot read ({type(exc).__name__}: {exc})") from None
    if not exists:
        raise RecordFileError(f"{given}: not found")
    return is_dir


def record_kind(name: str) -> str | None:
    """``jsonl`` or ``parquet`` by a file's name (``.gz`` of JSONL too); None for any other file."""
    name = name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.removesuffix(".gz").endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def parse_line(raw: bytes) -> dict[str, Any] | BadLine | None:
    """One JSONL line: its object, a BadLine, or None for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadLine(f"not UTF-8 text (byte {exc.start}); is it a binary file?")
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return BadLine(f"not valid JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(record, dict):
        return BadLine(f"expected a JSON object, got {type(record).__name__}")
    return record


def jsonl_records(path: StorePath, shown: str) -> Iterator[tuple[int, dict[str, Any] | BadLine]]:
    """``(line, record or BadLine)`` of a JSONL file, blank lines left out; 1-based line numbers."""
    with path.open("rb") as raw_fh:
        fh = gzip.open(raw_fh) if path.name.lower().endswith(".gz") else raw_fh
        try:
            for line, raw in enumerate(fh, start=1):
                parsed = parse_line(raw)
                if parsed is not None:
                    yield line, parsed
        except (OSError, EOFError) as exc:  # a truncated or corrupt .gz
            raise RecordFileError(f"{shown}: unreadable ({type(exc).__name__}: {exc})") from None


def parquet_batches(
    path: StorePath, shown: str, batch_rows: int = BATCH_ROWS
) -> tuple[list[str], Iterator[pa.RecordBatch]]:
    """(column names, record batches) of a Parquet file, read a batch at a time."""
    src, fs = parquet_source(path)
    try:
        reader = pq.ParquetFile(src, filesystem=fs) if fs is not None else pq.ParquetFile(src)
    except (pa.ArrowException, OSError) as exc:
        raise RecordFileError(f"{shown}: unreadable Parquet ({exc})") from None
    return reader.schema_arrow.names, reader.iter_batches(batch_size=batch_rows)


def batch_records(batches: Iterator[pa.RecordBatch], shown: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row, record)`` of record batches, 1-based; a read error names the file and the last row read."""
    row = 0
    try:
        for batch in batches:
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except (pa.ArrowException, OSError) as exc:
        raise RecordFileError(f"{shown}: unreadable after row {row} ({exc})") from None
