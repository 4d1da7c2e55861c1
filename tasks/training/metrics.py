"""The evaluation metrics, numpy only: Spearman's rank correlation (STS) and nDCG@k / recall@k (retrieval).

Pure functions of score lists, tested against hand-computed values; :mod:`tasks.training.evaluate`
applies them to a model's embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: cut-off for the retrieval metrics
RETRIEVAL_K = 10


def _rankdata(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get the average of the ranks they span (scipy's ``rankdata`` default)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # start index of each run of equal values
    boundaries = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1], True])
    ranks_sorted = np.empty(len(values), dtype=np.float64)
    for start, end in zip(boundaries[:-1], boundaries[1:], strict=True):
        ranks_sorted[start:end] = (start + 1 + end) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    return ranks


def spearman_numpy(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho with numpy only: Pearson correlation of average ranks (NaN if one side is constant)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman needs two 1-d sequences of the same length, got {x.shape} and {y.shape}")
    if len(x) < 2:
        return float("nan")
    rx, ry = _rankdata(x), _rankdata(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    if denom == 0:
        return float("nan")
    return float(np.clip((rx @ ry) / denom, -1.0, 1.0))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (``scipy.stats.spearmanr`` when scipy is installed, else numpy)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman needs two 1-d sequences of the same length, got {x.shape} and {y.shape}")
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")  # undefined; scipy would warn and return NaN too
    try:
        from scipy.stats import spearmanr
    except ImportError:  # pragma: no cover - scipy is installed in the project's venv
        return spearman_numpy(x, y)
    return float(spearmanr(x, y)[0])


def ndcg_at_k(ranked_relevances: Sequence[float], k: int = RETRIEVAL_K, n_relevant: int | None = None) -> float:
    """nDCG@k of one ranking: gains ``rel_i / log2(i + 1)`` for ranks i = 1..k.

    ``ranked_relevances`` are the relevances of the returned documents, best-ranked first.
    ``n_relevant``: how many relevant documents exist in all (binary relevance), which fixes the
    ideal ranking (``min(n_relevant, k)`` ones); without it the ideal is the given relevances sorted
    (graded relevance, all relevant documents assumed to be in the list). 0.0 when nothing is relevant.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    rels = np.asarray(list(ranked_relevances), dtype=np.float64)[:k]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = float(rels @ discounts[: len(rels)])
    if n_relevant is None:
        ideal = np.sort(np.asarray(list(ranked_relevances), dtype=np.float64))[::-1][:k]
    else:
        ideal = np.ones(min(int(n_relevant), k))
    idcg = float(ideal @ discounts[: len(ideal)])
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked_relevances: Sequence[float], k: int = RETRIEVAL_K, n_relevant: int | None = None) -> float:
    """Share of the relevant documents found in the top ``k`` (relevance > 0 counts as relevant).

    ``n_relevant``: how many relevant documents exist in all; without it, the relevant ones in the
    given list. 0.0 when nothing is relevant.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    rels = np.asarray(list(ranked_relevances), dtype=np.float64)
    total = int(np.count_nonzero(rels > 0)) if n_relevant is None else int(n_relevant)
    if total <= 0:
        return 0.0
    return float(np.count_nonzero(rels[:k] > 0)) / total
