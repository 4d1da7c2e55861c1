"""Hard-negative mining (KaLM-Embedding): 7 negatives per query sampled from ranks 50–100.

Mining reuses the rank filter's one search (``tasks.cleaning.rank_filter.SearchResults``: the top-N corpus
ids and scores of each kept query, N = max(rank_top_k, negative_rank_max)); nothing is searched
or embedded again.

Rank window. KaLM's "ranks 50–100" is read as the result slice ``ids[:, 50:100]``: skip the top
``cfg.negative_rank_min`` results and take the candidates up to ``cfg.negative_rank_max``, i.e.
1-based ranks 51..100 inclusive (result positions are 0-based ``[min, max)``). The window so
starts right after the filter's top-50, where every kept positive lies, and N = 100 results
cover it exactly.

A candidate in the window is not usable when it is

* the row's positive (same corpus id, or the same normalized text),
* the query itself (normalized text equal to the row's query),
* a near-duplicate of the positive: cosine with the positive >= ``NEAR_DUP_COSINE`` (0.95),
* with ``cfg.negative_margin`` set (NV-Retriever's positive-aware filter), a candidate whose score
  is not below ``margin × positive score``,
* a repeat, by normalized text, of a better-ranked usable candidate of the same row.

From the usable ones, ``cfg.negatives_per_query`` are taken: ``negative_mode = "sample"`` draws them
uniformly without replacement, seeded per row by ``stable_seed(cfg.seed, example_id)`` (each
candidate's draw key is a hash of that seed and its corpus id, so the choice does not depend on
row order, batching or other rows); ``"top"`` takes the best-ranked usable ones. The chosen
negatives are listed in rank order with their scores. A row with no usable negative is dropped
(stage ``negatives``, reason ``no_hard_negatives``) when ``negatives_per_query > 0``.

For the LLM judge (``tasks/cleaning/judge.py``) mining also keeps, per row (``CANDIDATE_COLUMNS``), each
chosen negative's 1-based rank, the usable candidates it did not pick (up to ``negatives_per_query``,
the next ones of the same draw, listed in rank order: the replacements for negatives the judge finds
relevant, with no new search) and the best-ranked result that is neither the positive nor the query.

Everything but the text normalisation is vectorised over rows in chunks (550k queries).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ground.seeding import stable_seed
from ground.settings import CleanSettings
from storage.corpus import Drops, StageResult, dropped_table
from storage.mapped import take_rows, take_texts
from storage.schemas import CANDIDATE_COLUMNS, MINED_COLUMNS
from tasks.cleaning.dedup import dedup_keys
from tasks.cleaning.dedup_stream import key_digests
from tasks.cleaning.embed import RankingVectors
from tasks.cleaning.rank_filter import rank_filter
from tasks.cleaning.search import Index, SplitCursor, build_index

#: cosine with the positive at or above which a candidate counts as a near-duplicate of it
STAGE = "negatives"
REASON = "no_hard_negatives"
NEAR_DUP_COSINE = 0.95
#: rows per vectorised chunk (bounds the gathered candidate vectors: chunk × window × dim floats)
CHUNK_ROWS = 1024
#: queries per block of the filter + mining (bounds the search results: block × N int64 ids + float32 scores)
BLOCK_ROWS = 8192

_U64_MAX = np.iinfo(np.uint64).max


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser over uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


#: corpus texts normalised per call of ``dedup_keys`` (bounds its Python strings)
KEY_CHUNK = 65_536


def as_texts(texts: Sequence[str] | pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Corpus texts as an Arrow string array (a Python list is converted once; Arrow arrays pass as they are)."""
    if isinstance(texts, pa.Array | pa.ChunkedArray):
        return texts
    return pa.array(list(texts), type=pa.large_string())


def text_at(texts: pa.Array | pa.ChunkedArray, ids: np.ndarray) -> pa.Array:
    """``texts[ids]`` as a ``string`` array (the mined columns' type); a memory-mapped corpus's texts are read,
    not faulted in (``storage/mapped.py``)."""
    return take_texts(texts, ids).cast(pa.string())


