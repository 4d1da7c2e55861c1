"""The embedding cache: vectors keyed by text hash in Parquet shards, one folder per model key.

``<data_dir>/embeddings/<model_key>/*.parquet`` (``EMBEDDING_CACHE_SCHEMA``: ``text_hash``,
``vector``), each shard written atomically; one new shard per :func:`encode_cached` call that had
anything to embed. :func:`encode_cached` hands an embedder (any object with ``encode(texts)``
returning float32 rows, see ``llm/embedder.py``) only the texts the cache lacks, so a later stage, a
resumed run or a later run over overlapping texts embeds nothing twice. Generation (intent dedup of
instructions) and cleaning (ranking, decontamination) share it; the model key names model and
precision, so fp32 and bf16 vectors of one model are never mixed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ground import progress
from storage.atomic import StorageError, atomic_write_parquet
from storage.corpus import text_hash
from storage.location import StorePath, as_store_path, parquet_source
from storage.schemas import EMBEDDING_CACHE_SCHEMA

#: texts handed to the embedder per call inside encode_cached (progress granularity; bounds memory)
ENCODE_CHUNK = 4096


class TextEncoder(Protocol):
    """What :func:`encode_cached` needs of an embedder (``llm.embedder.Embedder``)."""

    model_key: str

    def encode(self, texts: list[str]) -> np.ndarray: ...


def embeddings_dir(data_dir: StorePath | str, model_key: str) -> StorePath:
    """The cache folder of one model key under a data dir (the key made safe as a folder name)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_key)
    return as_store_path(data_dir) / "embeddings" / safe


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
    texts: Sequence[str], embedder: TextEncoder, cache: EmbeddingCache, chunk_size: int = ENCODE_CHUNK
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
