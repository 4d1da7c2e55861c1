"""The exact search split by query block (tasks/cleaning/search/split.py) equals the single-process search.

* blocks: boundaries on the single-process search's batches, as even as that allows; merging uneven blocks
  given in any order, and refusing gaps and overlaps;
* every exact back end, forced, in this process: the same ids and bit-identical scores as ``search``;
* 20k queries × 40k corpus on a real two-process Dask ``LocalCluster`` through Prefect's ``DaskTaskRunner``
  (the clean flow's runner): the same top-k ids and scores as the single-process search and the same rank
  filter decisions, with exact duplicates in the corpus so that ties decide some ranks.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ground.settings import CleanSettings
from tasks.cleaning.rank_filter import exact_positive_scores, ranks_from_results
from tasks.cleaning.search import BlockResult, SplitCursor, build_index, iter_split, merge_blocks, search, search_split
from tasks.cleaning.search.constants import MISSING_SCORE, SEARCH_BATCH
from tasks.cleaning.search.split import block_device, query_blocks

DIM = 64


def data(n_queries: int, n_corpus: int, seed: int = 0):
    """Unit vectors in 100 clusters, 5 % of the corpus exact copies of other items; queries near their positive."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((100, DIM)).astype(np.float32)
    corpus = centres[rng.integers(0, 100, n_corpus)] + 0.8 * rng.standard_normal((n_corpus, DIM), dtype=np.float32)
    copies = rng.choice(n_corpus, n_corpus // 20, replace=False)
    corpus[copies] = corpus[rng.integers(0, n_corpus, len(copies))]
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    positive_idx = rng.integers(0, n_corpus, n_queries)
    noise = rng.uniform(0.2, 1.6, (n_queries, 1)).astype(np.float32)
    queries = corpus[positive_idx] + noise * rng.standard_normal((n_queries, DIM), dtype=np.float32) / 4
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return queries, corpus, positive_idx


def test_blocks_start_on_search_batches_and_cover_the_queries():
    assert query_blocks(20_000, 2) == [(0, 16_384), (16_384, 20_000)]
    assert query_blocks(20_000, 3) == [(0, 8192), (8192, 16_384), (16_384, 20_000)]
    assert query_blocks(100, 4) == [(0, 100)]  # fewer queries than a batch: one block
    assert query_blocks(0, 4) == []
    spans = query_blocks(550_000, 8)
    assert len(spans) == 8 and spans[0][0] == 0 and spans[-1][1] == 550_000
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert all(start % SEARCH_BATCH == 0 for start, _ in spans)
    assert query_blocks(10, 3, align=1) == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(ValueError):
        query_blocks(10, 0)


def test_merge_places_uneven_blocks_in_query_order_and_refuses_gaps_and_overlaps():
    rng = np.random.default_rng(0)
    scores = np.sort(rng.standard_normal((11, 3)).astype(np.float32), axis=1)[:, ::-1]
    ids = rng.integers(0, 50, (11, 3))
    cuts = [(0, 1), (1, 7), (7, 11)]  # uneven: 1, 6 and 4 rows
    parts = [BlockResult(a, scores[a:b], ids[a:b]) for a, b in cuts]
    merged_scores, merged_ids = merge_blocks(reversed(parts), 11, 3)  # completion order need not be query order
    np.testing.assert_array_equal(merged_scores, scores)
    np.testing.assert_array_equal(merged_ids, ids)
    with pytest.raises(ValueError, match="row 1 is in 0 blocks"):
        merge_blocks([parts[0], parts[2]], 11, 3)
    with pytest.raises(ValueError, match="row 6 is in 2 blocks"):
        merge_blocks([*parts, BlockResult(6, scores[6:8], ids[6:8])], 11, 3)
    with pytest.raises(ValueError, match="outside"):
        merge_blocks([BlockResult(10, scores[:2], ids[:2])], 11, 3)
    with pytest.raises(ValueError, match="expected"):
        merge_blocks([BlockResult(0, scores[:, :2], ids[:, :2])], 11, 3)


def test_cursor_reads_split_blocks_back_as_the_filters_row_ranges():
    rng = np.random.default_rng(1)
    scores, ids = rng.standard_normal((23, 4)).astype(np.float32), rng.integers(0, 99, (23, 4))
    parts = [BlockResult(a, scores[a:b], ids[a:b]) for a, b in [(0, 5), (5, 6), (6, 17), (17, 23)]]
    cursor = SplitCursor(parts)
    for a, b in [(0, 3), (3, 9), (9, 10), (10, 23)]:  # ranges that straddle, sit inside and end on blocks
        got_scores, got_ids = cursor.take(a, b)
        np.testing.assert_array_equal(got_scores, scores[a:b])
        np.testing.assert_array_equal(got_ids, ids[a:b])
    assert [p.start for p in cursor._held] == [6, 17], "only the blocks the last range spans are held"
    with pytest.raises(ValueError, match="out of order"):
        cursor.take(0, 2)
    with pytest.raises(ValueError, match="ended before query row 30"):
        SplitCursor(parts).take(20, 30)


@pytest.mark.parametrize("backend", ["faiss", "bf16", "torch"])
def test_split_in_process_equals_one_search_for_every_backend(backend, tmp_path):
    queries, corpus, _ = data(SEARCH_BATCH + 300, 1000, seed=1)
    cfg = CleanSettings()
    ids, scores = search(build_index(corpus, cfg, backend), queries, 20)
    parts = list(iter_split(corpus, queries, 20, cfg, blocks=2, backend=backend))
    assert [(p.start, len(p.ids)) for p in parts] == [(0, SEARCH_BATCH), (SEARCH_BATCH, 300)]
    got_scores, got_ids = merge_blocks(parts, len(queries), 20)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_scores, scores)
    assert (np.diff(scores, axis=1) == 0).any(), "the duplicates must tie results"
    # paths of .npy files are memory-mapped by the worker
    np.save(tmp_path / "c.npy", corpus)
    np.save(tmp_path / "q.npy", queries)
    got_scores, got_ids = search_split(tmp_path / "c.npy", str(tmp_path / "q.npy"), 20, cfg, blocks=2, backend=backend)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_scores, scores)
    # k beyond the corpus: capped as search caps it
    tiny_scores, tiny_ids = search_split(corpus[:5], queries[:3], 8, cfg, backend=backend)
    assert tiny_ids.shape == (3, 5) and (tiny_ids >= 0).all() and (tiny_scores > MISSING_SCORE).all()


