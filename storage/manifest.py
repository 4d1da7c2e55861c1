"""A run's manifest: one small entry file per committed shard, so no writer rewrites a shared file.

Layout under ``<data_dir>/runs/<run_id>/``::

    manifest.d/<kind>/<shard>.json   one committed shard: kind, shard_id, rows, rejects, bytes, sha256
    manifest.json                    runs made before manifest.d: every entry in one file (read, never written)

The manifest is the union of the two (an entry file wins over the same key in ``manifest.json``).
Committing a shard writes its own entry atomically (``storage/atomic.py``; one PUT on S3): its cost does
not grow with the run, and writers on several hosts never overwrite each other's entries, which a
read-modify-write of one ``manifest.json`` did (and cost O(shards) per commit, O(shards²) per run).
"""

from __future__ import annotations

import json
from typing import Any

from storage.atomic import StorageError, atomic_write_bytes
from storage.location import StorePath, is_remote


class Manifest:
    """The committed shards of the run under ``run_root``."""

    def __init__(self, run_root: StorePath):
        self.root = run_root
        self.entries_dir = run_root / "manifest.d"
        self.legacy_path = run_root / "manifest.json"
        self._legacy: dict[str, dict[str, Any]] | None = None  # never written again: read once

    def entry_path(self, key: str) -> StorePath:
        """``key`` is ``<kind>/<shard_id>``, as in :meth:`read`."""
        return self.entries_dir / f"{key}.json"

    def write(self, entry: dict[str, Any]) -> None:
        key = f"{entry['kind']}/{entry['shard_id']}"
        atomic_write_bytes(self.entry_path(key), json.dumps(entry, sort_keys=True).encode())

    def legacy(self) -> dict[str, dict[str, Any]]:
        if self._legacy is None:
            if not self.legacy_path.exists():
                self._legacy = {}
            else:
                try:
                    self._legacy = dict(json.loads(self.legacy_path.read_text())["shards"])
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
                    raise StorageError(f"{self.legacy_path}: corrupt manifest ({exc})") from None
        return self._legacy

    def has(self, key: str) -> bool:
        """True if ``key`` has an entry: one file test, whatever the run's size."""
        return self.entry_path(key).exists() or key in self.legacy()

    def exists(self) -> bool:
        """True once any shard was committed (or the run has a legacy manifest)."""
        return self.legacy_path.exists() or any(True for _ in self._entry_files())

    def _entry_files(self) -> list[StorePath]:
        if not self.entries_dir.exists():
            return []
        return sorted(self.entries_dir.glob("*/*.json"), key=str)

    def read(self) -> dict[str, dict[str, Any]]:
        """Every entry, by ``<kind>/<shard_id>``, sorted; an unreadable entry file is a StorageError naming it."""
        shards = dict(self.legacy())
        files = self._entry_files()
        if is_remote(self.root) and files:  # one batched, concurrent GET of all entries
            fs = files[0].fs
            blobs = fs.cat([f.path for f in files])
            contents = [(f, blobs[f.path]) for f in files]
        else:
            contents = [(f, f.read_bytes()) for f in files]
        for path, blob in contents:
            try:
                entry = json.loads(blob)
                shards[f"{entry['kind']}/{entry['shard_id']}"] = entry
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                raise StorageError(f"{path}: corrupt manifest entry ({exc})") from None
        return dict(sorted(shards.items()))
