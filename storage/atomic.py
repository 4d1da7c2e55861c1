"""Atomic file writes: the one place that writes a temp file beside its target and renames it onto it.

A reader sees the old file or the complete new one, never part of one; a killed writer leaves at most
a temp file ``.<name>.tmp-<pid>-<thread>`` beside the target, which :func:`remove_stale_temps` deletes
once its process is gone.

Locally (``pathlib.Path``): the temp file is written, fsynced and ``os.replace``d onto the target; an
error removes it. On S3 (``storage/location.py``) an object PUT is atomic by itself, so the content is
built in memory and sent to the final key in one request.

``point`` names the fault-hook checkpoint (``ground/faults.py``) passed right before each rename: the
crash tests kill a writer there, its temp file complete but not yet renamed.

Folders (a saved model) are built under a temp name too (:func:`atomic_dir`) and swapped onto the
target by :func:`replace_dir`: the old folder moved aside, the new one renamed in, the old one removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ground.faults import checkpoint
from storage.location import StorePath, is_remote, put_bytes

#: fault points of the two whole-file writers
BYTES_POINT = "bytes.tmp"
PARQUET_POINT = "parquet.tmp"


class StorageError(RuntimeError):
    """A file of the store is missing, unreadable, unwritable or of the wrong shape (the message names it)."""


def temp_path(path: Path) -> Path:
    """The temp name of ``path`` for this process and thread (the pid lets :func:`remove_stale_temps` judge it)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


class AtomicFiles:
    """Local files written under temp names and renamed onto their targets together, once all are complete.

    ``with AtomicFiles(point) as files:`` write to ``files.temp_for(target)``; a block that ends without
    error fsyncs every temp file, then renames them one by one (``point`` passed before each rename).
    Whatever is not renamed (an error, in the block or while committing) is removed.
    """

    def __init__(self, point: str | None = None):
        self.point = point
        self._pending: list[tuple[Path, Path]] = []

    def temp_for(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        self._pending.append((tmp, path))
        return tmp

    def commit(self) -> None:
        for tmp, _ in self._pending:
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
        while self._pending:
            tmp, path = self._pending[0]
            if self.point:
                checkpoint(self.point)
            os.replace(tmp, path)
            self._pending.pop(0)

    def discard(self) -> None:
        for tmp, _ in self._pending:
            tmp.unlink(missing_ok=True)
        self._pending.clear()

    def __enter__(self) -> AtomicFiles:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.discard()


@contextlib.contextmanager
def atomic_path(path: Path, point: str | None = None) -> Iterator[Path]:
    """A local temp path to write ``path``'s new content to; renamed onto ``path`` if the block succeeds."""
    with AtomicFiles(point) as files:
        yield files.temp_for(path)


def replace_dir(src: Path, dest: Path, point: str | None = None) -> None:
    """Move folder ``src`` onto ``dest``: an existing ``dest`` is moved aside first and removed once ``src``
    is in place, so ``dest`` is the old folder or the complete new one (absent only between two renames)."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{threading.get_ident()}")
    if point:
        checkpoint(point)
    if dest.exists():
        os.replace(dest, old)
    os.replace(src, dest)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: Path, point: str | None = None) -> Iterator[Path]:
    """An empty local temp folder to build ``path``'s new content in; swapped onto ``path``
    (:func:`replace_dir`) if the block succeeds, removed otherwise."""
    tmp = temp_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, path, point)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def os_reason(exc: OSError) -> str:
    """``No space left on device``, from an OSError or from pyarrow's ("Error writing ... Detail: [errno 28] ...")."""
    if exc.errno:
        return os.strerror(exc.errno)
    detail = str(exc).rpartition("Detail:")[2].strip()
    return re.sub(r"^\[errno \d+\]\s*", "", detail) or exc.strerror or type(exc).__name__


@contextlib.contextmanager
def write_errors(path: StorePath | str) -> Iterator[None]:
    """An OS error while writing ``path`` (disk full, file too large, read-only) as one StorageError line."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"{path}: cannot write: {os_reason(exc)}") from None


def atomic_write_bytes(path: StorePath, data: bytes) -> None:
    """Store ``data`` at ``path`` atomically (S3: one PUT); an OS error becomes a StorageError naming the file."""
    if is_remote(path):
        put_bytes(path, data)
        return
    try:
        with atomic_path(path, BYTES_POINT) as tmp:
            tmp.write_bytes(data)
    except OSError as exc:  # disk full, read-only, permissions: one clear line naming the file
        raise StorageError(f"{path}: cannot write: {os_reason(exc)}") from None


def read_json_file(path: StorePath, what: str) -> Any:
    """A JSON file written by :func:`atomic_write_bytes`; None when it does not exist; unreadable: StorageError."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StorageError(f"{path}: corrupt {what} ({exc})") from None


def atomic_write_parquet(table: pa.Table, path: StorePath, compression: str = "zstd") -> tuple[int, str] | None:
    """Write ``table`` so that ``path`` is either absent, the old file, or the complete new one.

    On S3 returns (bytes, sha256) of what it stored, so nobody has to download it again to hash it.
    """
    if is_remote(path):  # the whole file in memory, then one PUT to the final key
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression=compression)
        data = sink.getvalue().to_pybytes()
        put_bytes(path, data)
        return len(data), hashlib.sha256(data).hexdigest()
    try:
        with atomic_path(path, PARQUET_POINT) as tmp:
            pq.write_table(table, tmp, compression=compression)
    except OSError as exc:  # pyarrow's IO errors are OSErrors too
        raise StorageError(f"{path}: cannot write: {os_reason(exc)}") from None
    return None


def remove_stale_temps(root: StorePath) -> int:
    """Delete the temp files (``.<name>.tmp-<pid>-<thread>``) that killed writers left under ``root``.

    Only those of processes that are gone: a live writer may still rename its temp file.
    """
    if is_remote(root) or not root.exists():
        return 0
    removed = 0
    for tmp in list(root.rglob(".*.tmp-*")):  # listed first: a stale folder goes as a whole
        pid = tmp.name.rpartition(".tmp-")[2].partition("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            if tmp.is_dir():  # a folder of atomic_dir
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed += 1
        except OSError:
            pass  # alive, someone else's
    return removed
