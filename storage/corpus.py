"""The cleaned corpus: stage tables of one clean run, the embedding cache, and the exports.

Layout of ``<data_dir>/clean/<clean_id>/``::

    inputs.json              the generation runs it read
    fingerprint.json         settings that change its tables + its runs' manifest digests (resume check)
    valid.parquet            rows that passed validation
    deduped.parquet          rows left after exact and near-duplicate removal
    filtered.parquet         rows whose positive ranks within the top k (+ positive_rank, positive_score)
    mined.parquet            filtered rows with hard negatives (+ hard_negatives, hard_negative_scores)
    verified.parquet         mined rows after the LLM judge (clean.judge): false negatives replaced, relabelled
    judged/part-*.parquet    the judge's decisions, committed in parts as they come (resume: never asked twice)
    dropped/<stage>.parquet  every dropped row with its stage and reason
    export/                  training files (KaLM JSONL/Parquet, sentence-transformers columns, held-out split)
    report.html
    ledger.parquet           cost ledger per task type (clean writes it, the fine-tune completes it)

and ``<data_dir>/embeddings/<model_key>/*.vec`` caches vectors by text hash across runs
(``storage/embedding_cache.py``); ``ranking/`` holds the ranking's memory-mapped working files until mined.
Every stage table is written atomically; a stage whose table exists is not recomputed.
``data_dir`` may be an ``s3://`` path (``storage/location.py``); the export is then written to a
local staging folder (the exporters stream into local files) and uploaded by :meth:`CleanStore.upload_export`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ground.faults import checkpoint
from ground.settings import Settings
from storage.atomic import (
    AtomicFiles,
    StorageError,
    atomic_path,
    atomic_write_bytes,
    atomic_write_parquet,
    read_json_file,
)
from storage.location import StorePath, as_store_path, data_root, is_remote, parquet_source
from storage.schemas import DROPPED_SCHEMA, JUDGED_SCHEMA, KALM_SCHEMA, st_schema
from storage.shards import folder_lock, read_parquet_checked
from storage.stage_io import BATCH_ROWS, StageWriter, iter_table, open_parquet
from storage.stages import STAGE_TABLES
from storage.vector_files import work_dir

#: fault point between the renames of the export's training files
EXPORT_POINT = "export.part"


@dataclass(frozen=True)
class Drops:
    """The rows a stage drops: positions in its input table, each with a reason and a detail.

    ``reasons`` / ``details`` hold one value per position, or one value for all of them."""

    rows: Sequence[int] | np.ndarray
    reasons: Sequence[str] | str
    details: Sequence[str | None] | str | None = None

    def __len__(self) -> int:
        return len(self.rows)


def dropped_table(table: pa.Table, stage: str, drops: Drops) -> pa.Table:
    """The one builder of dropped rows (DROPPED_SCHEMA), in input order; an id column ``table`` lacks is null."""
    rows = np.asarray(drops.rows, dtype=np.int64).reshape(-1)
    n = len(rows)

    def per_row(values: Sequence[Any] | str | None) -> list[Any]:
        return [values] * n if values is None or isinstance(values, str) else list(values)

    order = np.argsort(rows, kind="stable")
    reasons, details = per_row(drops.reasons), per_row(drops.details)
    taken = pa.array(rows[order], type=pa.int64())
    columns = {
        name: table.column(name).take(taken) if name in table.column_names else pa.nulls(n, pa.string())
        for name in ("example_id", "run_id", "task_type")
    }
    columns["stage"] = pa.array([stage] * n, type=pa.string())
    columns["reason"] = pa.array([reasons[i] for i in order], type=pa.string())
    columns["detail"] = pa.array([details[i] for i in order], type=pa.string())
    return pa.table(columns).cast(DROPPED_SCHEMA)


@dataclass
class StageResult:
    """What every cleaning stage returns: the rows it kept and the rows it dropped (DROPPED_SCHEMA)."""

    kept: pa.Table
    dropped: pa.Table

    @classmethod
    def split(cls, table: pa.Table, stage: str, drops: Drops) -> StageResult:
        """``table`` without the dropped positions (input order), and those rows as :func:`dropped_table`."""
        keep = np.ones(table.num_rows, dtype=bool)
        keep[np.asarray(drops.rows, dtype=np.int64)] = False
        return cls(table.filter(pa.array(keep)), dropped_table(table, stage, drops))

    @classmethod
    def keep_all(cls, table: pa.Table) -> StageResult:
        return cls(table, DROPPED_SCHEMA.empty_table())


def text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


class CleanLocked(StorageError):
    """Another process is writing the same clean run."""


class CleanStore:
    def __init__(self, data_dir: StorePath | str, clean_id: str, compression: str = "zstd"):
        if not clean_id or "/" in clean_id or clean_id.startswith("."):
            raise ValueError(f"invalid clean id {clean_id!r}")
        self.clean_id = clean_id
        self.data_dir = as_store_path(data_dir)
        self.root = self.data_dir / "clean" / clean_id
        self.compression = compression

    @classmethod
    def from_settings(cls, settings: Settings, clean_id: str) -> CleanStore:
        """The clean run's store as configured: data dir (local or S3) and compression."""
        return cls(data_root(settings.storage), clean_id, settings.storage.compression)

    def stage_path(self, stage: str) -> StorePath:
        return self.root / f"{stage}.parquet"

    def dropped_path(self, stage: str) -> StorePath:
        return self.root / "dropped" / f"{stage}.parquet"

    @property
    def export_dir(self) -> Path:
        """A local folder: the export itself, or on S3 its staging copy (see :meth:`upload_export`)."""
        if is_remote(self.root):
            bucket_key = self.root.path.replace("/", "_")
            # per user: a parent that another user created first (mode 755) refused this one's writes
            return Path(tempfile.gettempdir()) / f"embed-factory-export-{os.getuid()}" / f"{bucket_key}-{os.getpid()}"
        return self.root / "export"

    @property
    def export_location(self) -> StorePath:
        """Where the export is kept: ``<clean>/export`` locally or on S3."""
        return self.root / "export"

    def upload_export(self) -> StorePath:
        """On S3, upload the staged export (README.md, the dataset card, last) and drop the staging copy.

        Each file is one PUT; the card goes last, so an export with a card is complete. Locally
        the export is already in place and this only returns it.
        """
        target = self.export_location
        if not is_remote(target):
            return target
        staged = self.export_dir
        files = sorted((p for p in staged.rglob("*") if p.is_file()), key=lambda p: (p.name == "README.md", str(p)))
        for src in files:
            atomic_write_bytes(target / src.relative_to(staged).as_posix(), src.read_bytes())
        for src in files:
            src.unlink()
        return target

    @property
    def report_path(self) -> StorePath:
        return self.root / "report.html"

    @property
    def ledger_path(self) -> StorePath:
        """The clean run's clean-scope cost ledger (``storage/ledger.py``), completed by the fine-tune."""
        return self.root / "ledger.parquet"

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Hold the clean run's lock: a second `clean` of the same id fails at once.

        A clean run that leaves nothing but its lock (it failed before its first table) is removed.
        """
        return folder_lock(
            self.root, self.clean_id, what="clean run", option="--clean-id", error=CleanLocked, remove_if_empty=True
        )

    def has(self, stage: str) -> bool:
        return self.stage_path(stage).exists()

    def stage_writer(self, stage: str) -> StageWriter:
        """Appends to a stage table (``storage/stages.py``) and its drop files, committed together
        (``storage/stage_io.py``: drop files first, then the table, the commit point)."""
        drops = {name: self.dropped_path(name) for name in STAGE_TABLES[stage].drops}
        return StageWriter(stage, self.stage_path(stage), drops, self.compression)

    def write_stage(self, stage: str, result: StageResult) -> None:
        """Commit a whole stage table: its drop files, each with the dropped rows of its name (empty ones
        too), then the table itself."""
        with self.stage_writer(stage) as writer:
            writer.append(result.kept, result.dropped)
            writer.commit()

    def iter_stage(
        self, stage: str, columns: Sequence[str] | None = None, batch_rows: int = BATCH_ROWS
    ) -> Iterator[pa.Table]:
        """A stage table ``batch_rows`` rows at a time (checked as :meth:`read_stage` checks it)."""
        entry = STAGE_TABLES[stage]
        return iter_table(self.stage_path(stage), entry.schema if entry.checked else None, columns, batch_rows)

    def read_columns(self, stage: str, columns: Sequence[str]) -> pa.Table:
        """Only ``columns`` of a stage table, whole (what a global stage decides from)."""
        parts = list(self.iter_stage(stage, columns))
        if not parts:
            entry = STAGE_TABLES[stage]
            schema = entry.schema if entry.checked else open_parquet(self.stage_path(stage)).schema_arrow
            return pa.schema([schema.field(name) for name in columns]).empty_table()
        return pa.concat_tables(parts)

    def count_by_type(self, stage: str) -> dict[str, int]:
        """Rows of a stage table per task type, in order of first appearance (``storage.schemas.count_by_type``
        of the table, its ``task_type`` column read batch by batch)."""
        counts: dict[str, int] = {}
        for batch in self.iter_stage(stage, ["task_type"]):
            for row in pc.value_counts(batch.column("task_type")).to_pylist():
                counts[row["values"]] = counts.get(row["values"], 0) + row["counts"]
        return counts

    def count_by_type_and_model(self, stage: str) -> dict[tuple[str, str], int]:
        """Rows of a stage table per (task type, model): the ledger's split by generator."""
        counts: dict[tuple[str, str], int] = {}
        for batch in self.iter_stage(stage, ["task_type", "model"]):
            for row in batch.group_by(["task_type", "model"]).aggregate([([], "count_all")]).to_pylist():
                key = (row["task_type"], row["model"])
                counts[key] = counts.get(key, 0) + row["count_all"]
        return counts

    def write_table(self, stage: str, table: pa.Table) -> None:
        atomic_write_parquet(table, self.stage_path(stage), self.compression)

    def read_stage(self, stage: str, schema: pa.Schema | None = None) -> pa.Table:
        """A stage table; with ``schema``, checked to have (and cast to) its columns, extra ones dropped."""
        path = self.stage_path(stage)
        if schema is not None:
            return read_parquet_checked(path, schema)
        return open_parquet(path).read()  # a missing or unreadable file: one StorageError line

    def count(self, path: StorePath) -> int:
        """Rows of a Parquet file, from its footer (nothing else is read)."""
        source, filesystem = parquet_source(path)
        try:
            return pq.read_metadata(source, filesystem=filesystem).num_rows
        except (pa.ArrowException, OSError) as exc:
            raise StorageError(f"{path}: unreadable Parquet ({exc})") from None

    def write_inputs(self, run_ids: list[str], fingerprint: dict[str, Any] | None = None) -> None:
        """The runs read and the fingerprint (``storage/fingerprint.py``), written with the first table."""
        if fingerprint is not None:
            atomic_write_bytes(self.fingerprint_path, json.dumps(fingerprint, indent=1).encode())
        atomic_write_bytes(self.root / "inputs.json", json.dumps({"runs": run_ids}, indent=1).encode())

    @property
    def fingerprint_path(self) -> StorePath:
        return self.root / "fingerprint.json"

    def read_fingerprint(self) -> dict[str, Any] | None:
        """The stored fingerprint; None for a new clean run (or one made before fingerprints)."""
        return read_json_file(self.fingerprint_path, "fingerprint")

    @property
    def judged_dir(self) -> StorePath:
        return self.root / "judged"

    def write_judged_part(self, decisions: pa.Table) -> StorePath:
        """Commit one part of judge decisions (JUDGED_SCHEMA) under the next free part number."""
        numbers = [int(p.stem.split("-")[1]) for p in self.judged_dir.glob("part-*.parquet")]
        path = self.judged_dir / f"part-{max(numbers, default=-1) + 1:05d}.parquet"
        atomic_write_parquet(decisions.cast(JUDGED_SCHEMA), path, self.compression)
        checkpoint("judge.part")
        return path

    def read_judged(self) -> pa.Table:
        """Every committed judge decision of this clean run, parts in order (empty when none)."""
        parts = sorted(self.judged_dir.glob("part-*.parquet"))
        if not parts:
            return JUDGED_SCHEMA.empty_table()
        return pa.concat_tables([read_parquet_checked(p, JUDGED_SCHEMA) for p in parts])

    def embeddings_dir(self, model_key: str) -> StorePath:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_key)
        return self.data_dir / "embeddings" / safe

    def remove_ranking_files(self) -> None:
        """The ranking's memory-mapped working files (vectors, corpus texts: GBs at 550k rows) go once mined."""
        shutil.rmtree(work_dir(self.root, "ranking"), ignore_errors=True)


