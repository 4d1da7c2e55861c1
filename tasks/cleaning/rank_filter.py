"""Ranking-consistency filter (KaLM-Embedding): keep a sample only if its positive ranks in the top k.

Each query, embedded in its instructed form (``tasks.cleaning.embed.query_text``), searches the corpus of
all unique positive and negative texts by inner product over L2-normalised vectors (= cosine).
A sample whose own positive is not among the top ``cfg.rank_top_k`` (default 50) results is
dropped: the query is too broad, or the positive does not answer it.

Rank semantics. The rank of the positive is ``1 + #{corpus items whose score is strictly greater
than the positive's}``. That is what exact search means, and it is deterministic under ties: an
item that ties the positive does not push it down, whatever order the index returns tied items
in. It is computed from the top-N results alone: if fewer than N returned scores exceed the
positive's, every item that beats the positive is among them, so the count is exact; if all N do,
the positive ranks below N. The positive's score is the exact dot product ``q · corpus[pos]``
(taken from the search results when the positive is among them, so both sides of the comparison
come from the same arithmetic). With the ``ivf`` and ``hnsw`` indexes, search is approximate and
so are the ranks. The ``flat`` (exact) search runs, on CPUs with native bf16, as
:class:`tasks.cleaning.search.bf16.Bf16ExactIndex`: the same top-N sets and fp32 scores as faiss's
``IndexFlatIP`` (up to fp32 rounding order on near-ties at the 1e-7 level), ties ordered by id.

The search is done once, for ``N = max(cfg.rank_top_k, cfg.negative_rank_max)`` results per query;
:func:`rank_filter` returns them (for the kept rows) so that hard-negative mining
(``tasks.cleaning.negatives``) reuses them instead of searching again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ground.settings import CleanSettings
from storage.corpus import Drops, StageResult, dropped_table
from storage.mapped import take_rows
from storage.schemas import FILTER_COLUMNS
from tasks.cleaning.search import Index, build_index, result_width, search
from tasks.cleaning.search import as_matrix as _as_matrix

STAGE = "rank_filter"
REASON = "positive_not_in_top_k"


def _reconstruct(index: Index, ids: np.ndarray) -> np.ndarray:
    try:
        return index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))
    except RuntimeError:
        return np.stack([index.reconstruct(int(i)) for i in ids])


def exact_positive_scores(
    query_vecs: np.ndarray, corpus_vecs: np.ndarray, positive_idx: np.ndarray, batch: int = 65536
) -> np.ndarray:
    """``dot(query, corpus[positive])`` per row, float32."""
    out = np.empty(len(query_vecs), dtype=np.float32)
    for start in range(0, len(query_vecs), batch):
        q = query_vecs[start : start + batch]
        p = take_rows(corpus_vecs, positive_idx[start : start + batch])  # read, not faulted in (storage/mapped.py)
        out[start : start + batch] = np.einsum("ij,ij->i", q, p)
    return out


def ranks_from_results(
    ids: np.ndarray, scores: np.ndarray, positive_idx: np.ndarray, exact_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Positive ranks (1-based; ``width + 1`` when more than ``width`` items beat it) and scores.

    ``exact_scores`` is ``dot(q, corpus[pos])``; where the positive is among the results, the
    index's own score for it is used for the comparison instead (same arithmetic on both sides).
    """
    positive_idx = np.asarray(positive_idx, dtype=np.int64)
    width = ids.shape[1]
    hit = ids == positive_idx[:, None]
    found = hit.any(axis=1)
    pos_scores = np.asarray(exact_scores, dtype=np.float32).copy()
    if width:
        pos_scores[found] = scores[found, hit[found].argmax(axis=1)]
    valid = ids >= 0
    greater = ((scores > pos_scores[:, None]) & valid).sum(axis=1)
    # Some returned item scores no higher than the positive: every item that beats it was returned.
    # Otherwise (all returned items beat it) it ranks below the results: sentinel width + 1.
    complete = greater < valid.sum(axis=1)
    ranks = np.where(complete, greater + 1, width + 1).astype(np.int32)
    return ranks, np.asarray(exact_scores, dtype=np.float32)


