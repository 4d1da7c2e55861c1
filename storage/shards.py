"""Parquet shards of one run, written atomically, with a manifest; the only place that knows paths.

Layout of ``<data_dir>/runs/<run_id>/``::

    run.json                       settings snapshot of the run (secrets redacted)
    manifest.d/<kind>/<shard>.json completed shards: kind, rows, rejects, bytes, sha256 (storage/manifest.py;
                                   older runs: one manifest.json, still read)
    claims/<kind>/<shard>.json     which worker is writing a shard, until when (storage/claims.py)
    brainstorm/<shard>.parquet     brainstormed instructions (before dedup)
    instructions.parquet           unique instructions
    examples/<shard>.parquet       parsed examples
    rejects/<shard>.parquet        requests that ended without a parsed row, with the reason
    plan.json                      the cost plan made before the run (embed-factory run / plan)
    ledger.parquet                 the run's cost ledger per task type (written when generate finishes)

The data file of a shard is its commit point: its rejects file is written first, then the data
file (atomically, ``storage/atomic.py``), then the shard's manifest entry. A crash at any point leaves
either no data file (the shard is redone from scratch, overwriting its rejects) or a complete one (the
manifest entry is recovered from it on the next run). So a re-run neither loses nor duplicates a row.

Several workers write one run: each holds a claim on the shard it works on (:meth:`RunStore.claim`),
and the commit checks the claim is still its own; a dead worker's claim expires and another worker
redoes its shard. The run lock (``storage/locks.py``) is only the coordinator's: one ``generate`` per run.

``data_dir`` may also be an ``s3://bucket/prefix`` path (``storage/location.py``): each file is then
one PUT to its final key (atomic on S3), in the same order, manifest entry last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from ground.faults import checkpoint
from ground.settings import Settings
from storage.atomic import StorageError, atomic_write_bytes, atomic_write_parquet, read_json_file
from storage.claims import Claim, ShardClaims
from storage.location import StorePath, as_store_path, data_root, parquet_source
from storage.locks import RemoteLock, RunLocked, folder_lock
from storage.manifest import Manifest
from storage.schemas import (
    BRAINSTORM_SCHEMA,
    EXAMPLE_SCHEMA,
    INSTRUCTION_SCHEMA,
    REJECT_SCHEMA,
    SCHEMA_VERSION,
)

__all__ = ["RemoteLock", "RunLocked", "RunStore", "ShardRecord", "StorageError", "folder_lock", "list_runs"]

log = logging.getLogger(__name__)

ShardKind = Literal["brainstorm", "examples"]
_DATA_SCHEMAS = {"brainstorm": BRAINSTORM_SCHEMA, "examples": EXAMPLE_SCHEMA}


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


def read_parquet_checked(path: StorePath, schema: pa.Schema, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a shard and check it has the expected columns; errors name the file. ``columns``: only these of
    ``schema``'s (a projected read: a summary that counts need not load the texts)."""
    if columns is not None:
        schema = pa.schema([schema.field(name) for name in columns], metadata=schema.metadata)
    source, filesystem = parquet_source(path)
    try:
        present = set(pq.read_schema(source, filesystem=filesystem).names) if columns is not None else None
        table = pq.read_table(
            source, filesystem=filesystem, columns=None if present is None else [c for c in columns if c in present]
        )
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
        self.entries = Manifest(self.root)
        self.claims = ShardClaims(self.root, lock_ttl_s)
        self._held: dict[str, Claim] = {}  # the claims this process holds on shards of this run, by key

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
    def legacy_manifest_path(self) -> StorePath:
        """The one-file manifest of runs made before per-shard entries (read, never written)."""
        return self.entries.legacy_path

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
        """Hold the run's coordinator lock: a second ``generate`` of the same run id fails at once with a clear
        error. Shard writers (workers) do not take it; they claim shards (:meth:`claim`)."""
        return folder_lock(self.root, self.run_id, ttl_s=self.lock_ttl_s)

    def write_run_info(self, info: dict[str, Any]) -> None:
        payload = {"run_id": self.run_id, "schema_version": SCHEMA_VERSION, **info}
        atomic_write_bytes(self.run_info_path, json.dumps(payload, indent=2, default=str).encode())

    def read_run_info(self) -> dict[str, Any] | None:
        return read_json_file(self.run_info_path, "run info")

    # --- manifest ----------------------------------------------------------------------------
    def manifest(self) -> dict[str, dict[str, Any]]:
        """Every committed shard's entry, by ``<kind>/<shard_id>`` (``storage/manifest.py``)."""
        return self.entries.read()

    def has_manifest(self) -> bool:
        """True once the run committed a shard."""
        return self.entries.exists()

    def _record(self, record: ShardRecord) -> None:
        self.entries.write(record.to_json())

    def is_complete(self, kind: ShardKind, shard_id: str) -> bool:
        """True if the shard's data file is committed; recovers a manifest entry lost to a crash."""
        path = self.shard_path(kind, shard_id)
        if self.entries.has(f"{kind}/{shard_id}"):
            return path.exists()
        if not path.exists():
            return False
        rows = read_parquet_checked(path, _DATA_SCHEMAS[kind]).num_rows
        rejects_path = self.rejects_path(shard_id)
        rejects = read_parquet_checked(rejects_path, REJECT_SCHEMA).num_rows if rejects_path.exists() else 0
        self._record(ShardRecord(kind, shard_id, rows, rejects, path.stat().st_size, file_sha256(path)))
        return True

    # --- claims ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def claim(self, kind: ShardKind, shard_id: str) -> Iterator[Claim | None]:
        """Claim a shard for this process (heartbeat-renewed, released at the end); yields None while another
        live worker holds it. :meth:`write_shard` of a claimed shard commits only if the claim is still held."""
        key = f"{kind}/{shard_id}"
        taken = self.claims.try_take(key)
        if taken is None:
            yield None
            return
        with taken:
            self._held[key] = taken
            try:
                yield taken
            finally:
                self._held.pop(key, None)

    def write_shard(
        self, kind: ShardKind, shard_id: str, rows: list[dict[str, Any]], rejects: list[dict[str, Any]]
    ) -> ShardRecord:
        """Commit one shard: rejects first, then the data file (commit point), then its manifest entry.

        A shard this process claimed is committed only while the claim is still its own (ClaimLost otherwise)."""
        claim = self._held.get(f"{kind}/{shard_id}")
        if claim is not None:
            claim.check()
        atomic_write_parquet(rows_to_table(rejects, REJECT_SCHEMA), self.rejects_path(shard_id), self.compression)
        checkpoint("shard.rejects")
        if claim is not None:
            claim.check()
        path = self.shard_path(kind, shard_id)
        written = atomic_write_parquet(rows_to_table(rows, _DATA_SCHEMAS[kind]), path, self.compression)
        checkpoint("shard.data")
        size, digest = written or (path.stat().st_size, file_sha256(path))
        record = ShardRecord(kind, shard_id, len(rows), len(rejects), size, digest)
        self._record(record)
        checkpoint("shard.manifest")
        return record

    # --- reading -----------------------------------------------------------------------------
    def read_kind(self, kind: ShardKind | Literal["rejects"], columns: Sequence[str] | None = None) -> pa.Table:
        """Every shard of ``kind``, concatenated; ``columns``: only these (what a summary counts, not the texts)."""
        schema = REJECT_SCHEMA if kind == "rejects" else _DATA_SCHEMAS[kind]
        files = sorted((self.root / kind).glob("*.parquet"), key=str)
        if not files:
            return schema.empty_table() if columns is None else schema.empty_table().select(list(columns))
        return pa.concat_tables([read_parquet_checked(f, schema, columns) for f in files])

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