def mirror_exports(data_dir: StorePath | str, local_dir: Path) -> list[str]:
    """Copy every complete export (one with its ``README.md`` card) from S3 to ``local_dir``.

    Training reads local files, so fine-tuning on S3 storage works on this copy: ``<local_dir>/clean/
    <clean_id>/export/``. A file whose size matches is not fetched again; each one lands atomically
    (``storage/atomic.py``) and keeps the object's modification time so "the latest export" means the same here.
    Locally there is nothing to do. Returns the clean ids mirrored.
    """
    root = as_store_path(data_dir)
    if not is_remote(root):
        return []
    fs, base = root.fs, root.path
    cards = fs.glob(f"{base}/clean/*/export/README.md")
    mirrored = []
    for card in sorted(cards):
        export = card.rsplit("/", 1)[0]
        clean_id = export.split("/")[-2]
        for key, info in sorted(fs.find(export, detail=True).items()):
            target = Path(local_dir) / "clean" / clean_id / "export" / key[len(export) + 1 :]
            if target.exists() and target.stat().st_size == info["size"]:
                continue
            with atomic_path(target) as tmp:
                fs.get_file(key, str(tmp))
            modified = info.get("LastModified")
            if modified is not None:
                os.utime(target, (modified.timestamp(), modified.timestamp()))
        mirrored.append(clean_id)
    return mirrored


