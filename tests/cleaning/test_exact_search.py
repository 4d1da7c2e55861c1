"""Bf16ExactIndex: exact top-N against brute force in the same fp32 arithmetic, NumPy and faiss.

The strongest check is `assert_brute_force`: the index must return exactly (ids and bit-identical
scores) what scoring *every* corpus item with the index's own fp32 dot product and sorting by
(score descending, id ascending) returns. Against NumPy/faiss (other fp32 summation orders) the
sets must agree except for items within 1e-6 of the N-th score, and the scores within 1e-6.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from tasks.cleaning.search import MISSING_SCORE
from tasks.cleaning.search.bf16 import Bf16ExactIndex
from tasks.cleaning.search.bf16_scan import _bf16_floor, _select_top
from tasks.cleaning.search.constants import BF16_U

DIM = 384


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def brute_force(index: Bf16ExactIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Score every (query, item) pair with the index's fp32 rescoring; top k by (score desc, id asc)."""
    nq, m = len(queries), index.ntotal
    rows = np.repeat(np.arange(nq, dtype=np.int32), m)
    ids = np.tile(np.arange(m, dtype=np.int64), nq)
    stats = index.last_stats
    index.last_stats = {"rescored": 0}
    rows, ids, scores = index._rescore(np.ascontiguousarray(queries, dtype=np.float32), rows, ids)
    index.last_stats = stats
    full = np.empty((nq, m), dtype=np.float32)
    full[rows, ids] = scores
    width = min(k, m)
    order = np.lexsort((np.tile(np.arange(m), (nq, 1)), -full), axis=1)[:, :width]
    return np.take_along_axis(full, order, 1), order


def assert_brute_force(index: Bf16ExactIndex, queries: np.ndarray, k: int, scores: np.ndarray, ids: np.ndarray):
    ref_scores, ref_ids = brute_force(index, queries, k)
    width = ref_ids.shape[1]
    np.testing.assert_array_equal(ids[:, :width], ref_ids)
    np.testing.assert_array_equal(scores[:, :width], ref_scores)
    assert (ids[:, width:] == -1).all() and (scores[:, width:] == MISSING_SCORE).all()


def assert_matches_reference(
    scores: np.ndarray,
    ids: np.ndarray,
    ref_scores: np.ndarray,
    ref_ids: np.ndarray,
    exact: np.ndarray,
    tol: float = 1e-6,
) -> int:
    """Same top-k sets as another exact search up to items within ``tol`` of the boundary; returns #rows differing."""
    np.testing.assert_allclose(scores, ref_scores, atol=tol, rtol=0)
    np.testing.assert_allclose(scores, np.take_along_axis(exact, ids, 1), atol=tol, rtol=0)
    differing = 0
    for row in range(len(ids)):
        ours, theirs = set(ids[row].tolist()), set(ref_ids[row].tolist())
        if ours != theirs:
            differing += 1
            boundary = exact[row, ids[row]].min()
            for item in ours ^ theirs:  # only near-ties at the boundary may differ
                assert abs(exact[row, item] - boundary) <= tol, (row, item)
    return differing


def check_order(scores: np.ndarray, ids: np.ndarray) -> None:
    assert (np.diff(scores, axis=1) <= 0).all()
    tied = np.diff(scores, axis=1) == 0
    assert (np.diff(ids, axis=1)[tied] > 0).all()  # equal scores: ascending ids


