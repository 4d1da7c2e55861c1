"""The evaluation inputs: the STS Benchmark files (bundled or configured; read, checked, sampled), the held-out split.

The STS Benchmark test split of 11 languages ships inside this package (``data/stsb-multi-mt``, with
its LICENSE and attribution README), so evaluation needs nothing outside the project;
``finetune.sts_dir`` points at another copy. :mod:`tasks.training.evaluate` scores models on them.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from ground.settings import FinetuneSettings


class EvaluationError(ValueError):
    """Evaluation input that cannot be used (malformed STS file, unusable held-out file, ...)."""


def bundled_sts_dir() -> Path:
    """The STS Benchmark test split (11 languages) shipped as package data, with its LICENSE and README."""
    return Path(__file__).resolve().parent / "data" / "stsb-multi-mt"


def sts_dir_for(cfg: FinetuneSettings) -> Path:
    """``cfg.sts_dir``, or the bundled copy when it is None."""
    return Path(cfg.sts_dir).expanduser() if cfg.sts_dir is not None else bundled_sts_dir()


def sts_file(sts_dir: Path, lang: str, split: str = "test") -> Path:
    return Path(sts_dir) / f"stsb-{lang}-{split}.csv"


def sample_indices(n: int, max_pairs: int | None, seed: int) -> list[int]:
    """``max_pairs`` of ``range(n)`` drawn with ``seed``, in file order; all of them when ``max_pairs`` is None or >= n.

    The draw depends on ``n``, ``max_pairs`` and ``seed`` only: the same for every call, and for every
    language of the (row-aligned) multilingual files, so each language is scored on the same pairs.
    """
    if max_pairs is None or max_pairs >= n:
        return list(range(n))
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be at least 1, got {max_pairs}")
    return sorted(int(i) for i in np.random.default_rng(seed).choice(n, size=max_pairs, replace=False))


def load_sts(
    sts_dir: Path, lang: str, split: str = "test", max_pairs: int | None = None, seed: int = 0
) -> tuple[list[str], list[str], np.ndarray]:
    """One STS Benchmark file: ``(sentences1, sentences2, scores)``; ``max_pairs`` of them sampled with ``seed``.

    The whole file is read and checked, then sampled (:func:`sample_indices`). Raises
    ``FileNotFoundError`` naming the file (and the languages present) when it is missing,
    :class:`EvaluationError` naming file and line when a row is malformed (not 3 columns, a score
    that is not a number in 0..5, an empty sentence) or the file has no pairs.
    """
    path = sts_file(sts_dir, lang, split)
    if not path.is_file():
        present = sorted(p.name for p in Path(sts_dir).glob(f"stsb-*-{split}.csv")) if Path(sts_dir).is_dir() else []
        where = f"present: {', '.join(present)}" if present else f"{sts_dir} has no stsb-*-{split}.csv files"
        raise FileNotFoundError(f"STS file not found: {path} (language {lang!r}, split {split!r}; {where})")
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be at least 1, got {max_pairs}")
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            for line_no, row in enumerate(csv.reader(fh), start=1):
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if len(row) != 3:
                    raise EvaluationError(
                        f"{path}:{line_no}: expected 3 columns (sentence1,sentence2,score), got {len(row)}"
                    )
                a, b, raw = row
                try:
                    score = float(raw)
                except ValueError:
                    raise EvaluationError(f"{path}:{line_no}: score {raw!r} is not a number") from None
                if not (0.0 <= score <= 5.0):
                    raise EvaluationError(f"{path}:{line_no}: score {score} is outside 0..5")
                if not a.strip() or not b.strip():
                    raise EvaluationError(f"{path}:{line_no}: empty sentence")
                s1.append(a)
                s2.append(b)
                scores.append(score)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise EvaluationError(f"{path}: cannot read as UTF-8 CSV: {exc}") from None
    if not scores:
        raise EvaluationError(f"{path}: no sentence pairs")
    keep = sample_indices(len(scores), max_pairs, seed)
    return [s1[i] for i in keep], [s2[i] for i in keep], np.asarray([scores[i] for i in keep], dtype=np.float64)


def read_heldout(path: Path) -> list[dict[str, Any]]:
    """The held-out split's ``query``, ``pos``, ``neg`` and ``task_name`` rows; a clear error if unusable."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"held-out file not found: {path}")
    table = pq.read_table(path)
    missing = {"query", "pos", "neg", "task_name"} - set(table.column_names)
    if missing:
        raise EvaluationError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    return table.select(["query", "pos", "neg", "task_name"]).to_pylist()
