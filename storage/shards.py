"""Parquet shards of one run, written atomically, with a manifest; the only place that knows paths.

Layout of ``<data_dir>/runs/<run_id>/``::

    run.json                       settings snapshot of the run (secrets redacted)
    manifest.json                  completed shards: kind, rows, rejects, bytes, sha256
    brainstorm/<shard>.parquet     brainstormed instructions (before dedup)
    instructions.parquet           unique instructions
    examples/<shard>.parquet       parsed examples
    rejects/<shard>.parquet        requests that ended without a parsed row, with the reason

The data file of a shard is its commit point: its rejects file is written first, then the data
file by temp file + ``os.replace``, then the manifest. A crash at any point leaves either no data
file (the shard is redone from scratch, overwriting its rejects) or a complete one (the manifest
entry is recovered from it on the next run). So a re-run neither loses nor duplicates a row.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from storage.schemas import (
    BRAINSTORM_SCHEMA,
    EXAMPLE_SCHEMA,
    INSTRUCTION_SCHEMA,
    REJECT_SCHEMA,
    SCHEMA_VERSION,
)

ShardKind = Literal["brainstorm", "examples"]
_DATA_SCHEMAS = {"brainstorm": BRAINSTORM_SCHEMA, "examples": EXAMPLE_SCHEMA}


class StorageError(RuntimeError):
    """A file of the store is missing, unreadable or of the wrong shape (the message names it)."""


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
    return datetime.now(timezone.utc)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_parquet(table: pa.Table, path: Path, compression: str = "zstd") -> None:
    """Write ``table`` so that ``path`` is either absent, the old file, or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        pq.write_table(table, tmp, compression=compression)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Build a table in ``schema``; a row missing a column is a programming error, so it raises."""
    for row in rows:
        missing = set(schema.names) - set(row)
        if missing:
            raise KeyError(f"row lacks column(s) {sorted(missing)}")
    return pa.Table.from_pylist(rows, schema=schema)


def reject_row(*, example_id: str, run_id: str, shard_id: str, stage: str, task_type: str,
               instruction: str | None, persona_id: str | None, prompt_version: str, model: str,
               attempts: int, reason: str, finish_reason: str | None, raw_text: str | None,
               created_at: datetime) -> dict[str, Any]:
    """One row of the rejects table (REJECT_SCHEMA): a request that ended without a parsed answer."""
    return {"example_id": example_id, "run_id": run_id, "shard_id": shard_id, "stage": stage,
            "task_type": task_type, "instruction": instruction, "persona_id": persona_id,
            "prompt_version": prompt_version, "model": model, "attempts": attempts, "reason": reason,
            "finish_reason": finish_reason, "raw_text": raw_text, "created_at": created_at}


def read_parquet_checked(path: Path, schema: pa.Schema) -> pa.Table:
    """Read a shard and check it has the expected columns; errors name the file."""
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise StorageError(f"{path}: file not found") from None
    except (pa.ArrowException, OSError) as exc:
        raise StorageError(f"{path}: unreadable Parquet ({exc})") from None
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise StorageError(f"{path}: missing column(s) {', '.join(missing)} (older schema?)")
    return table.select(schema.names).cast(schema)


class RunStore:
    """Everything one run writes, under ``<data_dir>/runs/<run_id>``."""

    def __init__(self, data_dir: Path, run_id: str, compression: str = "zstd"):
        if not run_id or "/" in run_id or run_id.startswith("."):
            raise ValueError(f"invalid run id {run_id!r}: use letters, digits, '-' and '_'")
        self.run_id = run_id
        self.root = Path(data_dir) / "runs" / run_id
        self.compression = compression
        self._manifest_lock = threading.Lock()

    # --- paths -----------------------------------------------------------------------------
    def shard_path(self, kind: ShardKind, shard_id: str) -> Path:
        return self.root / kind / f"{shard_id}.parquet"

    def rejects_path(self, shard_id: str) -> Path:
        return self.root / "rejects" / f"{shard_id}.parquet"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def instructions_path(self) -> Path:
        return self.root / "instructions.parquet"

    @property
    def run_info_path(self) -> Path:
        return self.root / "run.json"

    def glob(self, kind: str) -> str:
        """A glob over one table's shards, for DuckDB / Polars."""
        return str(self.root / kind / "*.parquet")

    # --- run-level ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the run's lock; a second writer of the same run id fails at once with a clear error."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock_path = self.root / ".lock"
        with lock_path.open("w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunLocked(
                    f"run {self.run_id!r} is being written by another process ({self.root}); "
                    "wait for it or choose another --run-id"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def write_run_info(self, info: dict[str, Any]) -> None:
        payload = {"run_id": self.run_id, "schema_version": SCHEMA_VERSION, **info}
        atomic_write_bytes(self.run_info_path, json.dumps(payload, indent=2, default=str).encode())

    def read_run_info(self) -> dict[str, Any] | None:
        if not self.run_info_path.exists():
            return None
        return json.loads(self.run_info_path.read_text())

    # --- manifest ----------------------------------------------------------------------------
    def manifest(self) -> dict[str, dict[str, Any]]:
        if not self.manifest_path.exists():
            return {}
        try:
            return json.loads(self.manifest_path.read_text())["shards"]
        except (json.JSONDecodeError, KeyError) as exc:
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
        path = self.shard_path(kind, shard_id)
        atomic_write_parquet(rows_to_table(rows, _DATA_SCHEMAS[kind]), path, self.compression)
        record = ShardRecord(kind, shard_id, len(rows), len(rejects), path.stat().st_size, file_sha256(path))
        self._record(record)
        return record

    # --- reading -----------------------------------------------------------------------------
    def read_kind(self, kind: ShardKind | Literal["rejects"]) -> pa.Table:
        schema = REJECT_SCHEMA if kind == "rejects" else _DATA_SCHEMAS[kind]
        files = sorted((self.root / kind).glob("*.parquet"))
        if not files:
            return schema.empty_table()
        return pa.concat_tables([read_parquet_checked(f, schema) for f in files])

    @property
    def personas_path(self) -> Path:
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


def list_runs(data_dir: Path) -> list[str]:
    runs = Path(data_dir) / "runs"
    return sorted(p.name for p in runs.iterdir() if p.is_dir()) if runs.exists() else []
