"""Ranking-consistency filter: FAISS against a brute-force NumPy reference, hand-built cases, ANN indexes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from ground.settings import CleanSettings
from storage.schemas import DROPPED_SCHEMA
from tasks.cleaning.rank_filter import SearchResults, build_index, positive_ranks, rank_filter, search


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_table(n: int) -> pa.Table:
    return pa.table(
        {
            "example_id": [f"run/g00/{i:05d}" for i in range(n)],
            "run_id": ["run"] * n,
            "task_type": ["retrieval"] * n,
            "query": [f"query {i}" for i in range(n)],
        }
    )


def random_problem(seed: int, nq: int = 300, nc: int = 500, dim: int = 32):
    """Queries are noisy copies of their positive with noise of varying scale, so ranks spread out."""
    rng = np.random.default_rng(seed)
    corpus = unit(rng.standard_normal((nc, dim)))
    positive_idx = rng.integers(0, nc, size=nq)
    scale = rng.uniform(0.1, 4.0, size=(nq, 1))
    queries = unit(corpus[positive_idx] + scale * unit(rng.standard_normal((nq, dim))))
    return queries, corpus, positive_idx


def reference_ranks(queries, corpus, positive_idx):
    scores = queries @ corpus.T
    pos = scores[np.arange(len(queries)), positive_idx]
    return 1 + (scores > pos[:, None]).sum(axis=1), pos, scores


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_flat_filter_matches_bruteforce(seed):
    queries, corpus, positive_idx = random_problem(seed)
    cfg = CleanSettings(rank_top_k=20, negative_rank_min=20, negative_rank_max=40)
    table = make_table(len(queries))
    result, found = rank_filter(table, queries, corpus, positive_idx, cfg)

    ref_rank, ref_score, scores = reference_ranks(queries, corpus, positive_idx)
    ref_keep = ref_rank <= cfg.rank_top_k
    assert 0 < ref_keep.sum() < len(queries)  # both sides are exercised
    ids = np.array(table.column("example_id").to_pylist())
    assert result.kept.column("example_id").to_pylist() == ids[ref_keep].tolist()
    assert sorted(result.dropped.column("example_id").to_pylist()) == sorted(ids[~ref_keep].tolist())
    assert result.kept.column("positive_rank").to_pylist() == ref_rank[ref_keep].tolist()
    np.testing.assert_allclose(result.kept.column("positive_score").to_numpy(), ref_score[ref_keep], atol=1e-5)

    # the search handed on to mining: top-40 of each kept row, best first, aligned with the kept table
    assert isinstance(found, SearchResults)
    hits, hit_scores = found
    assert hits.shape == (ref_keep.sum(), 40)
    np.testing.assert_array_equal(found.rows, np.flatnonzero(ref_keep))
    ref_top = np.argsort(-scores, axis=1, kind="stable")[:, :40]
    np.testing.assert_array_equal(hits, ref_top[ref_keep])
    np.testing.assert_allclose(hit_scores, np.take_along_axis(scores, ref_top, 1)[ref_keep], atol=1e-5)


@pytest.mark.parametrize("with_corpus", [True, False])
def test_positive_ranks_sentinel_and_exact_score(with_corpus):
    queries, corpus, positive_idx = random_problem(7, nq=200, nc=300)
    k = 10
    index = build_index(corpus, CleanSettings())
    ranks, scores = positive_ranks(index, queries, positive_idx, k, corpus_vecs=corpus if with_corpus else None)
    ref_rank, ref_score, _ = reference_ranks(queries, corpus, positive_idx)
    assert ranks.dtype == np.int32
    assert (ref_rank > k).any() and (ref_rank <= k).any()
    np.testing.assert_array_equal(ranks, np.minimum(ref_rank, k + 1))
    # the score is exact for every row, including those whose positive is beyond the top k
    np.testing.assert_allclose(scores, ref_score, atol=1e-5)


def test_tied_positive_ranks_first():
    """A corpus item tying the positive does not push it down, whichever of the two the index lists first."""
    e = np.eye(4, dtype=np.float32)
    corpus = np.stack([e[0], e[0], e[1], e[2]])  # items 0 and 1 are identical vectors
    queries = np.stack([e[0], e[0]])
    cfg = CleanSettings(rank_top_k=1, negative_rank_max=4)
    result, _ = rank_filter(make_table(2), queries, corpus, np.array([0, 1]), cfg)
    assert result.kept.column("positive_rank").to_pylist() == [1, 1]
    assert result.dropped.num_rows == 0


def test_broad_query_dropped_specific_kept():
    """Hand-built: a broad query scores 60 on-topic documents above its own positive; a specific one does not."""
    dim = 8
    e = np.eye(dim, dtype=np.float32)
    rng = np.random.default_rng(0)
    topic = unit(
        e[0]
        + 0.2
        * np.concatenate([np.zeros((60, 1)), rng.standard_normal((60, dim - 1))], axis=1)
        * np.array([0, 1, 0, 1, 1, 1, 1, 1])
    )  # near e0, never along e2
    broad_positive = unit(0.5 * e[0] + e[1])
    specific_positive = e[2]
    corpus = np.vstack([topic, broad_positive, specific_positive]).astype(np.float32)
    queries = np.stack([e[0], unit(e[2] + 0.1 * e[0])])
    positive_idx = np.array([60, 61])
    result, found = rank_filter(make_table(2), queries, corpus, positive_idx, CleanSettings())  # k = 50

    assert result.kept.column("example_id").to_pylist() == ["run/g00/00001"]
    assert result.kept.column("positive_rank").to_pylist() == [1]
    dropped = result.dropped
    assert dropped.schema.equals(DROPPED_SCHEMA, check_metadata=False)
    row = dropped.to_pylist()[0]
    assert row["example_id"] == "run/g00/00000"
    assert (row["stage"], row["reason"]) == ("rank_filter", "positive_not_in_top_k")
    assert row["detail"].startswith("positive rank 61 > k=50 (score 0.4472")
    assert found.ids.shape == (1, 62)  # N = max(50, 100) capped at the corpus size


def test_kept_table_types_and_rerun_replaces_columns():
    queries, corpus, positive_idx = random_problem(3, nq=50, nc=120)
    cfg = CleanSettings(rank_top_k=30)
    result, _ = rank_filter(make_table(50), queries, corpus, positive_idx, cfg)
    kept = result.kept
    assert kept.schema.field("positive_rank").type == pa.int32()
    assert kept.schema.field("positive_score").type == pa.float32()
    assert kept.num_rows + result.dropped.num_rows == 50
    # filtering an already-filtered table (e.g. a resumed run) keeps one set of filter columns
    rows = [int(e.rsplit("/", 1)[1]) for e in kept.column("example_id").to_pylist()]
    again, _ = rank_filter(kept, queries[rows], corpus, positive_idx[rows], cfg)
    assert again.kept.column_names == kept.column_names
    assert again.kept.num_rows == kept.num_rows


def test_search_is_batched_without_changing_results():
    queries, corpus, _ = random_problem(5, nq=97, nc=200)
    index = build_index(corpus, CleanSettings())
    ids_a, scores_a = search(index, queries, 15, batch=10)
    ids_b, scores_b = search(index, queries, 15, batch=1000)
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_array_equal(scores_a, scores_b)
    ids_c, _ = search(index, queries, 500)  # k beyond the corpus is capped
    assert ids_c.shape == (97, 200) and (ids_c >= 0).all()


def clustered(seed: int, n: int = 3000, dim: int = 32, centers: int = 40):
    rng = np.random.default_rng(seed)
    c = unit(rng.standard_normal((centers, dim)))
    return unit(c[rng.integers(0, centers, n)] + 0.35 * rng.standard_normal((n, dim)) / np.sqrt(dim))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_are_plausible(kind):
    corpus = clustered(0)
    rng = np.random.default_rng(1)
    sources = rng.choice(len(corpus), 200, replace=False)
    queries = unit(corpus[sources] + 0.02 * rng.standard_normal((200, corpus.shape[1])))
    cfg = CleanSettings(index=kind, ivf_nlist=1024, ivf_nprobe=8, rank_top_k=10, negative_rank_max=20)
    index = build_index(corpus, cfg)
    assert index.ntotal == len(corpus) and index.metric_type == 0  # faiss.METRIC_INNER_PRODUCT
    if kind == "ivf":
        assert index.is_trained and index.nlist <= len(corpus) // 39 and index.nprobe == 8

    ids, scores = search(index, queries, 10)
    exact_ids, _ = search(build_index(corpus, CleanSettings()), queries, 10)
    assert (ids[:, 0] == sources).mean() >= 0.95
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids, strict=True)])
    assert recall >= 0.8
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first

    result, found = rank_filter(make_table(200), queries, corpus, sources, cfg, index=index)
    assert result.kept.num_rows >= 190
    assert found.ids.shape == (result.kept.num_rows, 20)


def test_flat_index_choice(monkeypatch):
    """Exact search is the bf16-screened index on bf16 CPUs, faiss's IndexFlatIP search without bf16 (FlatIP:
    no copy of the corpus), IndexFlatIP itself on GPUs."""
    import faiss

    import tasks.cleaning.search.build as rf
    from tasks.cleaning.search.bf16 import Bf16ExactIndex
    from tasks.cleaning.search.faiss_index import FlatIP

    corpus = clustered(2, n=200)
    monkeypatch.setattr(rf, "bf16_supported", lambda: True)
    monkeypatch.setattr(rf, "num_gpus", lambda: 0)
    assert isinstance(build_index(corpus, CleanSettings()), Bf16ExactIndex)
    assert isinstance(build_index(corpus, CleanSettings(index="hnsw")), faiss.IndexHNSWFlat)
    monkeypatch.setattr(rf, "bf16_supported", lambda: False)
    assert isinstance(build_index(corpus, CleanSettings()), FlatIP)


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_index_filter_decisions_equal_faiss_flat(seed):
    """rank_filter with the bf16-screened exact index decides exactly as with faiss's IndexFlatIP."""
    import faiss

    from tasks.cleaning.search.bf16 import Bf16ExactIndex

    rng = np.random.default_rng(seed)
    corpus = clustered(seed, n=4000, dim=64, centers=30)
    positive_idx = rng.integers(0, len(corpus), 600)
    scale = rng.uniform(0.2, 2.0, size=(600, 1))
    queries = unit(corpus[positive_idx] + scale * unit(rng.standard_normal((600, 64))))
    cfg = CleanSettings(rank_top_k=50, negative_rank_min=50, negative_rank_max=100)
    flat = faiss.IndexFlatIP(64)
    flat.add(corpus)
    results = {}
    for name, index in (("faiss", flat), ("bf16", Bf16ExactIndex(corpus))):
        results[name] = rank_filter(make_table(600), queries, corpus, positive_idx, cfg, index=index)
    (a, found_a), (b, found_b) = results["faiss"], results["bf16"]
    assert 0 < a.kept.num_rows < 600
    assert a.kept.column("example_id").to_pylist() == b.kept.column("example_id").to_pylist()
    assert a.kept.column("positive_rank").to_pylist() == b.kept.column("positive_rank").to_pylist()
    np.testing.assert_array_equal(
        a.kept.column("positive_score").to_numpy(), b.kept.column("positive_score").to_numpy()
    )
    assert sorted(a.dropped.column("example_id").to_pylist()) == sorted(b.dropped.column("example_id").to_pylist())
    np.testing.assert_array_equal(found_a.rows, found_b.rows)
    np.testing.assert_allclose(found_a.scores, found_b.scores, atol=1e-6)
    same = [set(x) == set(y) for x, y in zip(found_a.ids.tolist(), found_b.ids.tolist(), strict=True)]
    assert np.mean(same) >= 0.99  # sets differ only on fp32 near-ties at the 100th result
