"""The vector code before issue 23, kept only for ``bench/vector_memory.py`` and the decision test.

Copied from 271e9b7: the embedding cache that loads every Parquet shard into one in-memory matrix keyed
by hex strings (``get`` returns fancy-indexed copies), ``embed_for_ranking`` with Python lists and a dict
of full strings, and decontamination's embedding check that gathers two vectors per candidate pair.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import atomic_write_parquet
from storage.corpus import text_hash
from storage.schemas import EMBEDDING_CACHE_SCHEMA
from tasks.cleaning.decontaminate import EMBED_CANDIDATES, FIELDS, Match, RowText, evidence
from tasks.cleaning.embed import query_text

ENCODE_CHUNK = 4096


class OldEmbeddingCache:
    def __init__(self, directory):
        self.directory = directory
        self._index: dict[str, int] | None = None
        self._blocks: list[np.ndarray] = []
        self._matrix: np.ndarray | None = None

    def _load(self) -> dict[str, int]:
        if self._index is None:
            self._index = {}
            for path in sorted(self.directory.glob("*.parquet")) if self.directory.exists() else []:
                table = pq.read_table(path)
                dim = len(table.column("vector")[0])
                flat = table.column("vector").combine_chunks().flatten().to_numpy().astype(np.float32)
                self._append(table.column("text_hash").to_pylist(), flat.reshape(-1, dim))
        return self._index

    def _append(self, hashes, vectors):
        base = sum(len(b) for b in self._blocks)
        for i, h in enumerate(hashes):
            self._index.setdefault(h, base + i)
        self._blocks.append(vectors)
        self._matrix = None

    def get(self, hashes):
        index = self._load()
        rows = np.fromiter((index[h] for h in hashes), dtype=np.int64, count=len(hashes))
        if self._matrix is None:
            self._matrix = np.concatenate(self._blocks)
            self._blocks = [self._matrix]
        return self._matrix[rows]

    def add(self, hashes, vectors):
        self._load()
        dim = vectors.shape[1]
        offsets = pa.array(np.arange(0, (len(hashes) + 1) * dim, dim, dtype=np.int32))
        column = pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1), type=pa.float32()))
        table = pa.Table.from_arrays([pa.array(list(hashes), type=pa.string()), column], schema=EMBEDDING_CACHE_SCHEMA)
        atomic_write_parquet(table, self.directory / f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet")
        self._append(list(hashes), vectors)


def old_encode_cached(texts, embedder, cache: OldEmbeddingCache) -> np.ndarray:
    texts = list(texts)
    hashes = [text_hash(t) for t in texts]
    first: dict[str, int] = {}
    for i, h in enumerate(hashes):
        first.setdefault(h, i)
    index = cache._load()
    todo = [h for h in first if h not in index]
    if todo:
        blocks = []
        for start in range(0, len(todo), ENCODE_CHUNK):
            batch = [texts[first[h]] for h in todo[start : start + ENCODE_CHUNK]]
            blocks.append(np.asarray(embedder.encode(batch), dtype=np.float32))
        cache.add(todo, np.concatenate(blocks))
    return cache.get(hashes)


def old_embed_for_ranking(table: pa.Table, embedder, cache: OldEmbeddingCache) -> tuple:
    instructions, questions = table["instruction"].to_pylist(), table["query"].to_pylist()
    queries = [query_text(i, q) for i, q in zip(instructions, questions, strict=True)]
    positives = table["positive"].to_pylist()
    negatives = [n for n in table["negative"].to_pylist() if n]
    corpus = list(dict.fromkeys(positives + negatives))
    position = {text: i for i, text in enumerate(corpus)}
    return (
        old_encode_cached(queries, embedder, cache),
        corpus,
        old_encode_cached(corpus, embedder, cache),
        np.array([position[p] for p in positives], dtype=np.int64),
    )


def old_find_matches(table: pa.Table, index, cfg, encode) -> dict[int, Match]:
    found: dict[int, Match] = {}
    pending: list[tuple[int, str, str, int]] = []
    for field in FIELDS:
        for row, text in enumerate(table[field].to_pylist()):
            if row in found or not text:
                continue
            row_text = RowText(text)
            scored = []
            for eval_id in index.candidates(row_text):
                match, share, shared = evidence(row_text, index.evidence[eval_id], cfg.decontaminate_overlap)
                scored.append((match, share, shared, -eval_id))
            scored.sort(reverse=True)
            if scored and scored[0][0]:
                ev = index.evidence[-scored[0][3]]
                how = f"ngram overlap {scored[0][1]:.2f}, {scored[0][2]} {ev.n}-grams"
                found[row] = Match(field, -scored[0][3], how if ev.rule == "ngrams" else f"{ev.rule}, {how}")
                continue
            by_shared = sorted(scored, key=lambda s: (-s[2], -s[3]))[:EMBED_CANDIDATES]
            pending += [(row, field, text, -neg_id) for _match, _overlap, _shared, neg_id in by_shared]
    if encode is None or cfg.decontaminate_similarity is None:
        return found
    pending = [p for p in pending if p[0] not in found]
    if not pending:
        return found
    texts = list(dict.fromkeys([p[2] for p in pending] + [index.texts[p[3]].text for p in pending]))
    position = {text: i for i, text in enumerate(texts)}
    vectors = np.asarray(encode(texts), dtype=np.float32)
    left = vectors[[position[p[2]] for p in pending]]
    right = vectors[[position[index.texts[p[3]].text] for p in pending]]
    cosines = np.einsum("ij,ij->i", left, right)
    for (row, field, _text, eval_id), cosine in zip(pending, cosines.tolist(), strict=True):
        if row not in found and cosine >= cfg.decontaminate_similarity:
            found[row] = Match(field, eval_id, f"cosine {cosine:.2f}")
    return found
