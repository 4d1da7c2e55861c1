"""The GPU worker's exact search (tasks/cleaning/search/torch_device.py) on CPU tensors, against faiss IndexFlatIP."""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa
import pytest

from ground.settings import CleanSettings
from tasks.cleaning import rank_filter as rf
from tasks.cleaning.search import MISSING_SCORE, build_index, search
from tasks.cleaning.search import build as search_build
from tasks.cleaning.search.torch_device import TorchExactIndex


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n_queries: int, n_corpus: int, dim: int = 384, seed: int = 0):
    """Corpus in 200 clusters; each query is its positive plus noise of a per-query size, so ranks spread widely."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((200, dim))
    corpus = _unit(centres[rng.integers(0, 200, n_corpus)] + 0.9 * rng.standard_normal((n_corpus, dim)))
    positive_idx = rng.integers(0, n_corpus, n_queries)
    noise = rng.uniform(0.2, 2.2, (n_queries, 1))
    queries = _unit(corpus[positive_idx] + noise * rng.standard_normal((n_queries, dim)) / np.sqrt(dim) * 8)
    return queries, corpus, positive_idx


def test_filter_decisions_equal_index_flat_ip_at_20k_by_40k():
    queries, corpus, positive_idx = clustered(20_000, 40_000)
    cfg = CleanSettings()
    table = pa.table({"example_id": [f"e{i}" for i in range(len(queries))]})
    flat = faiss.IndexFlatIP(corpus.shape[1])
    flat.add(corpus)
    # small blocks so the running-best merge runs over many corpus blocks and query chunks
    device = TorchExactIndex(corpus, "cpu", query_chunk=4096, corpus_block=8192)

    ours, our_search = rf.rank_filter(table, queries, corpus, positive_idx, cfg, index=device)
    ref, ref_search = rf.rank_filter(table, queries, corpus, positive_idx, cfg, index=flat)

    kept_ours = set(ours.kept.column("example_id").to_pylist())
    kept_ref = set(ref.kept.column("example_id").to_pylist())
    assert 0.2 < len(kept_ref) / len(queries) < 0.9, "the data must make the filter keep some rows and drop others"
    # the same decisions; a difference may only come from an fp32 near-tie at the top-k boundary
    width = our_search.ids.shape[1]
    ids, scores = search(flat, queries, width)
    for example in kept_ours ^ kept_ref:
        row = int(example[1:])
        pos_score = float(queries[row] @ corpus[positive_idx[row]])
        assert abs(float(scores[row, cfg.rank_top_k - 1]) - pos_score) < 1e-5, example
    assert len(kept_ours ^ kept_ref) <= 2
    same = sorted(kept_ours & kept_ref)
    rank_ours = dict(
        zip(ours.kept.column("example_id").to_pylist(), ours.kept.column("positive_rank").to_pylist(), strict=True)
    )
    rank_ref = dict(
        zip(ref.kept.column("example_id").to_pylist(), ref.kept.column("positive_rank").to_pylist(), strict=True)
    )
    assert sum(rank_ours[e] != rank_ref[e] for e in same) <= 2

    # the top-N lists behind mining: the same items, and the same scores to fp32 rounding
    dev_scores, dev_ids = device.search(queries[:2000], width)
    for row in range(2000):
        diff = set(dev_ids[row]) ^ set(ids[row])
        if diff:  # only items tied (to fp32 rounding) with the last one can differ
            assert abs(float(dev_scores[row, -1]) - float(scores[row, -1])) < 1e-5
    np.testing.assert_allclose(dev_scores, scores[:2000], atol=1e-5)


def test_ties_are_ordered_by_id_across_blocks_and_missing_results_are_padded():
    rng = np.random.default_rng(1)
    base = _unit(rng.standard_normal((50, 16)))
    corpus = np.concatenate([base, base, base])  # every vector three times: ids i, i+50, i+100 tie exactly
    index = TorchExactIndex(corpus, "cpu", query_chunk=7, corpus_block=13)
    scores, ids = index.search(base[:20], 6)
    for row in range(20):
        assert list(ids[row, :3]) == [row, row + 50, row + 100]
        assert scores[row, 0] == scores[row, 1] == scores[row, 2]
    assert np.all(np.diff(scores, axis=1) <= 0)

    small = TorchExactIndex(base[:5], "cpu")
    scores, ids = small.search(base[:3], 8)
    assert (ids[:, 5:] == -1).all() and (scores[:, 5:] == MISSING_SCORE).all()
    assert sorted(ids[0, :5]) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(small.reconstruct_batch(np.array([4, 0])), base[[4, 0]])


def test_build_index_picks_the_device_path_when_cuda_torch_has_no_faiss_gpu(monkeypatch):
    corpus = _unit(np.random.default_rng(2).standard_normal((64, 8)))
    built = []
    monkeypatch.setattr(search_build, "num_gpus", lambda: 0)
    monkeypatch.setattr(search_build, "cuda_available", lambda: True)
    monkeypatch.setattr(search_build, "TorchExactIndex", lambda vectors, device: built.append(device) or "device-index")
    assert build_index(corpus, CleanSettings()) == "device-index" and built == ["cuda"]
    assert build_index(corpus, CleanSettings(search_device="cpu")) != "device-index"

    monkeypatch.setattr(search_build, "cuda_available", lambda: False)
    assert build_index(corpus, CleanSettings()) != "device-index"
    with pytest.raises(ValueError, match="no CUDA device"):
        build_index(corpus, CleanSettings(search_device="cuda"))
