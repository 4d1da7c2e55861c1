"""Locks of whole run folders: one writer per generation coordinator or clean run.

Locally an ``flock`` on ``<folder>/.lock`` (released by the kernel when its process dies); on S3 a lock
object created with a conditional PUT (``If-None-Match: *``) and kept alive by a heartbeat
(:class:`RemoteLock`). A generation run's shards are not guarded by this lock but by per-shard
claims (``storage/claims.py``), so several workers can write one run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from storage.atomic import StorageError, remove_stale_temps
from storage.claims import is_stale
from storage.location import StorePath, is_remote

log = logging.getLogger(__name__)


class RunLocked(StorageError):
    """Another process is writing the same run."""


@contextlib.contextmanager
def folder_lock(
    root: StorePath,
    owner_id: str,
    *,
    what: str = "run",
    option: str = "--run-id",
    error: type[StorageError] = RunLocked,
    ttl_s: float = 120.0,
    remove_if_empty: bool = False,
) -> Iterator[None]:
    """Hold the lock of a run folder: a second writer fails at once with ``error`` ("run 'x' … --run-id").

    Locally an ``flock`` on ``root/.lock``, on S3 a :class:`RemoteLock`. Holding it, temp files left by
    killed writers are removed. ``remove_if_empty``: a folder holding nothing but its lock afterwards (its
    run failed before writing anything) is removed, lock file included.
    """
    if is_remote(root):
        with RemoteLock(root / ".lock", owner_id, ttl_s, what=what, option=option, error=error):
            yield
        return
    lock_path = root / ".lock"
    while True:
        root.mkdir(parents=True, exist_ok=True)
        fh = lock_path.open("w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise error(
                f"{what} {owner_id!r} is being written by another process ({root}); "
                f"wait for it or choose another {option}"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fh.fileno()), os.stat(lock_path)):
                break  # the lock file we hold is still the one in place (not removed by a finished writer)
        fh.close()
    with fh:
        remove_stale_temps(root)
        try:
            yield
        finally:
            if remove_if_empty and _holds_nothing_but_its_lock(root):
                for folder in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
                    folder.rmdir()  # empty folders a writer made (dropped/) before it failed
                lock_path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    root.rmdir()
            fcntl.flock(fh, fcntl.LOCK_UN)


def _holds_nothing_but_its_lock(root: StorePath) -> bool:
    """The folder holds its ``.lock`` file and, at most, empty folders."""
    return all(p.is_dir() or p.name == ".lock" and p.parent == root for p in root.rglob("*"))


class RemoteLock:
    """The run lock on S3: a lock object made with a conditional PUT (``If-None-Match: *``).

    It names its holder and an expiry; a heartbeat thread renews it every ``ttl_s / 3`` with a PUT
    conditioned on the holder's own ETag (``If-Match``). A lock that expired (its writer crashed or
    lost the network), or whose holder is a dead process on this host, is taken over with a PUT
    conditioned on the stale lock's ETag, so of two processes racing for it exactly one wins.
    """

    def __init__(
        self,
        path: StorePath,
        run_id: str,
        ttl_s: float = 120.0,
        *,
        what: str = "run",
        option: str = "--run-id",
        error: type[StorageError] = RunLocked,
    ):
        self.path, self.run_id, self.ttl_s = path, run_id, ttl_s
        self.what, self.option, self.error = what, option, error  # for the message: "run 'x' … --run-id"
        self.fs, self.key = path.fs, path.path
        self.owner = uuid.uuid4().hex
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps(
            {
                "owner": self.owner,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "expires_at": time.time() + self.ttl_s,
            }
        ).encode()

    def _put(self, **condition: str) -> str:
        response = self.fs.pipe_file(self.key, self._body(), **condition)
        return response["ETag"]

    def _locked(self, holder: dict[str, Any] | None) -> StorageError:
        who = f"{holder.get('host')} pid {holder.get('pid')}" if holder else "another process"
        return self.error(
            f"{self.what} {self.run_id!r} is being written by {who} ({self.path}); "
            f"wait for it or choose another {self.option}"
        )

    def _is_stale(self, holder: dict[str, Any]) -> bool:
        return is_stale(holder)  # the shard claims' rule: expired, or a dead process on this host

    def acquire(self) -> None:
        try:
            self._etag = self._put(mode="create")
        except FileExistsError:
            try:
                etag = self.fs.info(self.key)["ETag"]
                holder = json.loads(self.fs.cat_file(self.key))
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                holder = {}
                etag = None
            if etag is None or (holder and not self._is_stale(holder)):
                raise self._locked(holder) from None
            try:
                self._etag = self._put(IfMatch=etag)
            except OSError:  # someone else renewed or took it over in between
                raise self._locked(holder) from None
            log.warning("took over the stale lock of run %s (%s)", self.run_id, holder)
        self._thread = threading.Thread(target=self._heartbeat, name=f"lock-{self.run_id}", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self._etag = self._put(IfMatch=self._etag)
            except OSError as exc:
                log.error("lost the lock of run %s (%s): another writer may take the run over", self.run_id, exc)
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(OSError):
            if self.fs.info(self.key).get("ETag") == self._etag:
                self.fs.rm_file(self.key)

    def __enter__(self) -> RemoteLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