def corpus_groups(corpus_texts: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Integer ids of the corpus texts' normalised keys (dedup's :func:`~tasks.cleaning.dedup.dedup_keys`, the key
    exact dedup compares), by the keys' 16-byte digests, and the distinct digests, sorted (for :func:`query_groups`):
    memory is 16 bytes per corpus text, not its key."""
    n = len(corpus_texts)
    digests = [
        key_digests(dedup_keys(take_texts(corpus_texts, np.arange(s, min(n, s + KEY_CHUNK)))))
        for s in range(0, n, KEY_CHUNK)
    ]
    distinct, group = np.unique(np.concatenate(digests) if digests else np.zeros(0, "S16"), return_inverse=True)
    return np.asarray(group, dtype=np.int64).reshape(-1), distinct


def query_groups(query_texts: pa.Array | pa.ChunkedArray | Sequence[str | None], distinct: np.ndarray) -> np.ndarray:
    """Per query, the group of the corpus text with its key (:func:`corpus_groups`); -3 when none has it."""
    digests = key_digests(dedup_keys(query_texts))
    if not len(distinct):
        return np.full(len(digests), -3, dtype=np.int64)
    at = np.minimum(np.searchsorted(distinct, digests), len(distinct) - 1)
    return np.where(distinct[at] == digests, at, -3).astype(np.int64)


def _text_groups(
    corpus_texts: pa.Array | pa.ChunkedArray, query_texts: Sequence[str | None] | pa.Array | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Group ids of normalized texts: one per corpus item, and per query (-3 when not in the corpus)."""
    corpus_group, distinct = corpus_groups(corpus_texts)
    return corpus_group, None if query_texts is None else query_groups(query_texts, distinct)


def _positive_scores(
    table: pa.Table, search_ids: np.ndarray, search_scores: np.ndarray, positive_idx: np.ndarray
) -> np.ndarray:
    """The positive's score per row: the filter's ``positive_score`` column, else from the results.

    Where neither knows it, NaN: the margin test then rejects every candidate of the row.
    """
    if "positive_score" in table.column_names:
        return table.column("positive_score").to_numpy(zero_copy_only=False).astype(np.float32)
    out = np.full(len(positive_idx), np.nan, dtype=np.float32)
    hit = search_ids == positive_idx[:, None]
    found = hit.any(axis=1)
    out[found] = search_scores[found, hit[found].argmax(axis=1)]
    return out


