"""Per-shard claims: which worker is writing which shard of a run, until when.

Several workers (processes, hosts) write one generation run. Before a worker sends a shard's
requests it claims the shard: ``runs/<id>/claims/<kind>/<shard>.json`` names the holder (a random
owner id, host, pid) and an expiry. A heartbeat renews it every ``ttl_s / 3``; the holder releases
(deletes) it after the commit. A claim whose expiry has passed, or whose holder is a dead process on
this host, is stale: the next worker takes it over. So a worker that dies mid-shard costs at most
``ttl_s`` (nothing, on its own host) before another redoes that shard from scratch.

Exactly one taker wins:

* Locally (one disk, or NFS with working ``flock``): every change of a claim file (create, take
  over, renew, release) is made under an ``flock`` of ``claims/.mutex`` held for a few file
  operations, and the file is replaced atomically (``storage/atomic.py``).
* On S3: a new claim is a conditional PUT (``If-None-Match: *``); taking over a stale one and renewing
  one's own are PUTs conditioned on the ETag read (``If-Match``), so of two racing PUTs one fails.
  Release reads the ETag and then deletes (S3 has no conditional DELETE that s3fs sends): a taker
  that took the claim over in that instant loses it, which costs only its shard being redone.

A holder checks that the claim is still its own right before it commits (:meth:`Claim.check`). A
worker stalled longer than ``ttl_s`` (no heartbeat) may have lost it: then it commits nothing. The race
left is between that check and the commit's rename (milliseconds, against a TTL of minutes): both
workers would write the same shard file, and the later whole file wins (the rejects file of the
earlier may stay beside it). Keep ``storage.lock_ttl_s`` far above any stall (GC, swap) you expect.
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

from storage.atomic import StorageError, temp_path
from storage.location import StorePath, is_remote

log = logging.getLogger(__name__)


class ClaimLost(StorageError):
    """A worker's claim on a shard expired and was taken over: it must not commit that shard."""


def is_stale(holder: dict[str, Any], now: float | None = None) -> bool:
    """A claim or lock body is stale when it expired, or its holder is a dead process on this host."""
    if float(holder.get("expires_at", 0)) < (time.time() if now is None else now):
        return True
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder.get("pid", 0)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, OverflowError):
            return False
    return False


def _write_local(path: StorePath, data: bytes) -> None:
    """Replace a local claim file atomically. Not fsynced: a claim lost to a power cut is one that had
    expired by the time anyone looks. No fault checkpoint: the crash tests count the commit's writes."""
    tmp = temp_path(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ShardClaims:
    """The claims of one run (``<run root>/claims``), each valid ``ttl_s`` seconds unless renewed."""

    def __init__(self, run_root: StorePath, ttl_s: float = 120.0):
        self.root = run_root / "claims"
        self.ttl_s = ttl_s
        self.remote = is_remote(run_root)

    def path(self, key: str) -> StorePath:
        return self.root / f"{key}.json"

    def body(self, owner: str) -> bytes:
        return json.dumps(
            {"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "expires_at": time.time() + self.ttl_s}
        ).encode()

    def holder(self, key: str) -> dict[str, Any] | None:
        """Who holds ``key`` now (the claim's body), None when nobody does."""
        try:
            return json.loads(self.path(key).read_bytes())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    @contextlib.contextmanager
    def _mutex(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".mutex").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def try_take(self, key: str) -> Claim | None:
        """Claim ``key`` if nobody holds it or its claim is stale; None while another live worker holds it."""
        owner = uuid.uuid4().hex
        if self.remote:
            etag = self._take_remote(key, owner)
            return None if etag is None else Claim(self, key, owner, etag)
        path = self.path(key)
        with self._mutex():
            holder = self.holder(key)
            if holder is not None and not is_stale(holder):
                return None
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_local(path, self.body(owner))
        if holder is not None:
            log.warning("took over the stale claim on %s (%s)", key, holder)
        return Claim(self, key, owner, None)

    def _take_remote(self, key: str, owner: str) -> str | None:
        fs, name = self.path(key).fs, self.path(key).path
        try:
            return fs.pipe_file(name, self.body(owner), mode="create")["ETag"]
        except FileExistsError:
            pass
        try:
            etag = fs.info(name)["ETag"]
            holder = json.loads(fs.cat_file(name))
        except FileNotFoundError:  # released in between: try again on the next poll
            return None
        except (json.JSONDecodeError, KeyError):
            holder = {}  # a torn or foreign body: stale
        if holder and not is_stale(holder):
            return None
        try:
            etag = fs.pipe_file(name, self.body(owner), IfMatch=etag)["ETag"]
        except OSError:  # someone renewed or took it over in between
            return None
        log.warning("took over the stale claim on %s (%s)", key, holder)
        return etag

    def is_mine(self, claim: Claim) -> bool:
        if self.remote:
            path = self.path(claim.key)
            try:
                return path.fs.info(path.path).get("ETag") == claim.etag
            except FileNotFoundError:
                return False
        holder = self.holder(claim.key)
        return holder is not None and holder.get("owner") == claim.owner

    def renew(self, claim: Claim) -> bool:
        """Push the claim's expiry ``ttl_s`` on; False if it is no longer this holder's."""
        path = self.path(claim.key)
        if self.remote:
            try:
                claim.etag = path.fs.pipe_file(path.path, self.body(claim.owner), IfMatch=claim.etag)["ETag"]
                return True
            except OSError:
                return False
        with self._mutex():
            if not self.is_mine(claim):
                return False
            _write_local(path, self.body(claim.owner))
            return True

    def release(self, claim: Claim) -> None:
        path = self.path(claim.key)
        if self.remote:
            with contextlib.suppress(OSError):
                if self.is_mine(claim):
                    path.fs.rm_file(path.path)
            return
        with self._mutex():
            if self.is_mine(claim):
                path.unlink(missing_ok=True)


class Claim:
    """One held claim; ``with claim:`` renews it in a heartbeat thread and releases it at the end."""

    def __init__(self, claims: ShardClaims, key: str, owner: str, etag: str | None):
        self.claims, self.key, self.owner, self.etag = claims, key, owner, etag
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.claims.ttl_s / 3):
            try:
                renewed = self.claims.renew(self)
            except OSError as exc:  # the store is unreachable: try again on the next beat
                log.warning("could not renew the claim on %s (%s)", self.key, exc)
                continue
            if not renewed:
                self.lost = True
                log.error("lost the claim on %s: another worker took it over; this worker commits nothing", self.key)
                return

    def check(self) -> None:
        """Raise :class:`ClaimLost` unless the claim is still this holder's (called right before a commit)."""
        if self.lost or not self.claims.is_mine(self):
            self.lost = True
            raise ClaimLost(
                f"{self.claims.path(self.key)}: the claim on shard {self.key} expired and another worker "
                f"took it over (raise storage.lock_ttl_s above the longest stall); the shard is not committed twice"
            )

    def __enter__(self) -> Claim:
        self._thread = threading.Thread(target=self._heartbeat, name=f"claim-{self.key}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost:
            self.claims.release(self)
