"""Where the store lives: a local folder (``pathlib.Path``) or an S3 prefix (``upath.UPath`` over s3fs).

Local paths stay plain ``Path`` objects, so the local behaviour is exactly the one of a folder. An
``s3://bucket/prefix`` data dir becomes a ``UPath`` that carries its fsspec filesystem: the same
``/``, ``exists()``, ``glob()``, ``open()`` and ``stat()`` calls then work on both, and the few
operations that differ (atomic writes, Parquet I/O, locks, DuckDB) branch on :func:`is_remote`.

Atomic commits (``storage/atomic.py``): locally a file is written next to its final name and renamed
(``os.replace``). An S3 object PUT is atomic by itself (readers see the old object or the complete new
one), so remote files are built in memory and sent in one request to their final key, never streamed
there piecewise.

Credentials are never part of a path or a settings dump: they come from the AWS standard chain
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_ENDPOINT_URL`` / ``AWS_REGION``, ~/.aws,
an instance role) unless ``storage.access_key_id`` / ``storage.secret_access_key`` (secret strings)
are set, and then only in the in-memory storage options.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from upath import UPath

from ground.settings import REMOTE_SCHEMES, StorageSettings, check_url, is_url

__all__ = ["REMOTE_SCHEMES", "StorePath", "as_store_path", "check_url", "data_root", "is_remote", "is_url"]

StorePath = Path | UPath


def as_store_path(data_dir: str | os.PathLike[str] | UPath, storage_options: dict[str, Any] | None = None) -> StorePath:
    """``data_dir`` as a path object: ``Path`` for a local folder, ``UPath`` for an ``s3://`` URL."""
    if isinstance(data_dir, UPath):
        return data_dir if is_remote(data_dir) else Path(data_dir.path)
    if isinstance(data_dir, Path):
        return data_dir
    if is_url(data_dir):
        url = check_url(str(data_dir))
        # Listings must not be cached: another worker may commit a shard at any moment.
        options = {"use_listings_cache": False, **(storage_options or {})}
        return UPath(url, **options)
    return Path(data_dir)


def data_root(storage: StorageSettings) -> StorePath:
    """``storage.data_dir`` as a path: ``Path`` locally, ``UPath`` (s3fs, its options) on S3. Pass this to stores."""
    return as_store_path(storage.data_dir, storage.storage_options() if storage.is_remote else None)


def is_remote(path: Any) -> bool:
    return isinstance(path, UPath) and path.protocol not in ("", "file", "local")


def fs_and_path(path: StorePath) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of a remote path, for pyarrow / fsspec calls."""
    return path.fs, path.path


def parquet_source(path: StorePath) -> tuple[Any, Any]:
    """Arguments for ``pq.read_table(source, filesystem=fs)`` / ``pq.read_metadata``."""
    if is_remote(path):
        return path.path, path.fs
    return path, None


def put_bytes(path: StorePath, data: bytes) -> None:
    """Store ``data`` at a remote ``path`` in one PUT (atomic: no reader sees part of it)."""
    fs, key = fs_and_path(path)
    fs.pipe_file(key, data)