class ExportWriter:
    """The training files of an export, streamed under temp names and renamed together once all are complete.

    Per split: ``<split>.jsonl`` and ``<split>.parquet`` (KaLM records, ``KALM_SCHEMA``) and
    ``<split>_st.parquet`` (sentence-transformers columns, ``st_schema(negatives)``). A crash leaves the
    previous files or the new ones (per file: the ``export.part`` fault point sits between the renames),
    never half a file::

        with ExportWriter(out_dir, ("train", "heldout"), negatives=3) as export:
            export.write("train", records, st_rows)
        export.files  # "train.jsonl" -> path, ...
    """

    def __init__(self, out_dir: Path, splits: Sequence[str], negatives: int, compression: str = "zstd"):
        self.out_dir = Path(out_dir)
        self.splits = tuple(splits)
        self.st_schema = st_schema(negatives)
        self.compression = compression
        self.files: dict[str, Path] = {}
        self._outputs = AtomicFiles(EXPORT_POINT)
        self._writers: dict[str, dict[str, Any]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> ExportWriter:
        try:
            for split in self.splits:
                paths = {
                    kind: self.out_dir / f"{split}{suffix}"
                    for kind, suffix in (("jsonl", ".jsonl"), ("kalm", ".parquet"), ("st", "_st.parquet"))
                }
                self.files.update({path.name: path for path in paths.values()})
                jsonl = self._outputs.temp_for(paths["jsonl"]).open("w", encoding="utf-8")
                self._handles.append(jsonl)
                kalm = pq.ParquetWriter(
                    self._outputs.temp_for(paths["kalm"]), KALM_SCHEMA, compression=self.compression
                )
                self._handles.append(kalm)
                st = pq.ParquetWriter(self._outputs.temp_for(paths["st"]), self.st_schema, compression=self.compression)
                self._handles.append(st)
                self._writers[split] = {"jsonl": jsonl, "kalm": kalm, "st": st}
        except BaseException:
            self._close()
            self._outputs.discard()
            raise
        return self

    def write(self, split: str, records: list[dict[str, Any]], st_rows: list[dict[str, Any]]) -> None:
        """Append KaLM ``records`` (JSONL and Parquet) and their sentence-transformers rows to ``split``."""
        if not records:
            return
        out = self._writers[split]
        out["jsonl"].write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        out["kalm"].write_table(pa.Table.from_pylist(records, schema=KALM_SCHEMA))
        out["st"].write_table(pa.Table.from_pylist(st_rows, schema=self.st_schema))

    def _close(self) -> None:
        while self._handles:
            with contextlib.suppress(Exception):
                self._handles.pop().close()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if exc_type is None:
                for handle in self._handles:  # a failing close (disk full) fails the export
                    handle.close()
                self._outputs.commit()
        finally:
            self._close()
            self._outputs.discard()  # whatever was not renamed
