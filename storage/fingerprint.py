"""A clean run's fingerprint: the settings that change its tables and the inputs it read.

Stored as ``<clean>/fingerprint.json`` with the run's first table (``CleanStore.write_inputs``);
resuming the clean id with another fingerprint fails with :class:`CleanConfigMismatch`, whose one
line names what changed (:func:`changes`), instead of silently reusing tables made from other inputs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ground.settings import Settings
from storage.atomic import StorageError
from storage.shards import RunStore

#: clean settings that say where or how fast work runs, never what it yields
EXECUTION_ONLY = {
    "embedding_base_url",
    "embedding_api_key",
    "embedding_batch_size",
    "search_device",
    "search_blocks",
    "task_runner",
    "dask_address",
    "dask_workers",
}


class CleanConfigMismatch(StorageError):
    """A clean id resumed with other settings or inputs than it was started with."""


def check_resume(clean_id: str, stored: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Raise :class:`CleanConfigMismatch` naming what changed when ``stored`` (None: a new run) differs."""
    if stored is None or stored == current:
        return
    what = changes(stored, current)
    shown = "; ".join(what[:5]) + (f"; and {len(what) - 5} more" if len(what) > 5 else "")
    raise CleanConfigMismatch(
        f"clean run {clean_id!r} was made with other settings or inputs ({shown}); "
        "resume it with the same ones or choose a new --clean-id"
    )


def clean_fingerprint(settings: Settings, runs: list[str]) -> dict[str, Any]:
    """What must not change between a clean run and its resumption: result settings, input runs, manifests."""
    clean = settings.clean.model_dump(mode="json", exclude=EXECUTION_ONLY)
    if clean["decontaminate_sts_languages"] is None:  # the default follows the fine-tune's STS languages
        clean["decontaminate_sts_languages"] = list(settings.finetune.sts_languages)
    return {
        "clean": clean,
        "judge_model": settings.llm_model if settings.clean.judge else None,
        "runs": {run: {"manifest": manifest_digest(RunStore.from_settings(settings, run))} for run in runs},
    }


def manifest_digest(store: RunStore) -> str | None:
    """A digest of what a generation run holds: its shards and their row and reject counts; None when it has
    no manifest. Not of the manifest's bytes: those carry commit times, so a run resumed after a crash (the
    same shards and rows) would read as other inputs."""
    if not store.has_manifest():
        return None
    content = {key: [entry.get("rows"), entry.get("rejects")] for key, entry in sorted(store.manifest().items())}
    return hashlib.blake2b(json.dumps(content, sort_keys=True).encode(), digest_size=16).hexdigest()


def changes(stored: Any, current: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs (``runs.<id>: added`` / ``removed`` for dict keys)."""
    if not (isinstance(stored, dict) and isinstance(current, dict)):
        return [] if stored == current else [f"{prefix or 'value'}: {stored!r} -> {current!r}"]
    out = []
    for key in [*stored, *(k for k in current if k not in stored)]:
        name = f"{prefix}.{key}" if prefix else str(key)
        if key not in current:
            out.append(f"{name}: removed")
        elif key not in stored:
            out.append(f"{name}: added")
        else:
            out += changes(stored[key], current[key], name)
    return out
