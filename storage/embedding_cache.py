"""The embedding cache: per model key, append-only memory-mapped vector segments with a sorted digest index.

``<data_dir>/embeddings/<model_key>/*.vec``: each segment (``storage/vector_files.py``) holds the 16-byte
BLAKE2b digests of its texts and their float32 vectors, is written once under a temp name and renamed
into place, and is read memory-mapped: the vectors stay in the page cache, and only the index (a sorted
digest array and row numbers, 24 bytes per vector) is in process memory. A segment torn by a crash
(or truncated on disk) is logged and skipped, never read as vectors. Two processes appending to one
cache write different segments; a digest in both keeps its first row.

:func:`encode_cached` hands an embedder (any object with ``encode(texts)`` returning float32 rows, see
``llm/embedder.py``) only the texts the cache lacks, block by block, so a later stage, a resumed run or
a later run over overlapping texts embeds nothing twice; it returns an in-memory array for small callers.
:func:`encode_to_file` writes the vectors of any number of texts into a memory-mapped ``.npy`` file.
Generation (intent dedup of instructions) and cleaning (ranking, decontamination) share the cache; the
model key names model and precision, so fp32 and bf16 vectors of one model are never mixed.

Caches of earlier versions (``*.parquet`` shards keyed by ``text_hash``) are migrated once, shard by
shard, into ``legacy-<shard>.vec`` segments (logged); the Parquet files are left in place, unread.

On S3 every segment is one object (one PUT), mirrored on first use into a local folder
(:func:`local_mirror`) and memory-mapped from there: segments never change, so a file of the right size
is a complete copy.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ground import progress
from storage.atomic import StorageError, atomic_path, atomic_write_bytes
from storage.location import StorePath, as_store_path, is_remote, parquet_source
from storage.vector_files import (
    DIGEST,
    DigestIndex,
    MatrixWriter,
    SegmentWriter,
    open_segment,
    text_digests,
    write_segment,
)

log = logging.getLogger(__name__)

#: texts handed to the embedder per call inside encode_cached (progress granularity; bounds memory)
ENCODE_CHUNK = 4096
#: texts looked up, embedded and appended as one segment at a time (bounds memory: 16k x dim floats)
BLOCK = 16384
_HEX = re.compile(r"[0-9a-f]{32}")


class TextEncoder(Protocol):
    """What :func:`encode_cached` needs of an embedder (``llm.embedder.Embedder``)."""

    model_key: str

    def encode(self, texts: list[str]) -> np.ndarray: ...


def embeddings_dir(data_dir: StorePath | str, model_key: str) -> StorePath:
    """The cache folder of one model key under a data dir (the key made safe as a folder name)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_key)
    return as_store_path(data_dir) / "embeddings" / safe


def local_mirror(directory: StorePath) -> Path:
    """Where a cache folder's segments are memory-mapped from: the folder itself, or on S3 a local copy."""
    if not is_remote(directory):
        return Path(directory)
    return Path(tempfile.gettempdir()) / f"embed-factory-embeddings-{os.getuid()}" / directory.path


def as_digests(keys: Sequence[str] | np.ndarray) -> np.ndarray:
    """Digests as an ``S16`` array, from one already or from ``text_hash`` hex strings."""
    if isinstance(keys, np.ndarray) and keys.dtype == DIGEST:
        return keys
    bad = [k for k in keys if not _HEX.fullmatch(k)]
    if bad:
        raise ValueError(f"not a text_hash (32 hex digits): {bad[0]!r}")
    return np.array([bytes.fromhex(k) for k in keys], dtype=DIGEST)


