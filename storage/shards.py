"""Parquet shards of one run, written atomically, with a manifest; the only place that knows paths.

Layout of ``<data_dir>/runs/<run_id>/``::

    run.json                       settings snapshot of the run (secrets redacted)
    manifest.json                  completed shards: kind, rows, rejects, bytes, sha256
    brainstorm/<shard>.parquet     brainstormed instructions (before dedup)
    instructions.parquet           unique instructions
    examples/<shard>.parquet       parsed examples
    rejects/<shard>.parquet        requests that ended without a parsed row, with the reason
    plan.json                      the cost plan made before the run (embed-factory run / plan)
    ledger.parquet                 the run's cost ledger per task type (written when generate finishes)

The data file of a shard is its commit point: its rejects file is written first, then the data
file (atomically, ``storage/atomic.py``), then the manifest. A crash at any point leaves either no
data file (the shard is redone from scratch, overwriting its rejects) or a complete one (the manifest
entry is recovered from it on the next run). So a re-run neither loses nor duplicates a row.

``data_dir`` may also be an ``s3://bucket/prefix`` path (``storage/location.py``): each file is then
one PUT to its final key (atomic on S3), in the same order, manifest last; the run lock is a lock
object created with a conditional PUT and kept alive by a heartbeat.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from ground.faults import checkpoint
from ground.settings import Settings
from storage.atomic import StorageError, atomic_write_bytes, atomic_write_parquet, read_json_file, remove_stale_temps
from storage.location import StorePath, as_store_path, data_root, is_remote, parquet_source
from storage.schemas import (
    BRAINSTORM_SCHEMA,
    EXAMPLE_SCHEMA,
    INSTRUCTION_SCHEMA,
    REJECT_SCHEMA,
    SCHEMA_VERSION,
)

log = logging.getLogger(__name__)

ShardKind = Literal["brainstorm", "examples"]
_DATA_SCHEMAS = {"brainstorm": BRAINSTORM_SCHEMA, "examples": EXAMPLE_SCHEMA}


class RunLocked(StorageError):
    """Another process is writing the same run."""


@dataclass(frozen=True)
class ShardRecord:
    kind: str
    shard_id: str
    rows: int
    rejects: int
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def now_utc() -> datetime:
    return datetime.now(UTC)


def file_sha256(path: StorePath) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Build a table in ``schema``; a row missing a column is a programming error, so it raises."""
    for row in rows:
        missing = set(schema.names) - set(row)
        if missing:
            raise KeyError(f"row lacks column(s) {sorted(missing)}")
    return pa.Table.from_pylist(rows, schema=schema)


def reject_row(
    *,
    example_id: str,
    run_id: str,
    shard_id: str,
    stage: str,
    task_type: str,
    instruction: str | None,
    persona_id: str | None,
    prompt_version: str,
    model: str,
    attempts: int,
    reason: str,
    finish_reason: str | None,
    raw_text: str | None,
    created_at: datetime,
) -> dict[str, Any]:
    """One row of the rejects table (REJECT_SCHEMA): a request that ended without a parsed answer."""
    return {
        "example_id": example_id,
        "run_id": run_id,
        "shard_id": shard_id,
        "stage": stage,
        "task_type": task_type,
        "instruction": instruction,
        "persona_id": persona_id,
        "prompt_version": prompt_version,
        "model": model,
        "attempts": attempts,
        "reason": reason,
        "finish_reason": finish_reason,
        "raw_text": raw_text,
        "created_at": created_at,
    }


def read_parquet_checked(path: StorePath, schema: pa.Schema) -> pa.Table:
    """Read a shard and check it has the expected columns; errors name the file."""
    source, filesystem = parquet_source(path)
    try:
        table = pq.read_table(source, filesystem=filesystem)
    except FileNotFoundError:
        raise StorageError(f"{path}: file not found") from None
    except (pa.ArrowException, OSError) as exc:
        raise StorageError(f"{path}: unreadable Parquet ({exc})") from None
    # columns added later (schema metadata "embed_factory.optional") are read as nulls from older files
    optional = set((schema.metadata or {}).get(b"embed_factory.optional", b"").decode().split(","))
    for name in schema.names:
        if name in optional and name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, schema.field(name).type))
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise StorageError(f"{path}: missing column(s) {', '.join(missing)} (older schema?)")
    return table.select(schema.names).cast(schema)