def _drop_repeats(groups: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """``usable`` minus candidates whose text group repeats a better-ranked usable one in the row."""
    width = groups.shape[1]
    if width < 2:
        return usable
    # unusable candidates get a unique negative group so they never collide
    unique_fill = -10 - np.arange(groups.size, dtype=np.int64).reshape(groups.shape)
    g = np.where(usable, groups, unique_fill)
    order = np.argsort(g, axis=1, kind="stable")
    sorted_g = np.take_along_axis(g, order, axis=1)
    repeat_sorted = np.zeros_like(usable)
    repeat_sorted[:, 1:] = sorted_g[:, 1:] == sorted_g[:, :-1]
    repeat = np.zeros_like(usable)
    np.put_along_axis(repeat, order, repeat_sorted, axis=1)
    return usable & ~repeat


def mine_hard_negatives(
    table: pa.Table,
    search_ids: np.ndarray,
    search_scores: np.ndarray,
    corpus_texts: Sequence[str] | pa.Array | pa.ChunkedArray,
    corpus_vecs: np.ndarray,
    positive_idx: np.ndarray,
    cfg: CleanSettings,
    query_texts: Sequence[str | None] | pa.ChunkedArray | None = None,
    positive_scores: np.ndarray | None = None,
    near_dup_cosine: float = NEAR_DUP_COSINE,
    chunk_rows: int = CHUNK_ROWS,
    groups: tuple[np.ndarray, np.ndarray | None] | None = None,
) -> StageResult:
    """Add ``hard_negatives`` / ``hard_negative_scores`` to each row of ``table`` (see module doc).

    ``search_ids`` / ``search_scores`` (rows × N, best first) and ``positive_idx`` are aligned with
    ``table``; ``corpus_texts`` and ``corpus_vecs`` are indexed by corpus id. ``query_texts``
    defaults to the table's ``query`` column (the raw query, not the instructed form);
    ``positive_scores`` (for the margin) to its ``positive_score`` column. ``groups``: the text groups of
    the corpus and of these rows' queries when the caller computed them once (:func:`corpus_groups`,
    :func:`query_groups`); ``query_texts`` is then not read.
    """
    n = table.num_rows
    corpus_texts = as_texts(corpus_texts)
    search_ids = np.asarray(search_ids)
    search_scores = np.asarray(search_scores, dtype=np.float32)
    positive_idx = np.asarray(positive_idx, dtype=np.int64)
    corpus_vecs = np.asarray(corpus_vecs, dtype=np.float32)
    if (
        search_ids.ndim != 2
        or search_ids.shape != search_scores.shape
        or len(search_ids) != n
        or len(positive_idx) != n
    ):
        raise ValueError(
            f"{n} rows, search results of shape {search_ids.shape}/{search_scores.shape}, "
            f"{len(positive_idx)} positive ids: they must align"
        )
    if len(corpus_texts) != len(corpus_vecs):
        raise ValueError(f"{len(corpus_texts)} corpus texts but {len(corpus_vecs)} corpus vectors")
    if query_texts is None and "query" in table.column_names:
        query_texts = table.column("query")
    if query_texts is not None and len(query_texts) != n:
        raise ValueError(f"{n} rows but {len(query_texts)} query texts")

    want = cfg.negatives_per_query
    lo, hi = cfg.negative_rank_min, min(cfg.negative_rank_max, search_ids.shape[1])
    width = max(0, hi - lo)
    chosen = np.zeros((n, width), dtype=bool)
    spares = np.zeros((n, width), dtype=bool)  # usable, not chosen: the judge's replacements
    top_first = np.full(n, -1, dtype=np.int64)  # result position of the best non-positive, non-query text
    if want > 0 and width > 0 and n > 0:
        cand_all = search_ids[:, lo:hi].astype(np.int64)
        cscore_all = search_scores[:, lo:hi]
        corpus_group, query_group = groups if groups is not None else _text_groups(corpus_texts, query_texts)
        pos_group = corpus_group[positive_idx]
        margin = cfg.negative_margin
        if margin is not None:
            pos_score_all = (
                np.asarray(positive_scores, dtype=np.float32)
                if positive_scores is not None
                else _positive_scores(table, search_ids, search_scores, positive_idx)
            )
        if cfg.negative_mode == "sample":
            ids = table.column("example_id").to_pylist() if "example_id" in table.column_names else range(n)
            row_seeds = np.fromiter((stable_seed(cfg.seed, str(e)) for e in ids), dtype=np.uint64, count=n)
            row_keys = _mix64(row_seeds)

        for start in range(0, n, chunk_rows):
            sl = slice(start, min(start + chunk_rows, n))
            cand = cand_all[sl]
            present = cand >= 0
            safe = np.where(present, cand, 0)
            pos = positive_idx[sl]
            usable = present & (cand != pos[:, None])
            groups = np.where(present, corpus_group[safe], -2)
            usable &= groups != pos_group[sl, None]
            if query_group is not None:
                usable &= groups != query_group[sl, None]
            # cosine of each candidate with the row's positive: batched (rows, window, d) @ (rows, d, 1)
            cos = np.matmul(take_rows(corpus_vecs, safe), take_rows(corpus_vecs, pos)[:, :, None])[:, :, 0]
            usable &= cos < near_dup_cosine
            if margin is not None:
                usable &= cscore_all[sl] < np.float32(margin) * pos_score_all[sl, None]
            usable = _drop_repeats(groups, usable)
            if cfg.negative_mode == "top":
                ranked = np.cumsum(usable, axis=1)
                pick = usable & (ranked <= want)
                spare = usable & (ranked > want) & (ranked <= 2 * want)
            else:
                keys = _mix64(row_keys[sl, None] ^ safe.astype(np.uint64))
                keys[~usable] = _U64_MAX
                order = np.argsort(keys, axis=1, kind="stable")
                pick = np.zeros_like(usable)
                np.put_along_axis(pick, order[:, :want], True, axis=1)
                pick &= usable
                spare = np.zeros_like(usable)
                np.put_along_axis(spare, order[:, want : 2 * want], True, axis=1)
                spare &= usable
            chosen[sl] = pick
            spares[sl] = spare
            top_first[sl] = _first_other(search_ids[sl], pos, corpus_group, pos_group[sl], query_group, sl)

    counts = chosen.sum(axis=1)
    keep = counts > 0 if want > 0 else np.ones(n, dtype=bool)
    kept_rows = np.flatnonzero(keep)
    rows, cols = np.nonzero(chosen[kept_rows])  # row-major: per row, in rank order
    flat_ids = search_ids[kept_rows[rows], lo + cols].astype(np.int64) if len(rows) else np.zeros(0, np.int64)
    flat_scores = search_scores[kept_rows[rows], lo + cols] if len(rows) else np.zeros(0, np.float32)
    offsets = np.zeros(len(kept_rows) + 1, dtype=np.int32)
    np.cumsum(counts[kept_rows], out=offsets[1:])

    texts = text_at(corpus_texts, flat_ids)
    (neg_name, neg_type), (score_name, score_type) = MINED_COLUMNS
    negatives = pa.ListArray.from_arrays(pa.array(offsets), texts, type=neg_type)
    neg_scores = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_scores, type=pa.float32()), type=score_type)

    kept = table.take(pa.array(kept_rows, type=pa.int64()))
    for name, _ in MINED_COLUMNS:
        if name in kept.column_names:
            kept = kept.drop_columns([name])
    kept = kept.append_column(pa.field(neg_name, neg_type), negatives)
    kept = kept.append_column(pa.field(score_name, score_type), neg_scores)
    for name, values in _candidate_columns(
        kept_rows, chosen, spares, top_first, search_ids, search_scores, lo, corpus_texts
    ).items():
        if name in kept.column_names:
            kept = kept.drop_columns([name])
        kept = kept.append_column(pa.field(name, values.type), values)

    dropped_rows = np.flatnonzero(~keep)
    detail = (
        f"no usable candidate at ranks {lo + 1}-{hi} ({width} searched; positive, query, "
        f"near-duplicates{', margin' if cfg.negative_margin is not None else ''} excluded)"
    )

    dropped = dropped_table(table, STAGE, Drops(dropped_rows, REASON, detail))
    return StageResult(kept=kept, dropped=dropped)