class EmbeddingCache:
    """Vectors keyed by text digest in memory-mapped segments under one directory (one model key).

    The segments present when first used are mapped and indexed once; :meth:`add` writes a new segment
    atomically (a crash leaves either no segment or a complete one) and extends the index.
    """

    def __init__(self, directory: StorePath):
        self.directory = as_store_path(directory)  # a local folder or an S3 prefix
        self.local = local_mirror(self.directory)
        self._dimension: int | None = None
        self._index: DigestIndex | None = None
        self._starts: list[int] = []  # first global row of each segment
        self._vectors: list[np.ndarray] = []  # memory-mapped, one per segment

    # --- reading ------------------------------------------------------------------------------
    def segments(self) -> list[StorePath]:
        return sorted(self.directory.glob("*.vec"), key=str) if self.directory.exists() else []

    def _load(self) -> DigestIndex:
        if self._index is not None:
            return self._index
        self._migrate_parquet()
        keys = []
        for path in self.segments():
            try:
                digests, vectors = open_segment(self._local_copy(path))
            except StorageError as exc:
                log.warning("embedding cache: %s; skipped (its texts are embedded again)", exc)
                continue
            self._check_dimension(vectors.shape[1])
            self._starts.append(self.rows)
            self._vectors.append(vectors)
            keys.append(digests)
        rows = np.arange(self.rows, dtype=np.int64)
        self._index = DigestIndex(np.concatenate(keys) if keys else None, rows)
        return self._index

    @property
    def rows(self) -> int:
        """Vectors in the mapped segments (a digest in two segments counts twice)."""
        return self._starts[-1] + len(self._vectors[-1]) if self._vectors else 0

    def _local_copy(self, path: StorePath) -> Path:
        if not is_remote(path):
            return Path(path)
        target = self.local / path.name
        size = path.stat().st_size
        if not target.exists() or target.stat().st_size != size:
            with atomic_path(target) as tmp, path.open("rb") as src, tmp.open("wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
        return target

    @property
    def dimension(self) -> int | None:
        """The vectors' dimension (None while the cache is empty)."""
        self._load()
        return self._dimension

    def _check_dimension(self, dimension: int) -> None:
        if self._dimension is None:
            self._dimension = int(dimension)
        elif dimension != self._dimension:
            raise StorageError(
                f"{self.directory}: vectors of dimension {dimension} and {self._dimension} "
                "in one cache (different models under one key?)"
            )

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, key: str | bytes) -> bool:
        digest = key if isinstance(key, bytes) else as_digests([key])[0]
        return bool(self.lookup(np.array([digest], DIGEST))[0] >= 0)

    def lookup(self, digests: np.ndarray) -> np.ndarray:
        """The row of each digest in the cache, -1 where it has none."""
        return self._load().lookup(digests)

    def missing(self, keys: Sequence[str] | np.ndarray) -> list[int]:
        """Positions in ``keys`` (digests or ``text_hash`` strings) that the cache does not hold."""
        return np.flatnonzero(self.lookup(as_digests(keys)) < 0).tolist()

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of cache rows (from :meth:`lookup`), in order, as a new array."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.dimension or 0), np.float32)
        if not len(rows):
            return out
        if rows.min() < 0:
            raise KeyError("a text the embedding cache does not hold")
        segment = np.searchsorted(np.asarray(self._starts), rows, side="right") - 1
        for s in np.unique(segment).tolist():
            at = np.flatnonzero(segment == s)
            out[at] = self._vectors[s][rows[at] - self._starts[s]]
        return out

    def get(self, keys: Sequence[str] | np.ndarray) -> np.ndarray:
        """Vectors of ``keys`` (digests or ``text_hash`` strings) in order; one the cache lacks: KeyError."""
        return self.gather(self.lookup(as_digests(keys)))

    # --- writing ------------------------------------------------------------------------------
    def add(self, keys: Sequence[str] | np.ndarray, vectors: np.ndarray) -> StorePath | None:
        """Write the vectors of keys the cache lacks as one new segment (atomically); its path, or None."""
        index = self._load()
        digests = as_digests(keys)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(digests):
            raise ValueError(f"{len(digests)} keys but vectors of shape {vectors.shape}")
        if len(digests):
            self._check_dimension(vectors.shape[1])
        _, first = np.unique(digests, return_index=True)
        new = np.sort(first[index.lookup(digests[first]) < 0])
        if not len(new):
            return None
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.vec"
        path = write_segment(self.local / name, digests[new], vectors[new])
        target = self._publish(path)
        self._map(path, digests[new])
        return target

    def _publish(self, local: Path) -> StorePath:
        """On S3, upload a segment written to the local mirror (one PUT); locally it is already in place."""
        if not is_remote(self.directory):
            return local
        target = self.directory / local.name
        atomic_write_bytes(target, local.read_bytes())
        return target

    def _map(self, local: Path, digests: np.ndarray) -> None:
        _, vectors = open_segment(local)
        start = self.rows
        self._starts.append(start)
        self._vectors.append(vectors)
        assert self._index is not None
        self._index.insert(digests, start + np.arange(len(digests)))

    def _migrate_parquet(self) -> None:
        """Turn each Parquet shard of earlier versions into a ``legacy-<shard>.vec`` segment, once."""
        if not self.directory.exists():
            return
        for shard in sorted(self.directory.glob("*.parquet"), key=str):
            name = f"legacy-{shard.stem}.vec"
            if (self.directory / name).exists():
                continue
            rows = _migrate_shard(shard, self.local / name)
            if rows is not None:
                self._publish(self.local / name)
                log.info(
                    "embedding cache: migrated %s (%d vectors) to %s; the Parquet file is no longer read",
                    shard,
                    rows,
                    name,
                )


