"""Embedders and the embedding cache: cache hits, order, duplicates; the real MiniLM; an OpenAI-style server."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow.parquet as pq
import pytest

from ground import progress
from ground.compute import bf16_supported
from ground.settings import CleanSettings
from storage.corpus import CleanStore
from storage.schemas import EMBEDDING_CACHE_SCHEMA
from tasks.cleaning.embed import (
    EmbeddingCache,
    OpenAIEmbedder,
    SentenceTransformerEmbedder,
    encode_cached,
    make_embedder,
    query_text,
)


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
    assert sorted(emb.embedded) == ["a", "b", "c"]  # duplicates embedded once
    assert recorder.total == {"embed": 3} and recorder.done == {"embed": 3}
    assert first.dtype == np.float32 and first.shape == (6, 8)
    np.testing.assert_array_equal(first, np.stack([fake_vector(t) for t in texts]))
    shards = sorted(directory.glob("*.parquet"))
    assert len(shards) == 1
    table = pq.read_table(shards[0])
    assert table.schema.equals(EMBEDDING_CACHE_SCHEMA, check_metadata=False)
    assert table.num_rows == 3

    # a re-run, in a fresh cache object reading the shards back, embeds nothing and writes nothing
    emb2 = CountingEmbedder()
    again = encode_cached(list(reversed(texts)), emb2, EmbeddingCache(directory))
    assert emb2.calls == []
    np.testing.assert_array_equal(again, first[::-1])
    assert len(sorted(directory.glob("*.parquet"))) == 1

    # partly new texts: only those are embedded, in one new shard, in small encode chunks
    emb3 = CountingEmbedder()
    cache = EmbeddingCache(directory)
    mixed = encode_cached(["d", "a", "e", "f", "d", "g", "h"], emb3, cache, chunk_size=2)
    assert sorted(emb3.embedded) == ["d", "e", "f", "g", "h"]
    assert max(len(c) for c in emb3.calls) == 2
    assert len(sorted(directory.glob("*.parquet"))) == 2
    np.testing.assert_array_equal(mixed[1], first[1])
    np.testing.assert_array_equal(mixed[0], mixed[4])
    assert len(cache) == 8 and len(EmbeddingCache(directory)) == 8


def test_cache_rejects_vectors_of_another_dimension(tmp_path):
    cache = EmbeddingCache(tmp_path / "emb")
    cache.add(["h1"], np.ones((1, 4), np.float32))
    with pytest.raises(Exception, match="dimension"):
        cache.add(["h2"], np.ones((1, 5), np.float32))


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