class RunStore:
    """Everything one run writes, under ``<data_dir>/runs/<run_id>``."""

    def __init__(self, data_dir: StorePath | str, run_id: str, compression: str = "zstd", lock_ttl_s: float = 120.0):
        if not run_id or "/" in run_id or run_id.startswith("."):
            raise ValueError(f"invalid run id {run_id!r}: use letters, digits, '-' and '_'")
        self.run_id = run_id
        self.root = as_store_path(data_dir) / "runs" / run_id
        self.compression = compression
        self.lock_ttl_s = lock_ttl_s
        self._manifest_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, run_id: str) -> RunStore:
        """The run's store as configured: data dir (local or S3), compression and lock TTL."""
        return cls(data_root(settings.storage), run_id, settings.storage.compression, settings.storage.lock_ttl_s)

    # --- paths -----------------------------------------------------------------------------
    def shard_path(self, kind: ShardKind, shard_id: str) -> StorePath:
        return self.root / kind / f"{shard_id}.parquet"

    def rejects_path(self, shard_id: str) -> StorePath:
        return self.root / "rejects" / f"{shard_id}.parquet"

    @property
    def manifest_path(self) -> StorePath:
        return self.root / "manifest.json"

    @property
    def instructions_path(self) -> StorePath:
        return self.root / "instructions.parquet"

    @property
    def run_info_path(self) -> StorePath:
        return self.root / "run.json"

    @property
    def ledger_path(self) -> StorePath:
        """The run's generate-scope cost ledger (``storage/ledger.py``)."""
        return self.root / "ledger.parquet"

    @property
    def plan_path(self) -> StorePath:
        """The cost plan made before the run started (``ground/cost_plan.py``), if any."""
        return self.root / "plan.json"

    def glob(self, kind: str) -> str:
        """A glob over one table's shards, for DuckDB / Polars."""
        return str(self.root / kind / "*.parquet")

    # --- run-level ---------------------------------------------------------------------------
    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Hold the run's lock; a second writer of the same run id fails at once with a clear error."""
        return folder_lock(self.root, self.run_id, ttl_s=self.lock_ttl_s)

    def write_run_info(self, info: dict[str, Any]) -> None:
        payload = {"run_id": self.run_id, "schema_version": SCHEMA_VERSION, **info}
        atomic_write_bytes(self.run_info_path, json.dumps(payload, indent=2, default=str).encode())

    def read_run_info(self) -> dict[str, Any] | None:
        return read_json_file(self.run_info_path, "run info")

    # --- manifest ----------------------------------------------------------------------------
    def manifest(self) -> dict[str, dict[str, Any]]:
        if not self.manifest_path.exists():
            return {}
        try:
            return json.loads(self.manifest_path.read_text())["shards"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise StorageError(f"{self.manifest_path}: corrupt manifest ({exc})") from None

    def _record(self, record: ShardRecord) -> None:
        with self._manifest_lock:
            shards = self.manifest()
            shards[f"{record.kind}/{record.shard_id}"] = record.to_json()
            body = {"run_id": self.run_id, "updated_at": now_utc().isoformat(), "shards": dict(sorted(shards.items()))}
            atomic_write_bytes(self.manifest_path, json.dumps(body, indent=1).encode())

    def is_complete(self, kind: ShardKind, shard_id: str) -> bool:
        """True if the shard's data file is committed; recovers a manifest entry lost to a crash."""
        if f"{kind}/{shard_id}" in self.manifest():
            return self.shard_path(kind, shard_id).exists()
        path = self.shard_path(kind, shard_id)
        if not path.exists():
            return False
        rows = read_parquet_checked(path, _DATA_SCHEMAS[kind]).num_rows
        rejects_path = self.rejects_path(shard_id)
        rejects = read_parquet_checked(rejects_path, REJECT_SCHEMA).num_rows if rejects_path.exists() else 0
        self._record(ShardRecord(kind, shard_id, rows, rejects, path.stat().st_size, file_sha256(path)))
        return True

    def write_shard(
        self, kind: ShardKind, shard_id: str, rows: list[dict[str, Any]], rejects: list[dict[str, Any]]
    ) -> ShardRecord:
        """Commit one shard: rejects first, then the data file (commit point), then the manifest."""
        atomic_write_parquet(rows_to_table(rejects, REJECT_SCHEMA), self.rejects_path(shard_id), self.compression)
        checkpoint("shard.rejects")
        path = self.shard_path(kind, shard_id)
        written = atomic_write_parquet(rows_to_table(rows, _DATA_SCHEMAS[kind]), path, self.compression)
        checkpoint("shard.data")
        size, digest = written or (path.stat().st_size, file_sha256(path))
        record = ShardRecord(kind, shard_id, len(rows), len(rejects), size, digest)
        self._record(record)
        checkpoint("shard.manifest")
        return record

    # --- reading -----------------------------------------------------------------------------
    def read_kind(self, kind: ShardKind | Literal["rejects"]) -> pa.Table:
        schema = REJECT_SCHEMA if kind == "rejects" else _DATA_SCHEMAS[kind]
        files = sorted((self.root / kind).glob("*.parquet"), key=str)
        if not files:
            return schema.empty_table()
        return pa.concat_tables([read_parquet_checked(f, schema) for f in files])

    @property
    def personas_path(self) -> StorePath:
        return self.root / "personas.jsonl"

    def write_personas(self, personas: list[tuple[str, str]]) -> None:
        """The run's persona pool as Persona Hub JSONL (after any expansion), so a re-run reuses it."""
        lines = "".join(json.dumps({"persona": text}, ensure_ascii=False) + "\n" for _, text in personas)
        atomic_write_bytes(self.personas_path, lines.encode())

    def write_instructions(self, table: pa.Table) -> None:
        atomic_write_parquet(table.cast(INSTRUCTION_SCHEMA), self.instructions_path, self.compression)

    def read_instructions(self) -> pa.Table | None:
        if not self.instructions_path.exists():
            return None
        return read_parquet_checked(self.instructions_path, INSTRUCTION_SCHEMA)


def list_runs(data_dir: StorePath | str) -> list[str]:
    """The run ids under ``<data_dir>/runs``, sorted (the catalog and the clean flow both ask this)."""
    runs = as_store_path(data_dir) / "runs"
    return sorted(p.name for p in runs.iterdir() if p.is_dir()) if runs.exists() else []


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
            if remove_if_empty and [p.name for p in root.iterdir()] == [".lock"]:
                lock_path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    root.rmdir()
            fcntl.flock(fh, fcntl.LOCK_UN)


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
        if float(holder.get("expires_at", 0)) < time.time():
            return True
        if holder.get("host") == socket.gethostname():
            try:
                os.kill(int(holder.get("pid", 0)), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError):
                return False
        return False

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
