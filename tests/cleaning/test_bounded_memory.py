"""What keeps the clean's memory flat across a stage's batches: garbage in reference cycles is collected between
parts, the pages of memory-mapped vector and text files go back to the page cache (data unchanged), and the bf16
search copy of a file-mapped corpus lives in the page cache too, with the same results as in memory."""

from __future__ import annotations

import gc
import os

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from storage.mapped import load_matrix, release_mapped_pages, take_rows, take_texts
from storage.stage_io import release_unused_memory, released
from storage.vector_files import MatrixWriter, TextWriter
from tasks.cleaning.search.bf16 import Bf16ExactIndex
from tasks.cleaning.search.faiss_index import FlatIP


def _rss_file_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssFile:"))


def _mapped(tmp_path, vectors: np.ndarray) -> np.ndarray:
    """``vectors`` written as the clean writes its ranking matrices, returned memory-mapped."""
    writer = MatrixWriter(tmp_path / "corpus.npy")
    writer.append(vectors)
    return writer.close()


class _Holder:
    """Refers to itself: freed only by the cycle collector."""

    def __init__(self, array: pa.Array):
        self.array, self.me = array, self


def test_release_collects_tables_held_in_reference_cycles():
    gc.collect()
    before = pa.total_allocated_bytes()
    gc.disable()  # as between two automatic collections of the oldest generation
    try:
        _Holder(pc.add(pa.array(np.arange(4_000_000, dtype=np.int64)), 1))  # 32 MB in Arrow's pool, unreachable
        assert pa.total_allocated_bytes() - before >= 32_000_000
        release_unused_memory()
        assert pa.total_allocated_bytes() - before < 1_000_000
    finally:
        gc.enable()


def test_released_releases_after_each_part_is_consumed(monkeypatch):
    calls = []
    monkeypatch.setattr("storage.stage_io.release_unused_memory", lambda: calls.append(len(calls)))
    seen = []
    for part in released(iter("abc")):
        seen.append((part, len(calls)))
    assert seen == [("a", 0), ("b", 1), ("c", 2)] and len(calls) == 3


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="RssFile is read from Linux's /proc")
def test_mapped_vectors_and_texts_hand_their_pages_back_unchanged(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((50_000, 384)).astype(np.float32)  # 77 MB
    matrix = _mapped(tmp_path, vectors)
    texts = TextWriter(tmp_path / "corpus")
    texts.append([f"text number {i} " * 20 for i in range(50_000)])
    column = texts.close()
    release_mapped_pages()
    idle = _rss_file_kib()
    assert float(matrix.sum()) == pytest.approx(float(vectors.sum()), rel=1e-4)  # every page read
    assert column[49_999].as_py().startswith("text number 49999 ")
    assert _rss_file_kib() - idle > 60_000  # the matrix's pages are resident
    release_mapped_pages()
    assert _rss_file_kib() - idle < 10_000  # back in the page cache only
    assert np.array_equal(matrix, vectors) and column[7].as_py() == "text number 7 " * 20
    assert np.array_equal(load_matrix(tmp_path / "corpus.npy")[:3], vectors[:3])


def test_bf16_copy_of_a_file_mapped_corpus_is_mapped_and_searches_the_same(tmp_path):
    rng = np.random.default_rng(1)
    corpus = rng.standard_normal((6_000, 64)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    mapped = _mapped(tmp_path, corpus)
    queries = corpus[:300] + 0.05 * rng.standard_normal((300, 64)).astype(np.float32)
    on_file, in_memory = Bf16ExactIndex(mapped, score_block_bytes=2**20), Bf16ExactIndex(corpus)
    assert on_file._xb_map is not None and in_memory._xb_map is None
    assert sorted(os.listdir(tmp_path)) == ["corpus.npy"]  # the copy's file is unlinked: nothing to clean up
    found, expected = on_file.search(queries, 100), in_memory.search(queries, 100)
    release_mapped_pages()  # between two searches: pages dropped, the copy intact
    again = on_file.search(queries, 100)
    for got in (found, again):
        assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])


def test_faiss_flat_search_keeps_a_mapped_corpus_by_reference_with_index_flat_ip_results(tmp_path):
    rng = np.random.default_rng(2)
    corpus = rng.standard_normal((4_000, 32)).astype(np.float32)
    mapped = _mapped(tmp_path, corpus)
    index = FlatIP(mapped)
    assert np.shares_memory(index._x, mapped)  # no copy of the corpus: its pages stay the file's
    reference = faiss.IndexFlatIP(32)
    reference.add(corpus)
    queries = corpus[:50] + rng.standard_normal((50, 32)).astype(np.float32)
    for k in (10, 5_000):  # more than the corpus: padded as faiss pads (-1, -FLT_MAX)
        got, want = index.search(queries, k), reference.search(queries, k)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert np.array_equal(index.reconstruct_batch(np.array([3, 1])), corpus[[3, 1]])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="RssFile is read from Linux's /proc")
def test_gathers_from_mapped_files_read_what_fancy_indexing_gives_without_faulting_the_file_in(tmp_path):
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((60_000, 384)).astype(np.float32)  # 92 MB
    matrix = _mapped(tmp_path, vectors)
    words = [f"{i} " + "w" * int(rng.integers(0, 300)) for i in range(60_000)]
    text_writer = TextWriter(tmp_path / "corpus")
    text_writer.append(words)
    texts = text_writer.close()
    ids = rng.integers(0, 60_000, size=(300, 10))  # 5 % of the rows, with repeats
    release_mapped_pages()
    idle = _rss_file_kib()
    got_rows, got_texts = take_rows(matrix, ids), take_texts(texts, ids)
    assert _rss_file_kib() - idle < 5_000  # a gather through the map would fault most of the 92 MB in
    assert np.array_equal(got_rows, vectors[ids]) and got_rows.shape == (300, 10, 384)
    assert got_texts.to_pylist() == [words[i] for i in ids.reshape(-1)]
    view = matrix[1000:2000]  # a view of the map: row ids are the view's
    assert np.array_equal(take_rows(view, np.array([0, 999, 5, -1])), vectors[[1000, 1999, 1005, 1999]])
    part = texts.slice(500, 100)
    assert take_texts(part, np.array([0, 99, 0])).to_pylist() == [words[500], words[599], words[500]]
    assert take_texts(texts, np.arange(10, 20)).to_pylist() == words[10:20]  # adjacent: read as one span
    assert take_rows(matrix, np.zeros(0, np.int64)).shape == (0, 384) and len(take_texts(texts, [])) == 0
    with pytest.raises(IndexError):
        take_rows(matrix, np.array([60_000]))
    with pytest.raises(IndexError):
        take_texts(texts, np.array([60_000]))
    in_memory = pa.array(words[:50], pa.large_string())  # not a mapped column: Arrow's take
    assert take_texts(in_memory, np.array([3, 1])).to_pylist() == [words[3], words[1]]
