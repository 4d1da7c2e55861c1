"""Embedders and the embedding cache: cache hits, order, duplicates; the real MiniLM; an OpenAI-style server."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ground import progress
from ground.compute import bf16_supported
from ground.faults import ENV
from ground.settings import CleanSettings
from storage import embedding_cache
from storage.atomic import remove_stale_temps
from storage.corpus import CleanStore, text_hash
from storage.schemas import EMBEDDING_CACHE_SCHEMA
from storage.vector_files import SEGMENT_POINT
from tasks.cleaning import embed as embed_module
from tasks.cleaning.embed import (
    EmbeddingCache,
    OpenAIEmbedder,
    SentenceTransformerEmbedder,
    embed_for_ranking,
    encode_cached,
    encode_to_file,
    file_encoder,
    make_embedder,
    query_text,
)

ROOT = Path(__file__).resolve().parents[2]


def fake_vector(text: str, dim: int = 8) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


class CountingEmbedder:
    model_key = "fake"

    def __init__(self):
        self.calls: list[list[str]] = []

    @property
    def embedded(self) -> list[str]:
        return [t for call in self.calls for t in call]

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.stack([fake_vector(t) for t in texts]) if texts else np.zeros((0, 8), np.float32)


class Recorder:
    def __init__(self):
        self.total: dict[str, int] = {}
        self.done: dict[str, int] = {}

    def add_total(self, stage, n):
        self.total[stage] = self.total.get(stage, 0) + n

    def advance(self, stage, n=1, ok=True):
        self.done[stage] = self.done.get(stage, 0) + n


def test_query_text_is_kalm_instructed_form():
    assert (
        query_text("Retrieve semantically similar text.", "a cat")
        == "Instruct: Retrieve semantically similar text.\nQuery: a cat"
    )
    assert query_text(None, "a cat") == "a cat"


def test_cache_embeds_each_text_once_and_keeps_order(tmp_path):
    store = CleanStore(tmp_path, "c1")
    directory = store.embeddings_dir("fake")
    texts = ["b", "a", "b", "c", "a", "b"]
    emb = CountingEmbedder()
    recorder = Recorder()
    remove = progress.add_listener(recorder)
    try:
        first = encode_cached(texts, emb, EmbeddingCache(directory))
    finally:
        remove()
    assert emb.embedded == ["b", "a", "c"]  # duplicates embedded once, in order of first occurrence
    assert recorder.total == {"embed": 3} and recorder.done == {"embed": 3}
    assert first.dtype == np.float32 and first.shape == (6, 8)
    np.testing.assert_array_equal(first, np.stack([fake_vector(t) for t in texts]))
    assert len(list(directory.glob("*.vec"))) == 1

    # a re-run, in a fresh cache object mapping the segments, embeds nothing and writes nothing
    emb2 = CountingEmbedder()
    again = encode_cached(list(reversed(texts)), emb2, EmbeddingCache(directory))
    assert emb2.calls == []
    np.testing.assert_array_equal(again, first[::-1])
    assert len(list(directory.glob("*.vec"))) == 1

    # partly new texts: only those are embedded, in one new segment, in small encode chunks
    emb3 = CountingEmbedder()
    cache = EmbeddingCache(directory)
    mixed = encode_cached(["d", "a", "e", "f", "d", "g", "h"], emb3, cache, chunk_size=2)
    assert emb3.embedded == ["d", "e", "f", "g", "h"]
    assert max(len(c) for c in emb3.calls) == 2
    assert len(list(directory.glob("*.vec"))) == 2
    np.testing.assert_array_equal(mixed[1], first[1])
    np.testing.assert_array_equal(mixed[0], mixed[4])
    assert len(cache) == 8 and len(EmbeddingCache(directory)) == 8
    assert text_hash("h") in cache and text_hash("z") not in cache


def test_cache_blocks_and_file_output_equal_the_in_memory_vectors(tmp_path, monkeypatch):
    monkeypatch.setattr(embedding_cache, "BLOCK", 4)  # several blocks, each its own segment
    texts = [f"t{i % 7}" for i in range(19)]
    emb = CountingEmbedder()
    matrix = encode_to_file(texts, emb, EmbeddingCache(tmp_path / "emb"), tmp_path / "out.npy")
    assert isinstance(matrix, np.memmap) and not matrix.flags.writeable
    np.testing.assert_array_equal(matrix, np.stack([fake_vector(t) for t in texts]))
    assert sorted(emb.embedded) == [f"t{i}" for i in range(7)]  # a text of an earlier block is not embedded again
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), matrix)  # a plain .npy file
    emb2 = CountingEmbedder()
    np.testing.assert_array_equal(encode_cached(texts, emb2, EmbeddingCache(tmp_path / "emb")), matrix)
    assert emb2.calls == []
    assert encode_to_file([], emb2, EmbeddingCache(tmp_path / "emb"), tmp_path / "none.npy").shape == (0, 8)


def test_a_torn_segment_is_skipped_and_its_texts_embedded_again(tmp_path, caplog):
    directory = tmp_path / "emb"
    encode_cached(["a", "b"], CountingEmbedder(), EmbeddingCache(directory))
    encode_cached(["c", "d"], CountingEmbedder(), EmbeddingCache(directory))
    segments = sorted(directory.glob("*.vec"))
    data = segments[1].read_bytes()
    segments[1].write_bytes(data[: len(data) - 20])  # a partial file under the final name
    (directory / "garbage.vec").write_bytes(b"EFVEC0")
    emb = CountingEmbedder()
    with caplog.at_level("WARNING"):
        vectors = encode_cached(["a", "b", "c", "d"], emb, EmbeddingCache(directory))
    assert sorted(emb.embedded) == ["c", "d"]
    np.testing.assert_array_equal(vectors, np.stack([fake_vector(t) for t in "abcd"]))
    assert sum("torn embedding segment" in r.message for r in caplog.records) == 2


def test_a_writer_killed_before_the_rename_leaves_no_segment(tmp_path):
    """kill -9 (ground/faults.py) after the second segment's temp file is written, before its rename."""
    script = (
        "import sys; sys.path.insert(0, 'tests/cleaning'); sys.path.insert(0, '.');"
        "from test_embed import CountingEmbedder; from storage import embedding_cache as c;"
        "c.BLOCK = 2; c.encode_cached(['a', 'b', 'c', 'd'], CountingEmbedder(), c.EmbeddingCache(sys.argv[1]))"
    )
    env = {**os.environ, ENV: f"{SEGMENT_POINT}:2"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "emb")], env=env, cwd=ROOT, check=False)
    assert done.returncode == -signal.SIGKILL
    assert len(list((tmp_path / "emb").glob("*.vec"))) == 1 and len(list((tmp_path / "emb").glob(".*"))) == 1
    emb = CountingEmbedder()
    vectors = encode_cached(["a", "b", "c", "d"], emb, EmbeddingCache(tmp_path / "emb"))
    assert emb.embedded == ["c", "d"]
    np.testing.assert_array_equal(vectors, np.stack([fake_vector(t) for t in "abcd"]))
    assert remove_stale_temps(tmp_path / "emb") == 1


