"""Publish an export folder (``tasks/cleaning/export.py``, with its dataset card) to a local folder
or a Hugging Face dataset repository.

``publish_dataset(export_dir, target, token)`` copies the files (each atomically) to a local path, or
creates the Hub dataset repo if needed and uploads the folder. The token is never printed, logged or
put in an error message.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from storage.atomic import atomic_path

log = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """Publishing failed; the message never contains the token."""


class _Secret:
    """Holds the token so that no repr, log line or traceback local shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: Any):
        if value is not None and hasattr(value, "get_secret_value"):  # pydantic SecretStr
            value = value.get_secret_value()
        self._value = value or None

    def reveal(self) -> str | None:
        return self._value

    def redact(self, text: str) -> str:
        return text.replace(self._value, "***") if self._value else text

    def __repr__(self) -> str:
        return "_Secret('***')"


def _is_local(target: str) -> bool:
    return target.startswith(("/", "./", "file://"))


def _copy_local(export_dir: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for src in sorted(export_dir.rglob("*")):
        if src.is_dir() or src.name.startswith("."):
            continue
        with atomic_path(dest / src.relative_to(export_dir)) as tmp:
            shutil.copy2(src, tmp)


def publish_dataset(export_dir: Path, target: str, token: Any = None) -> str:
    """Publish the export folder (with its ``README.md`` card); returns where it went.

    ``target`` starting with ``/``, ``./`` or ``file://`` is a local folder (files copied, each
    atomically); anything else is a Hugging Face dataset repository id (``owner/name``), created if
    needed and uploaded with ``upload_folder``. ``token`` (str or pydantic ``SecretStr``; None: the
    cached login / ``HF_TOKEN``) is never printed, logged or included in an error.
    """
    secret = _Secret(token)
    del token  # only the redacting holder from here on, so no traceback local shows it
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise PublishError(f"{export_dir}: no such export folder")
    if not (export_dir / "README.md").exists():
        raise PublishError(f"{export_dir}: no README.md dataset card; write it with write_dataset_card first")
    if _is_local(target):
        dest = Path(target[len("file://") :] if target.startswith("file://") else target).resolve()
        if dest == export_dir.resolve():
            raise PublishError(f"{dest}: the target is the export folder itself")
        _copy_local(export_dir, dest)
        log.info("published %s to %s", export_dir, dest)
        return str(dest)
    parts = target.split("/")
    if len(parts) != 2 or not all(parts):
        raise PublishError(f"{target!r}: give a Hugging Face dataset id 'owner/name' or a local path")
    import huggingface_hub  # here, so that tests can monkeypatch huggingface_hub.HfApi

    try:
        api = huggingface_hub.HfApi(token=secret.reveal())
        api.create_repo(target, repo_type="dataset", exist_ok=True)
        api.upload_folder(
            repo_id=target,
            folder_path=str(export_dir),
            repo_type="dataset",
            commit_message="Upload embed-factory export",
            ignore_patterns=[".*"],
        )
    except Exception as exc:  # noqa: BLE001 - re-raised without the token and without the chain
        raise PublishError(f"publishing to {target} failed: {secret.redact(f'{type(exc).__name__}: {exc}')}") from None
    url = f"https://huggingface.co/datasets/{target}"
    log.info("published %s to %s", export_dir, url)
    return url