def _first_other(
    ids: np.ndarray,
    pos: np.ndarray,
    corpus_group: np.ndarray,
    pos_group: np.ndarray,
    query_group: np.ndarray | None,
    sl: slice,
) -> np.ndarray:
    """Per row, the position of the best-ranked result that is neither the positive nor the query (-1: none)."""
    ids = ids.astype(np.int64)
    present = ids >= 0
    groups = np.where(present, corpus_group[np.where(present, ids, 0)], -2)
    other = present & (ids != pos[:, None]) & (groups != pos_group[:, None])
    if query_group is not None:
        other &= groups != query_group[sl, None]
    return np.where(other.any(axis=1), other.argmax(axis=1), -1)


def _candidate_columns(
    kept_rows: np.ndarray,
    chosen: np.ndarray,
    spares: np.ndarray,
    top_first: np.ndarray,
    search_ids: np.ndarray,
    search_scores: np.ndarray,
    lo: int,
    corpus_texts: pa.Array | pa.ChunkedArray,
) -> dict[str, pa.Array]:
    """The ``CANDIDATE_COLUMNS`` of the kept rows (see the module doc)."""
    types = dict(CANDIDATE_COLUMNS)

    def listed(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, cols = np.nonzero(mask[kept_rows])  # per row, in rank order
        offsets = np.zeros(len(kept_rows) + 1, dtype=np.int32)
        np.cumsum(mask[kept_rows].sum(axis=1), out=offsets[1:])
        return offsets, kept_rows[rows], lo + cols

    out: dict[str, pa.Array] = {}
    offsets, rows, cols = listed(chosen)
    out["hard_negative_ranks"] = pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(cols + 1, type=pa.int32()), type=types["hard_negative_ranks"]
    )
    offsets, rows, cols = listed(spares)
    out["spare_negatives"] = pa.ListArray.from_arrays(
        pa.array(offsets), text_at(corpus_texts, search_ids[rows, cols]), type=types["spare_negatives"]
    )
    out["spare_negative_scores"] = pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(search_scores[rows, cols], type=pa.float32()), type=types["spare_negative_scores"]
    )
    out["spare_negative_ranks"] = pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(cols + 1, type=pa.int32()), type=types["spare_negative_ranks"]
    )
    first = top_first[kept_rows]
    has = first >= 0
    safe = np.where(has, first, 0)
    top_ids = search_ids[kept_rows, safe] if len(kept_rows) else np.zeros(0, np.int64)
    top_scores = search_scores[kept_rows, safe] if len(kept_rows) else np.zeros(0, np.float32)
    top_texts = text_at(corpus_texts, np.where(has, top_ids, 0))
    out["top_retrieved"] = pc.if_else(pa.array(has, pa.bool_()), top_texts, pa.scalar(None, pa.string()))
    out["top_retrieved_rank"] = pa.array(np.where(has, safe + 1, 0), pa.int32(), mask=~has)
    out["top_retrieved_score"] = pa.array(top_scores, pa.float32(), mask=~has)
    return out