def test_blocks_go_to_their_own_cuda_device_or_the_cpu(monkeypatch):
    from tasks.cleaning.search import split

    monkeypatch.setattr(split, "cuda_available", lambda: True)
    monkeypatch.setattr(split, "cuda_device_count", lambda: 4)
    assert [block_device(b, CleanSettings()) for b in range(6)] == [f"cuda:{b % 4}" for b in range(6)]
    assert block_device(1, CleanSettings(search_device="cpu")) == "cpu"
    monkeypatch.setattr(split, "cuda_available", lambda: False)
    assert block_device(1, CleanSettings()) == "cpu"


def test_split_on_a_two_process_dask_cluster_equals_one_search_at_20k_by_40k(prefect_api_url, tmp_path):
    import distributed  # prefect-dask's dependency: a hard one of this project
    from dask.utils import key_split
    from prefect_dask import DaskTaskRunner

    queries, corpus, positive_idx = data(20_000, 40_000)
    cfg = CleanSettings(rank_top_k=10, negative_rank_min=10, negative_rank_max=20)
    k = max(cfg.rank_top_k, cfg.negative_rank_max)
    with ThreadPoolExecutor(1) as pool:  # the single-process search meanwhile the cluster starts
        reference = pool.submit(lambda: search(build_index(corpus, cfg), queries, k))
        with (
            distributed.LocalCluster(
                n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
            ) as cluster,
            distributed.Client(cluster) as client,
            distributed.get_task_stream(client=client) as stream,
            DaskTaskRunner(address=cluster.scheduler_address) as runner,
        ):
            scores, ids = search_split(corpus, queries, k, cfg, blocks=3, runner=runner, scratch=tmp_path / "scratch")
        ref_ids, ref_scores = reference.result()
    ran = [(key_split(t["key"]), t["worker"]) for t in stream.data if t["status"] == "OK"]
    assert sorted(name for name, _ in ran) == ["search_query_block"] * 3, ran
    assert len({worker for _, worker in ran}) == 2, ran
    assert not any((tmp_path / "scratch").iterdir()), "the shared vectors are removed afterwards"

    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6, rtol=0)
    exact = exact_positive_scores(queries, corpus, positive_idx)
    ranks, _ = ranks_from_results(ids, scores, positive_idx, exact)
    ref_ranks, _ = ranks_from_results(ref_ids, ref_scores, positive_idx, exact)
    np.testing.assert_array_equal(ranks, ref_ranks)
    keep = ranks <= cfg.rank_top_k
    assert 0.2 < keep.mean() < 0.9, "the data must put positives on both sides of k"
    np.testing.assert_array_equal(keep, ref_ranks <= cfg.rank_top_k)
    tied = (np.diff(ref_scores, axis=1) == 0) & (ref_ids[:, 1:] >= 0)
    assert tied.any(axis=1).sum() > 100, "the duplicates must tie results, so that their order is checked"


def test_split_on_the_flow_thread_runner_equals_one_search(prefect_api_url):
    """The clean flow's default runner (its own thread pool, ``stage_runner``): blocks get the arrays by reference."""
    from prefect import flow

    from flows.runners import stage_runner

    queries, corpus, _ = data(SEARCH_BATCH + 300, 1500, seed=2)
    cfg = CleanSettings(search_blocks=2)

    @flow
    def split_on_threads():
        with stage_runner(cfg) as runner:
            spans = [(part.start, len(part.ids)) for part in iter_split(corpus, queries, 30, cfg, runner=runner)]
            return spans, search_split(corpus, queries, 30, cfg, runner=runner)

    spans, (scores, ids) = split_on_threads()
    assert spans == [(0, SEARCH_BATCH), (SEARCH_BATCH, 300)]
    ref_ids, ref_scores = search(build_index(corpus, cfg), queries, 30)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores)
