"""What a data dir holds, asked before a command uses an id: its generation runs and clean runs.

The CLI checks every run id, clean id and data folder here before it starts a server or writes a file:
a data folder that is a file, a read command pointed at a folder with no runs (a misspelled
``storage.data_dir``), an unknown id (the error names the closest ids first) and an unreadable run
are each one :class:`StorageError`. Works on a local folder and on ``s3://`` (``storage/location.py``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

import pyarrow.parquet as pq

from storage.atomic import StorageError
from storage.corpus import CleanStore
from storage.location import StorePath, as_store_path, is_remote, parquet_source
from storage.shards import RunStore, list_runs

#: ids an error lists at most (the closest first)
SHOWN_IDS = 8


class NotFound(StorageError):
    """An id or a data folder that does not exist; the message says what exists instead."""


def closest_first(name: str, names: Sequence[str], cap: int = SHOWN_IDS) -> str:
    """``names`` as one short list, the ones most like ``name`` first, at most ``cap`` of them."""
    close = difflib.get_close_matches(name, names, n=cap, cutoff=0.4)
    shown = [*close, *(n for n in names if n not in close)][:cap]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "") if names else "none"


def _listing(what: str, path: StorePath, call):
    """``call()``, with a store that cannot be listed (S3 credentials, network) as one StorageError."""
    try:
        return call()
    except StorageError:
        raise
    except (NotADirectoryError, FileExistsError):
        raise StorageError(f"{path} is a file, not a folder ({what})") from None
    except Exception as exc:  # s3fs / botocore: a missing bucket, credentials, the network
        raise StorageError(f"cannot list {path} ({what}): {type(exc).__name__}: {exc}") from None


def check_folder(path: StorePath | str, what: str = "storage.data_dir") -> StorePath:
    """``path`` as a store path; a file where the folder should be is a StorageError (missing is fine)."""
    root = as_store_path(path)

    def check() -> StorePath:
        if not is_remote(root) and root.exists() and not root.is_dir():
            raise StorageError(f"{root} is a file, not a data folder (is {what} right?)")
        for sub in ("runs", "clean"):
            if not is_remote(root) and (root / sub).exists() and not (root / sub).is_dir():
                raise StorageError(f"{root / sub} is a file, not a folder of runs (is {what} right?)")
        return root

    return _listing(what, root, check)


def run_ids(data_dir: StorePath | str) -> list[str]:
    """The generation runs under ``<data_dir>/runs``, sorted."""
    root = check_folder(data_dir)
    return _listing("storage.data_dir", root / "runs", lambda: list_runs(root))


def clean_ids(data_dir: StorePath | str) -> list[str]:
    """The clean runs under ``<data_dir>/clean``, sorted by name."""
    clean = check_folder(data_dir) / "clean"

    def names() -> list[str]:
        if not clean.exists():
            return []
        return sorted(p.name for p in clean.iterdir() if p.is_dir() and not p.name.startswith("."))

    return _listing("storage.data_dir", clean, names)


def require_data(data_dir: StorePath | str) -> StorePath:
    """For a command that reads runs: the data dir, which holds at least one generation or clean run."""
    root = check_folder(data_dir)
    if not run_ids(root) and not clean_ids(root):
        raise NotFound(f"{root} holds no runs (is storage.data_dir right?)")
    return root


def require_runs(data_dir: StorePath | str, wanted: Iterable[str]) -> list[str]:
    """``wanted`` run ids, each a generation run under ``<data_dir>/runs``; else one NotFound."""
    root = require_data(data_dir)
    known = run_ids(root)
    for run_id in wanted:
        RunStore(root, run_id)  # a malformed id is its ValueError
        if run_id not in known:
            raise NotFound(f"no generation run {run_id!r} under {root / 'runs'} (runs: {closest_first(run_id, known)})")
    return list(wanted)


def require_clean(data_dir: StorePath | str, clean_id: str) -> str:
    """``clean_id``, a clean run under ``<data_dir>/clean``; else one NotFound."""
    root = require_data(data_dir)
    CleanStore(root, clean_id)  # a malformed id is its ValueError
    known = clean_ids(root)
    if clean_id not in known:
        raise NotFound(
            f"no clean run {clean_id!r} under {root / 'clean'} (clean runs: {closest_first(clean_id, known)})"
        )
    return clean_id


def check_runs_readable(data_dir: StorePath | str, wanted: Iterable[str]) -> None:
    """Each run's manifest and run info parse, and every examples shard has a Parquet footer: what a
    clean or a resumed run reads first, checked before anything is started or written.

    The footers only locally (~1,100 shards at 550k rows: a fraction of a second); on S3 each is a
    request, and the flows' own reads name an unreadable shard there before a clean run commits anything.
    """
    root = check_folder(data_dir)
    for run_id in wanted:
        store = RunStore(root, run_id)
        store.manifest()
        store.read_run_info()
        if not is_remote(root):
            for shard in sorted((store.root / "examples").glob("*.parquet"), key=str):
                check_parquet(shard)


def check_parquet(path: StorePath) -> None:
    """``path`` has a Parquet footer (one small read, not the data); else the StorageError readers give."""
    source, fs = parquet_source(path)
    try:
        pq.read_metadata(source, filesystem=fs)
    except (OSError, ValueError) as exc:  # pyarrow: ArrowInvalid (a ValueError), IsADirectoryError, ...
        raise StorageError(f"{path}: unreadable Parquet ({exc})") from None