@dataclass(frozen=True)
class Ranking:
    """What every block of the filter + mining shares: the vectors, one index over the corpus, and the
    corpus texts (an Arrow array) with their normalised-text groups (None when nothing is mined)."""

    vectors: RankingVectors
    corpus_texts: pa.Array | pa.ChunkedArray
    index: Index | None  # None: the blocks' searches come from the split search (``found``)
    corpus_group: np.ndarray | None
    distinct_keys: np.ndarray | None  # sorted digests of the corpus's distinct keys

    @classmethod
    def build(cls, vectors: RankingVectors, cfg: CleanSettings, index: bool = True) -> Ranking:
        texts = as_texts(vectors.corpus_texts)
        group, distinct = corpus_groups(texts) if cfg.negatives_per_query > 0 else (None, None)
        return cls(vectors, texts, build_index(vectors.corpus_vecs, cfg) if index else None, group, distinct)


def filter_and_mine_block(
    start: int,
    rows: pa.Table,
    ranking: Ranking,
    cfg: CleanSettings,
    found: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[StageResult, StageResult]:
    """The rank filter and mining of input rows ``start .. start + len(rows)``: one search of their queries
    (or its results, ``found``, from the split search), the filter, then mining on the rows it kept. Rows
    are decided alone (mining is seeded per row), so the blocks of a table, concatenated, are the table's
    result whatever their size."""
    vectors, end = ranking.vectors, start + rows.num_rows
    positive_idx = np.asarray(vectors.positive_idx[start:end], dtype=np.int64)
    filtered, search = rank_filter(
        rows, vectors.query_vecs[start:end], vectors.corpus_vecs, positive_idx, cfg, ranking.index, found
    )
    groups = None
    if ranking.corpus_group is not None:
        kept = filtered.kept
        queries = query_groups(kept.column("query"), ranking.distinct_keys) if "query" in kept.column_names else None
        groups = (ranking.corpus_group, queries)
    mined = mine_hard_negatives(
        filtered.kept,
        search.ids,
        search.scores,
        ranking.corpus_texts,
        vectors.corpus_vecs,
        positive_idx[search.rows],
        cfg,
        groups=groups,
    )
    return filtered, mined


#: what maps a block: :func:`filter_and_mine_block` itself, or a wrapper of it (a Prefect task)
BlockRunner = Callable[..., tuple[StageResult, StageResult]]


def filter_and_mine_blocks(
    blocks: Iterable[pa.Table],
    vectors: RankingVectors,
    cfg: CleanSettings,
    run_block: BlockRunner | None = None,
    searched: SplitCursor | None = None,
) -> Iterator[tuple[StageResult, StageResult]]:
    """(filtered, mined) of each block of the input rows, in row order (``blocks``: consecutive, covering the
    rows ``vectors`` were embedded from; at least one, empty for no rows). ``searched``: the split search's
    results (``tasks.cleaning.search.SplitCursor``), so no block searches an index of its own."""
    ranking = Ranking.build(vectors, cfg, index=searched is None)
    run_block = run_block or filter_and_mine_block
    start = 0
    for rows in blocks:
        end = start + rows.num_rows
        found = searched.take(start, end) if searched is not None and end > start else None
        yield run_block(start, rows, ranking, cfg, found)
        start = end
    if start != len(vectors.query_vecs):
        raise ValueError(f"{start} rows but {len(vectors.query_vecs)} query vectors")


def filter_and_mine(
    table: pa.Table, vectors: RankingVectors, cfg: CleanSettings, block_rows: int = BLOCK_ROWS
) -> tuple[StageResult, StageResult]:
    """The rank filter, then mining on its one search restricted to the rows it kept: (filtered, mined),
    computed block by block (:func:`filter_and_mine_blocks`) and concatenated."""
    blocks = [table.slice(s, block_rows) for s in range(0, table.num_rows, block_rows)] or [table]
    parts = list(filter_and_mine_blocks(blocks, vectors, cfg))
    return tuple(  # type: ignore[return-value]
        StageResult(pa.concat_tables([p[i].kept for p in parts]), pa.concat_tables([p[i].dropped for p in parts]))
        for i in (0, 1)
    )
