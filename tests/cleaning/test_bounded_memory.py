"""What keeps the clean's memory flat across a stage's batches: garbage in reference cycles is collected between
parts, the pages of memory-mapped vector and text files go back to the page cache (data unchanged), and the bf16
search copy of a file-mapped corpus lives in the page cache too, with the same results as in memory."""

from __future__ import annotations

import gc
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from storage.stage_io import release_unused_memory, released
from storage.vector_files import MatrixWriter, TextWriter, load_matrix, release_mapped_pages
from tasks.cleaning.search.bf16 import Bf16ExactIndex


def _rss_file_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssFile:"))


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
    writer = MatrixWriter(tmp_path / "corpus.npy")
    writer.append(vectors)
    matrix = writer.close()
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
    writer = MatrixWriter(tmp_path / "corpus.npy")
    writer.append(corpus)
    mapped = writer.close()
    queries = corpus[:300] + 0.05 * rng.standard_normal((300, 64)).astype(np.float32)
    on_file, in_memory = Bf16ExactIndex(mapped, score_block_bytes=2**20), Bf16ExactIndex(corpus)
    assert on_file._xb_map is not None and in_memory._xb_map is None
    assert sorted(os.listdir(tmp_path)) == ["corpus.npy"]  # the copy's file is unlinked: nothing to clean up
    found, expected = on_file.search(queries, 100), in_memory.search(queries, 100)
    release_mapped_pages()  # between two searches: pages dropped, the copy intact
    again = on_file.search(queries, 100)
    for got in (found, again):
        assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
