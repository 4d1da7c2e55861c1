"""Where an ablation of a clean run reads its inputs and writes its table.

Layout, beside the clean run's stage tables (local or S3, like them)::

    <data_dir>/clean/<clean_id>/ablation/
        results.parquet   variant x Matryoshka dim: STS Spearman and held-out nDCG@10, mean and seed spread
        runs.parquet      every training run (variant, seed, dim) behind it
        ablation.json     what the ablate flow returned (settings, variants, skipped ones, the table)
        ablation.html     the table as a page

Each file is written atomically; a new ablation of the same clean run replaces them. The training
files of each variant are local scratch (training reads local files) in a temporary folder under the
local data dir, removed when the ablation ends.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ground.settings import Settings
from storage.atomic import atomic_write_bytes, atomic_write_parquet
from storage.corpus import CleanStore
from storage.location import StorePath
from storage.schemas import ABLATION_RUN_SCHEMA, ABLATION_SCHEMA


class AblationStore:
    """The ablation files of one clean run, and local scratch for its training data and models."""

    def __init__(self, clean: CleanStore, local_dir: Path):
        self.clean = clean
        self.local_dir = Path(local_dir)

    @classmethod
    def from_settings(cls, settings: Settings, clean_id: str) -> AblationStore:
        return cls(CleanStore.from_settings(settings, clean_id), settings.storage.local_root)

    @property
    def root(self) -> StorePath:
        return self.clean.root / "ablation"

    @property
    def results_path(self) -> StorePath:
        return self.root / "results.parquet"

    @property
    def runs_path(self) -> StorePath:
        return self.root / "runs.parquet"

    @property
    def summary_path(self) -> StorePath:
        return self.root / "ablation.json"

    @property
    def html_path(self) -> StorePath:
        return self.root / "ablation.html"

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """A local temporary folder for the variants' training files and models, removed on the way out."""
        base = self.local_dir / "clean" / self.clean.clean_id
        base.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".ablation-", dir=base) as tmp:
            yield Path(tmp)

    def write(self, results: pa.Table, runs: pa.Table, summary: dict[str, Any], html: str) -> None:
        """The runs, the table, the page, then the summary (its presence means a complete ablation)."""
        compression = self.clean.compression
        atomic_write_parquet(runs.cast(ABLATION_RUN_SCHEMA), self.runs_path, compression)
        atomic_write_parquet(results.cast(ABLATION_SCHEMA), self.results_path, compression)
        atomic_write_bytes(self.html_path, html.encode("utf-8"))
        atomic_write_bytes(self.summary_path, json.dumps(summary, indent=1, default=str).encode())

    def read_results(self) -> pa.Table:
        return self.clean.read_stage("ablation/results")


def example_ids(path: Path | None) -> set[str]:
    """The ``example_id`` values of an export file (e.g. the held-out split); empty for None."""
    if path is None:
        return set()
    return set(pq.read_table(path, columns=["example_id"]).column("example_id").to_pylist())