def test_an_old_parquet_cache_is_migrated_once(tmp_path, caplog):
    directory = tmp_path / "emb"
    directory.mkdir()
    hashes = [text_hash(t) for t in "xyz"]
    vectors = np.stack([fake_vector(t) for t in "xyz"])
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 8).cast(pa.list_(pa.float32()))
    pq.write_table(
        pa.Table.from_arrays([pa.array(hashes), column], schema=EMBEDDING_CACHE_SCHEMA), directory / "old.parquet"
    )
    emb = CountingEmbedder()
    with caplog.at_level("INFO"):
        got = encode_cached(["z", "w", "x"], emb, EmbeddingCache(directory))
    assert emb.embedded == ["w"]
    np.testing.assert_array_equal(got, np.stack([fake_vector(t) for t in "zwx"]))
    assert (directory / "legacy-old.vec").exists() and any("migrated" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level("INFO"):
        assert len(EmbeddingCache(directory)) == 4
    assert not any("migrated" in r.message for r in caplog.records)


def test_ranking_vectors_are_memory_mapped_and_keep_the_corpus_order(tmp_path, monkeypatch):
    monkeypatch.setattr(embed_module, "BLOCK", 2)  # blocks of two rows: ids and files built across blocks
    rows = pa.table(
        {
            "instruction": ["Find it.", None, "Find it.", "", "Match."],
            "query": ["q1", "q2", "q3", "q1", "q5"],
            "positive": ["p1", "p2", "p1", "n1", "p5"],  # n1: a negative of row 0, positive of row 3
            "negative": ["n1", None, "", "n2", "p2"],
        }
    )
    positives, negatives = rows["positive"].to_pylist(), [n for n in rows["negative"].to_pylist() if n]
    corpus = list(dict.fromkeys(positives + negatives))  # the order before streaming: positives, then negatives
    assert corpus == ["p1", "p2", "n1", "p5", "n2"]
    store = CleanStore(tmp_path, "c1")
    emb = CountingEmbedder()
    vectors = embed_for_ranking(rows, CleanSettings(), store, emb)
    texts = vectors.corpus_texts
    assert texts.take(pa.array(np.arange(len(texts)))).to_pylist() == corpus
    assert texts.type == pa.large_string() and texts.to_pylist() == corpus
    assert vectors.positive_idx.dtype == np.int64 and vectors.positive_idx.tolist() == [0, 1, 0, 2, 3]
    queries = [
        query_text(i, q) for i, q in zip(rows["instruction"].to_pylist(), rows["query"].to_pylist(), strict=True)
    ]
    for matrix, expected in ((vectors.query_vecs, queries), (vectors.corpus_vecs, corpus)):
        assert isinstance(matrix, np.memmap) and matrix.dtype == np.float32 and not matrix.flags.writeable
        np.testing.assert_array_equal(matrix, np.stack([fake_vector(t) for t in expected]))
    assert sorted(emb.embedded) == sorted(set(queries) | set(corpus))  # each text once
    assert (store.root / "ranking" / "corpus.npy").exists()

    streamed = embed_for_ranking(iter(rows.to_batches(max_chunksize=3)), CleanSettings(), store, CountingEmbedder())
    assert streamed.corpus_texts.to_pylist() == corpus
    np.testing.assert_array_equal(streamed.positive_idx, vectors.positive_idx)
    np.testing.assert_array_equal(streamed.corpus_vecs, vectors.corpus_vecs)
    assert not list((store.root / "ranking").glob("negatives*"))  # the spool is gone
    # a stage's batches are tables (storage.stage_io.iter_table), whose columns are chunked
    tables = [pa.concat_tables([rows.slice(0, 1), rows.slice(1, 2)]), rows.slice(3)]
    from_tables = embed_for_ranking(iter(tables), CleanSettings(), store, CountingEmbedder())
    assert from_tables.corpus_texts.to_pylist() == corpus
    np.testing.assert_array_equal(from_tables.positive_idx, vectors.positive_idx)


def test_cache_rejects_vectors_of_another_dimension(tmp_path):
    cache = EmbeddingCache(tmp_path / "emb")
    cache.add([text_hash("1")], np.ones((1, 4), np.float32))
    with pytest.raises(Exception, match="dimension"):
        cache.add([text_hash("2")], np.ones((1, 5), np.float32))
    with pytest.raises(ValueError, match="text_hash"):
        cache.add(["h2"], np.ones((1, 4), np.float32))


@pytest.fixture(scope="module")
def minilm():
    return SentenceTransformerEmbedder(batch_size=16)


def test_minilm_vectors_are_unit_384d_and_rank_paraphrases_first(minilm):
    texts = [
        "How do I reset my forgotten email password?",
        "What are the steps to recover a lost password for my mail account?",
        "The Amazon rainforest spans nine countries in South America.",
    ]
    vecs = minilm.encode(texts)
    assert vecs.dtype == np.float32 and vecs.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.3
    assert minilm.bf16 == bf16_supported()
    assert minilm.model_key == f"all-MiniLM-L6-v2@{'bf16' if minilm.bf16 else 'fp32'}"
    assert minilm.encode([]).shape == (0, 384)


@pytest.mark.parametrize("native_bf16", [True, False], ids=["native-bf16", "no-bf16"])
def test_bf16_encoding_runs_where_the_cpu_has_it_and_stays_close_to_fp32(monkeypatch, native_bf16):
    """The hardware branch forced both ways: on a CPU without native bf16, torch emulates the autocast."""
    import llm.embedder

    monkeypatch.setattr(llm.embedder, "bf16_supported", lambda: native_bf16)
    texts = ["How do I reset my forgotten email password?", "The Amazon rainforest spans nine countries."]
    asked = SentenceTransformerEmbedder(batch_size=16, bf16=True)
    assert asked.bf16 is native_bf16 and asked.model_key == f"all-MiniLM-L6-v2@{'bf16' if native_bf16 else 'fp32'}"
    fp32 = SentenceTransformerEmbedder(batch_size=16, bf16=False)
    assert fp32.bf16 is False and fp32.model_key == "all-MiniLM-L6-v2@fp32"
    vecs, exact = asked.encode(texts), fp32.encode(texts)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)  # normalised again in fp32
    assert np.min(np.sum(exact * vecs, axis=1)) > 0.99
    assert np.array_equal(vecs, exact) is (not native_bf16)  # bf16 really ran where asked and "native"