def clustered(seed: int, n: int, dim: int = DIM, centers: int = 20, spread: float = 0.02) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = unit(rng.standard_normal((centers, dim)))
    return unit(c[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_unit_vectors_match_numpy_and_faiss(seed):
    rng = np.random.default_rng(seed)
    corpus = unit(rng.standard_normal((5000, DIM)))
    queries = unit(rng.standard_normal((500, DIM)))
    index = Bf16ExactIndex(corpus)
    assert (index.ntotal, index.d) == (5000, DIM)
    scores, ids = index.search(queries, 100)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (500, 100)
    check_order(scores, ids)
    assert_brute_force(index, queries, 100, scores, ids)

    exact = queries.astype(np.float64) @ corpus.astype(np.float64).T
    ref_ids = np.argsort(-exact, axis=1, kind="stable")[:, :100]
    assert (
        assert_matches_reference(scores, ids, np.take_along_axis(exact, ref_ids, 1).astype(np.float32), ref_ids, exact)
        == 0
    )
    flat = faiss.IndexFlatIP(DIM)
    flat.add(corpus)
    f_scores, f_ids = flat.search(queries, 100)
    assert assert_matches_reference(scores, ids, f_scores, f_ids, exact) == 0
    # the screen keeps a modest number of candidates (N plus the items within the error margin)
    assert index.last_stats["rescored"] < 3 * 100 * 500


def test_clustered_near_ties_and_many_blocks():
    """Tight clusters: hundreds of items within the error margin of the N-th score; small blocks, odd sizes."""
    corpus = clustered(0, 5003)
    rng = np.random.default_rng(1)
    queries = unit(corpus[rng.choice(5003, 300, replace=False)] + 0.01 * rng.standard_normal((300, DIM)) / np.sqrt(DIM))
    index = Bf16ExactIndex(corpus, score_block_bytes=2 * 128 * 1000, query_chunk=128)  # blocks of 992 + tails
    blocks = index._corpus_blocks(128)
    assert len(blocks) > 5 and blocks[-1][2] == 1  # a tail shorter than a group
    scores, ids = index.search(queries, 100)
    assert index.last_stats["rescored"] > 2 * 100 * 300  # many near-ties really are candidates
    check_order(scores, ids)
    assert_brute_force(index, queries, 100, scores, ids)
    flat = faiss.IndexFlatIP(DIM)
    flat.add(corpus)
    f_scores, f_ids = flat.search(queries, 100)
    exact = queries.astype(np.float64) @ corpus.astype(np.float64).T
    assert_matches_reference(scores, ids, f_scores, f_ids, exact)


@pytest.mark.parametrize("compact", [8_000_000, 3000])
def test_duplicated_vectors_tie_by_id(compact):
    """Exact ties: each vector 4 times at scattered ids; equal scores come out in ascending id order."""
    rng = np.random.default_rng(5)
    base = unit(rng.standard_normal((600, DIM)))
    corpus = np.repeat(base, 4, axis=0)[rng.permutation(2400)]
    queries = unit(base[rng.integers(0, 600, 200)] + 0.3 * rng.standard_normal((200, DIM)) / np.sqrt(DIM))
    index = Bf16ExactIndex(corpus, compact_entries=compact, query_chunk=64)
    scores, ids = index.search(queries, 50)
    if compact < 10_000:
        assert index.last_stats["compactions"] > 0
    check_order(scores, ids)
    assert_brute_force(index, queries, 50, scores, ids)
    # groups of 4 identical vectors: 12 full groups and 2 of the 13th (its two lowest ids)
    for row in range(len(ids)):
        vec = corpus[ids[row]]
        assert (np.abs(vec[:48:4] - vec[1:49:4]).max()) == 0
    again = index.search(queries, 50)
    np.testing.assert_array_equal(again[1], ids)


def test_everything_tied():
    """Worst case: all corpus vectors identical, so every item is a candidate: still exact, memory bounded."""
    corpus = np.repeat(unit(np.ones((1, 16))), 3000, axis=0)
    queries = unit(np.random.default_rng(0).standard_normal((40, 16)))
    index = Bf16ExactIndex(corpus, compact_entries=20_000)
    scores, ids = index.search(queries, 10)
    np.testing.assert_array_equal(ids, np.tile(np.arange(10), (40, 1)))
    assert_brute_force(index, queries, 10, scores, ids)
    assert index.last_stats["compactions"] > 0


def test_corpus_smaller_than_k_pads_like_faiss():
    rng = np.random.default_rng(2)
    corpus = unit(rng.standard_normal((30, DIM)))
    queries = unit(rng.standard_normal((7, DIM)))
    index = Bf16ExactIndex(corpus)
    scores, ids = index.search(queries, 100)
    flat = faiss.IndexFlatIP(DIM)
    flat.add(corpus)
    f_scores, f_ids = flat.search(queries, 100)
    assert ids.shape == f_ids.shape == (7, 100)
    np.testing.assert_array_equal(ids[:, 30:], f_ids[:, 30:])  # -1
    np.testing.assert_array_equal(scores[:, 30:], f_scores[:, 30:])  # -FLT_MAX
    np.testing.assert_allclose(scores[:, :30], f_scores[:, :30], atol=1e-6)
    assert_brute_force(index, queries, 100, scores, ids)
    empty_scores, empty_ids = index.search(queries[:0], 5)
    assert empty_scores.shape == empty_ids.shape == (0, 5)
    assert index.search(queries, 0)[1].shape == (7, 0)


def test_non_unit_and_zero_vectors():
    rng = np.random.default_rng(3)
    corpus = (rng.standard_normal((3000, 64)) * rng.uniform(1e-3, 1e3, (3000, 1))).astype(np.float32)
    corpus[[5, 17, 2999]] = 0.0  # zero corpus vectors score 0
    queries = (rng.standard_normal((60, 64)) * rng.uniform(1e-2, 1e2, (60, 1))).astype(np.float32)
    queries[[0, 33]] = 0.0  # zero queries: every score is 0, ids in order
    index = Bf16ExactIndex(corpus)
    scores, ids = index.search(queries, 25)
    np.testing.assert_array_equal(ids[0], np.arange(25))
    assert (scores[[0, 33]] == 0).all()
    check_order(scores, ids)
    assert_brute_force(index, queries, 25, scores, ids)
    exact = queries.astype(np.float64) @ corpus.astype(np.float64).T
    nonzero = [r for r in range(60) if r not in (0, 33)]
    ref_ids = np.argsort(-exact, axis=1, kind="stable")[nonzero, :25]
    scale = np.abs(exact).max(axis=1, keepdims=True)[nonzero]
    # relative to each query's score scale: fp32 rounding differences only
    assert_matches_reference(
        scores[nonzero] / scale,
        ids[nonzero],
        np.take_along_axis(exact[nonzero], ref_ids, 1) / scale,
        ref_ids,
        exact[nonzero] / scale,
        tol=1e-6,
    )


def test_negative_scores_use_the_float_path():
    """Queries facing away from the corpus: every score and threshold is negative."""
    rng = np.random.default_rng(4)
    corpus = unit(np.abs(rng.standard_normal((2000, 32))) + 0.1)
    queries = -unit(np.abs(rng.standard_normal((50, 32))))
    index = Bf16ExactIndex(corpus)
    scores, ids = index.search(queries, 40)
    assert (scores < 0).all()
    assert index.last_stats["float_path_blocks"] > 0
    assert_brute_force(index, queries, 40, scores, ids)


def test_chunking_and_overlap_do_not_change_results():
    corpus = clustered(6, 2000, dim=48)
    queries = clustered(7, 333, dim=48)
    a = Bf16ExactIndex(corpus, query_chunk=4096).search(queries, 30)
    b = Bf16ExactIndex(corpus, query_chunk=50, score_block_bytes=2 * 50 * 160).search(queries, 30)
    c = Bf16ExactIndex(corpus, query_chunk=50, overlap=False).search(queries, 30)  # screen inline
    for other in (b, c):
        np.testing.assert_array_equal(a[1], other[1])
        np.testing.assert_array_equal(a[0], other[0])


def test_accessors_and_validation():
    rng = np.random.default_rng(8)
    corpus = unit(rng.standard_normal((10, 8)))
    index = Bf16ExactIndex(corpus)
    np.testing.assert_array_equal(index.reconstruct(3), corpus[3])
    np.testing.assert_array_equal(index.reconstruct_batch(np.array([4, 1])), corpus[[4, 1]])
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT and index.is_trained
    with pytest.raises(ValueError):
        index.search(np.zeros((2, 7), np.float32), 3)
    with pytest.raises(ValueError):
        index.search(np.full((1, 8), np.nan, np.float32), 3)
    with pytest.raises(ValueError):
        Bf16ExactIndex(np.array([[np.inf, 0.0]], np.float32))


def test_bf16_matmul_error_bound():
    """The model behind the bound: torch's bf16 GEMM output is within u·|s̃| of the fp32-accumulated
    product of the bf16-rounded inputs (plus the accumulation error), for several shapes."""
    rng = np.random.default_rng(9)
    for rows, cols, dim in [(1, 1000, 384), (7, 33, 384), (300, 2000, 384), (64, 517, 100)]:
        q = torch.from_numpy(rng.uniform(-1, 1, (rows, dim)).astype(np.float32)).bfloat16()
        x = torch.from_numpy(rng.uniform(-1, 1, (cols, dim)).astype(np.float32)).bfloat16()
        s = (q @ x.t()).double().numpy()
        exact = q.double().numpy() @ x.double().numpy().T
        absolute = np.abs(q.double().numpy()) @ np.abs(x.double().numpy()).T
        bound = BF16_U / (1 - BF16_U) * np.abs(s) + dim * 2.0**-24 * 1.01 * absolute
        assert (np.abs(s - exact) <= bound).all()


def test_bf16_floor_and_tie_selection():
    values = np.array([0.5, 0.3, -0.3, -np.inf, 1e-3, -1e-40, 2.0**-130])
    floor = _bf16_floor(values).float().numpy().astype(np.float64)
    finite = np.isfinite(values)
    assert (floor[finite] <= values[finite]).all() and floor[3] == -np.inf
    assert (values[finite] - floor[finite] <= np.abs(values[finite]) * 2.0**-7 + 1e-38).all()

    rows = np.array([0, 0, 0, 1, 1, 0], dtype=np.int32)
    ids = np.array([9, 2, 5, 1, 0, 7])
    scores = np.array([1.0, 2.0, 1.0, -0.0, 0.0, 1.0], dtype=np.float32)
    r, i, s, pos = _select_top(rows, ids, scores, 3)
    assert r.tolist() == [0, 0, 0, 1, 1] and i.tolist() == [2, 5, 7, 0, 1] and pos.tolist() == [0, 1, 2, 0, 1]


@pytest.mark.parametrize("backend", ["bf16", "torch"])
def test_a_forced_backend_decides_as_faiss_flat_on_any_cpu(backend):
    """build_index(backend=...) runs each exact back end whatever the CPU (torch emulates bf16 where the CPU lacks
    it): the rank filter keeps and drops the same rows, with the same ranks and scores, as with IndexFlatIP.
    Exact duplicates in the corpus put ties right at the positives' scores."""
    import pyarrow as pa

    from ground.settings import CleanSettings
    from tasks.cleaning.rank_filter import rank_filter
    from tasks.cleaning.search import build_index

    rng = np.random.default_rng(11)
    corpus = clustered(11, 3000, centers=30, spread=0.6)
    corpus[2000:2300] = corpus[rng.integers(0, 2000, 300)]  # duplicates: ties of equal score
    positive_idx = rng.integers(0, len(corpus), 500)
    noise = rng.uniform(1.0, 20.0, size=(500, 1)) * unit(rng.standard_normal((500, DIM)))
    queries = unit(corpus[positive_idx] + noise)
    cfg = CleanSettings(rank_top_k=50, negative_rank_min=50, negative_rank_max=100)
    table = pa.table({"example_id": [f"e{i}" for i in range(500)]})
    results = {}
    for name in ("faiss", backend):
        index = build_index(corpus, cfg, backend=name)
        assert type(index).__name__ == {"faiss": "FlatIP", "bf16": "Bf16ExactIndex"}.get(name, "TorchExactIndex")
        results[name] = rank_filter(table, queries, corpus, positive_idx, cfg, index=index)
    (ref, ref_found), (ours, found) = results["faiss"], results[backend]
    assert 50 < ref.kept.num_rows < 450, "the data must put positives on both sides of k"
    assert ours.kept.column("example_id").to_pylist() == ref.kept.column("example_id").to_pylist()
    # ranks: equal, except that faiss's GEMM may score two copies of one vector a few ulps apart (its blocking
    # differs by column), so where the positive has copies a rank may differ by at most their number
    exact = queries.astype(np.float64) @ corpus.astype(np.float64).T
    positive = exact[np.arange(500), positive_idx]
    ties = (np.abs(exact - positive[:, None]) <= 1e-6).sum(axis=1) - 1
    kept_rows = found.rows
    rank_gap = np.abs(ours.kept.column("positive_rank").to_numpy() - ref.kept.column("positive_rank").to_numpy())
    assert (rank_gap <= ties[kept_rows]).all() and rank_gap[ties[kept_rows] == 0].max() == 0
    assert ties[kept_rows].max() > 0, "the duplicates must tie some positives"
    ours_scores, ref_scores = (r.kept.column("positive_score").to_numpy() for r in (ours, ref))
    np.testing.assert_allclose(ours_scores, ref_scores, atol=1e-6)
    assert ours.dropped.column("example_id").to_pylist() == ref.dropped.column("example_id").to_pylist()
    np.testing.assert_array_equal(found.rows, ref_found.rows)
    np.testing.assert_allclose(found.scores, ref_found.scores, atol=1e-6)


def test_forcing_an_exact_backend_on_an_approximate_index_is_refused():
    from ground.settings import CleanSettings
    from tasks.cleaning.search import build_index

    corpus = unit(np.random.default_rng(12).standard_normal((100, 16)))
    with pytest.raises(ValueError, match="backend 'bf16' is an exact search; clean.index is 'hnsw'"):
        build_index(corpus, CleanSettings(index="hnsw"), backend="bf16")
