"""Evaluation texts from files the user lists: CSV, JSONL or Parquet, locally or from a Hub dataset.

:func:`read_eval_file` returns ``(row, text)`` for every non-empty value of the listed text columns
that the file has (row numbers count data rows from 0); a file without any of them, or one that cannot
be read, is a :class:`~storage.atomic.StorageError` naming the file. :func:`hub_dataset_files`
downloads (or, with ``HF_HUB_OFFLINE=1``, finds in the local cache) a Hub dataset's data files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from storage.atomic import StorageError

SUFFIXES = (".csv", ".jsonl", ".parquet")


def _table(path: Path) -> pa.Table:
    if path.suffix == ".parquet":
        return pq.read_table(path)
    if path.suffix == ".csv":
        return pacsv.read_csv(path)
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return pa.Table.from_pylist([r for r in rows if isinstance(r, dict)])
    raise StorageError(f"{path}: eval texts must be {', '.join(SUFFIXES)} files")


def read_eval_file(path: Path | str, columns: Sequence[str]) -> list[tuple[int, str]]:
    """``(row, text)`` of the file's text columns (those of ``columns`` that it has)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise StorageError(f"{path}: eval text file not found")
    try:
        table = _table(path)
    except StorageError:
        raise
    except (pa.ArrowException, OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StorageError(f"{path}: cannot read eval texts ({exc})") from None
    present = [c for c in columns if c in table.column_names]
    if not present:
        raise StorageError(f"{path}: none of the text columns {', '.join(columns)} (it has {table.column_names})")
    out: list[tuple[int, str]] = []
    for column in present:
        for row, value in enumerate(table[column].to_pylist()):
            if isinstance(value, str) and value.strip():
                out.append((row, value))
    return out


def hub_dataset_files(repo_id: str) -> list[Path]:
    """The CSV/JSONL/Parquet files of a Hub dataset repo (downloaded, or from the cache when offline)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=[f"*{s}" for s in SUFFIXES]))
    except Exception as exc:  # network, offline without a cached copy, unknown repo
        raise StorageError(f"Hub dataset {repo_id!r}: {type(exc).__name__}: {exc}") from None
    files = sorted(p for p in folder.rglob("*") if p.suffix in SUFFIXES and p.is_file())
    if not files:
        raise StorageError(f"Hub dataset {repo_id!r} has no {', '.join(SUFFIXES)} files")
    return files