def _migrate_shard(shard: StorePath, target: Path) -> int | None:
    source, filesystem = parquet_source(shard)
    try:
        parquet = pq.ParquetFile(source, filesystem=filesystem)
        rows = parquet.metadata.num_rows
        dimension = None
        for batch in parquet.iter_batches(batch_size=BLOCK, columns=["vector"]):
            if len(batch):
                dimension = len(batch.column(0)[0])
                break
        if dimension is None:
            return None
        writer = SegmentWriter(target, dimension, rows)
        try:
            for batch in parquet.iter_batches(batch_size=BLOCK):
                hashes = batch.column(0).to_pylist()
                vectors = batch.column(1).flatten().to_numpy(zero_copy_only=False).astype(np.float32)
                if len(vectors) != len(hashes) * dimension:
                    raise StorageError(f"{shard}: vectors of different lengths in embedding cache")
                writer.append(as_digests(hashes), vectors.reshape(len(hashes), dimension))
            writer.close()
        except BaseException:
            writer.discard()
            raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        log.warning("embedding cache: %s: old shard not migrated (%s); its texts are embedded again", shard, exc)
        return None
    return rows


# --- encoding through the cache ------------------------------------------------------------------
def encode_block(
    texts: Sequence[str],
    embedder: TextEncoder,
    cache: EmbeddingCache,
    chunk_size: int = ENCODE_CHUNK,
    digests: np.ndarray | None = None,
) -> np.ndarray:
    """Vectors of ``texts`` in order; each distinct text the cache lacks is embedded once (in calls of
    ``chunk_size``, reported to the ``embed`` progress stage) and appended to the cache as one segment.
    ``digests``: the texts' :func:`text_digests`, where the caller has them already."""
    digests = text_digests(texts) if digests is None else digests
    uniq, first, inverse = np.unique(digests, return_index=True, return_inverse=True)
    rows = cache.lookup(uniq)
    todo = np.flatnonzero(rows < 0)
    if len(todo):
        todo = todo[np.argsort(first[todo], kind="stable")]  # embedded in order of first occurrence
        progress.add_total("embed", len(todo))
        blocks = []
        for start in range(0, len(todo), chunk_size):
            batch = [texts[i] for i in first[todo[start : start + chunk_size]].tolist()]
            vectors = np.asarray(embedder.encode(batch), dtype=np.float32)
            if vectors.ndim != 2 or len(vectors) != len(batch):
                raise RuntimeError(f"embedder returned shape {vectors.shape} for {len(batch)} texts")
            blocks.append(vectors)
            progress.advance("embed", len(batch))
        cache.add(uniq[todo], np.concatenate(blocks))
        rows = cache.lookup(uniq)
    return cache.gather(rows[inverse.reshape(-1)])


def encoded_blocks(
    texts: Iterable[str], embedder: TextEncoder, cache: EmbeddingCache, chunk_size: int = ENCODE_CHUNK
) -> Iterator[np.ndarray]:
    """:func:`encode_block` over ``texts`` in blocks of :data:`BLOCK` texts."""
    texts = iter(texts)
    while block := list(islice(texts, BLOCK)):
        yield encode_block(block, embedder, cache, chunk_size)


def encode_cached(
    texts: Sequence[str], embedder: TextEncoder, cache: EmbeddingCache, chunk_size: int = ENCODE_CHUNK
) -> np.ndarray:
    """Vectors of ``texts`` in input order, in memory, embedding each distinct uncached text once.

    A second call with the same texts embeds nothing. For many texts, :func:`encode_to_file`.
    """
    blocks = list(encoded_blocks(texts, embedder, cache, chunk_size))
    return np.concatenate(blocks) if blocks else np.zeros((0, cache.dimension or 0), np.float32)


def encode_to_file(
    texts: Iterable[str], embedder: TextEncoder, cache: EmbeddingCache, path: Path, chunk_size: int = ENCODE_CHUNK
) -> np.ndarray:
    """Vectors of ``texts`` in order, written block by block to the ``.npy`` file ``path`` (local) and
    returned memory-mapped read-only (an empty in-memory array when there are no texts)."""
    writer = MatrixWriter(path)
    try:
        for block in encoded_blocks(texts, embedder, cache, chunk_size):
            writer.append(block)
        return writer.close(cache.dimension or 0)
    except BaseException:
        writer.discard()
        raise