class _FakeEmbeddings(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        texts = body["input"]
        # unnormalised vectors, returned in reverse order: the client must sort by index and normalise
        data = [
            {"object": "embedding", "index": i, "embedding": (3.0 * fake_vector(t)).tolist()}
            for i, t in enumerate(texts)
        ][::-1]
        payload = json.dumps(
            {"object": "list", "data": data, "model": body["model"], "usage": {"prompt_tokens": 1, "total_tokens": 1}}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_openai_embedder_against_a_local_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeEmbeddings)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FakeEmbeddings.requests = []
    try:
        cfg = CleanSettings(
            embedder="openai",
            embedding_base_url=f"http://127.0.0.1:{server.server_port}/v1",
            embedding_model="bge-m3",
            embedding_batch_size=2,
        )
        emb = make_embedder(cfg)
        assert isinstance(emb, OpenAIEmbedder) and emb.model_key == "openai-bge-m3"
        texts = ["one", "two", "three", "four", "five"]
        vecs = emb.encode(texts)
    finally:
        server.shutdown()
        server.server_close()
    assert [len(r["input"]) for r in _FakeEmbeddings.requests] == [2, 2, 1]
    assert {r["model"] for r in _FakeEmbeddings.requests} == {"bge-m3"}
    assert {r.get("truncate_prompt_tokens") for r in _FakeEmbeddings.requests} == {-1}  # over-long texts are cut
    np.testing.assert_allclose(vecs, np.stack([fake_vector(t) for t in texts]), atol=1e-6)


def test_make_embedder_openai_needs_url_and_model():
    with pytest.raises(ValueError, match="embedding_base_url"):
        make_embedder(CleanSettings(embedder="openai"))


def test_file_encoder_returns_memory_mapped_vectors_of_the_clean_run(tmp_path):
    store = CleanStore(tmp_path, "c1")
    emb = CountingEmbedder()
    encode = file_encoder(emb, store, "decontaminate")
    vectors = encode(["x", "y", "x"])
    assert isinstance(vectors, np.memmap) and (store.root / "ranking" / "decontaminate.npy").exists()
    np.testing.assert_array_equal(vectors, np.stack([fake_vector(t) for t in "xyx"]))
    np.testing.assert_array_equal(encode(["y"]), vectors[1:2])  # from the cache
    assert emb.embedded == ["x", "y"]