def positive_ranks(
    index: Index, query_vecs: np.ndarray, positive_idx: np.ndarray, k: int, corpus_vecs: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rank (int32, 1-based; ``k + 1`` when beyond the top ``k``) and exact score of each query's positive.

    The score is ``dot(q, corpus[pos])`` whether or not the positive is in the top ``k``; the
    corpus vectors come from ``corpus_vecs`` or, without it, are reconstructed from the index.
    """
    query_vecs = _as_matrix(query_vecs)
    positive_idx = np.asarray(positive_idx, dtype=np.int64)
    ids, scores = search(index, query_vecs, k)
    if corpus_vecs is None:
        uniq, inverse = np.unique(positive_idx, return_inverse=True)
        positives = _reconstruct(index, uniq)[inverse]
        exact = np.einsum("ij,ij->i", query_vecs, positives).astype(np.float32)
    else:
        exact = exact_positive_scores(query_vecs, _as_matrix(corpus_vecs), positive_idx)
    ranks, pos_scores = ranks_from_results(ids, scores, positive_idx, exact)
    return np.minimum(ranks, k + 1).astype(np.int32), pos_scores


@dataclass
class SearchResults:
    """The one top-N search of the filter, restricted to the kept rows (in kept-table order).

    Unpacks as ``ids, scores = results``. ``rows`` are the kept rows' positions in the filter's
    input table, so per-row arrays of the input (``positive_idx``, query vectors) follow with
    ``array[results.rows]``.
    """

    ids: np.ndarray  # (kept, N) int64 corpus ids, best first; -1 for missing
    scores: np.ndarray  # (kept, N) float32 inner products
    rows: np.ndarray  # (kept,) int64 positions in the input table

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.ids, self.scores))


def rank_filter(
    table: pa.Table,
    query_vecs: np.ndarray,
    corpus_vecs: np.ndarray,
    positive_idx: np.ndarray,
    cfg: CleanSettings,
    index: Index | None = None,
    found: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[StageResult, SearchResults]:
    """Keep rows whose positive ranks within ``cfg.rank_top_k``; return the stage result and the search.

    ``found``: the ``(scores, ids)`` of these queries' search when it already ran elsewhere (the split
    search on the task runner's workers, ``tasks.cleaning.search.split``); else ``index`` is searched.

    ``query_vecs[i]`` is row i's instructed query vector, ``positive_idx[i]`` the corpus id of its
    positive, ``corpus_vecs`` the corpus (the index's vectors; one is built when ``index`` is None).
    Kept rows get ``positive_rank`` (int32) and ``positive_score`` (float32); dropped rows are
    reported with stage :data:`STAGE` and reason :data:`REASON`.
    """
    query_vecs = _as_matrix(query_vecs)
    corpus_vecs = _as_matrix(corpus_vecs)
    positive_idx = np.asarray(positive_idx, dtype=np.int64)
    n = table.num_rows
    if not (len(query_vecs) == len(positive_idx) == n):
        raise ValueError(f"{n} rows but {len(query_vecs)} query vectors and {len(positive_idx)} positive ids")
    if n and (positive_idx.min() < 0 or positive_idx.max() >= len(corpus_vecs)):
        raise ValueError("positive_idx holds ids outside the corpus")
    k = cfg.rank_top_k
    if found is not None:
        scores, ids = found
        if ids.shape != (n, result_width(cfg)) or scores.shape != ids.shape:
            raise ValueError(f"search results of shape {ids.shape} for {n} rows, top {result_width(cfg)}")
    else:
        index = index if index is not None else build_index(corpus_vecs, cfg)
        ids, scores = search(index, query_vecs, result_width(cfg))
    exact = exact_positive_scores(query_vecs, corpus_vecs, positive_idx)
    ranks, pos_scores = ranks_from_results(ids, scores, positive_idx, exact)
    width = ids.shape[1]
    keep = ranks <= k
    kept_rows = np.flatnonzero(keep)
    dropped_rows = np.flatnonzero(~keep)

    kept = table.take(pa.array(kept_rows, type=pa.int64()))
    for name, _ in FILTER_COLUMNS:
        if name in kept.column_names:
            kept = kept.drop_columns([name])
    (rank_name, rank_type), (score_name, score_type) = FILTER_COLUMNS
    kept = kept.append_column(pa.field(rank_name, rank_type), pa.array(ranks[kept_rows], type=rank_type))
    kept = kept.append_column(pa.field(score_name, score_type), pa.array(pos_scores[kept_rows], type=score_type))

    details = []
    for r, s in zip(ranks[dropped_rows].tolist(), pos_scores[dropped_rows].tolist(), strict=True):
        where = f"positive rank {r}" if r <= width else f"positive rank > {width}"
        details.append(f"{where} > k={k} (score {s:.4f})")
    dropped = dropped_table(table, STAGE, Drops(dropped_rows, REASON, details))
    results = SearchResults(ids[kept_rows], scores[kept_rows], kept_rows.astype(np.int64))
    return StageResult(kept=kept, dropped=dropped), results
