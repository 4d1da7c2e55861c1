"""Vector and text files that are read memory-mapped: cache segments, a run's vector matrices, a text column.

Three formats, each written under a temp name and renamed into place (``storage/atomic.py``), so a
killed writer leaves at most a temp file, never part of a file under the final name:

* **cache segment** (``*.vec``, :class:`SegmentWriter` / :func:`open_segment`): a 32-byte header
  (magic ``EFVEC001``, rows, dimension, reserved), the rows' 16-byte text digests, the float32 vectors
  (rows x dim), and the end mark ``EFVECEND``. A file whose size or marks disagree with its header (a torn
  copy, a truncated disk) is refused by :func:`open_segment` and never read as vectors.
* **vector matrix** (``*.npy``, :class:`MatrixWriter`): a NumPy ``.npy`` file of float32 rows x dim,
  appended block by block and opened with ``np.load(mmap_mode="r")``.
* **text column** (``<name>.offsets`` + ``<name>.utf8``, :class:`TextWriter` / :func:`open_texts`): the
  int64 offsets and UTF-8 bytes of an Arrow ``large_string`` array, opened zero-copy over memory maps.

The maps are registered with ``storage/mapped.py``, which hands their pages back between blocks and reads
random gathers from them with ``pread``. A clean run keeps these under :func:`work_dir` (``<clean
run>/ranking`` locally, a local temp folder on S3); :class:`TextSpool` sets texts aside for a second pass
(an Arrow IPC stream).

:class:`DigestIndex` maps 16-byte digests to ids with a sorted array and ``np.searchsorted``: 24 bytes
per entry, no Python object per key.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from storage.atomic import AtomicFiles, StorageError, write_errors
from storage.location import StorePath, is_remote
from storage.mapped import load_matrix, map_file, register, text_data

DIGEST = np.dtype("S16")
SEGMENT_MAGIC, SEGMENT_END = b"EFVEC001", b"EFVECEND"
_HEADER = struct.Struct("<8sQQQ")  # magic, rows, dimension, reserved
#: the .npy header is written last, into this many reserved bytes (NumPy pads v1 headers to 64)
_NPY_HEADER = 128
#: fault point (ground/faults.py) before a cache segment is renamed into place
SEGMENT_POINT = "embedding.segment"


def text_digests(texts: Sequence[str]) -> np.ndarray:
    """The 16-byte BLAKE2b digest of each text (``storage.corpus.text_hash`` as bytes), as an ``S16`` array."""
    return np.array([hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in texts], dtype=DIGEST)


class DigestIndex:
    """Digest -> id (int64), sorted for ``np.searchsorted``; a digest keeps the first id it was given."""

    def __init__(self, keys: np.ndarray | None = None, ids: np.ndarray | None = None):
        self.keys = np.zeros(0, DIGEST)
        self.ids = np.zeros(0, np.int64)
        if keys is not None and len(keys):
            uniq, first = np.unique(keys, return_index=True)  # sorted, the first occurrence of each
            self.keys, self.ids = uniq, np.asarray(ids, np.int64)[first]

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The id of each digest, -1 where absent."""
        if not len(self.keys):
            return np.full(len(keys), -1, np.int64)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[pos] == keys, self.ids[pos], -1)

    def insert(self, keys: np.ndarray, ids: np.ndarray) -> None:
        """Add digests the index lacks (the caller's job: distinct and absent), with their ids."""
        order = np.argsort(keys, kind="stable")
        keys, ids = keys[order], np.asarray(ids, np.int64)[order]
        pos = np.searchsorted(self.keys, keys)
        self.keys, self.ids = np.insert(self.keys, pos, keys), np.insert(self.ids, pos, ids)

    def assign(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(id of each digest, positions of the digests new here): new digests get the next ids in order
        of first occurrence, so a sequence assigned batch by batch numbers its distinct items as they come."""
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        found = self.lookup(uniq)
        new = np.flatnonzero(found < 0)
        new = new[np.argsort(first[new], kind="stable")]
        found[new] = len(self) + np.arange(len(new))
        self.insert(uniq[new], found[new])
        return found[inverse.reshape(-1)], np.sort(first[new])


# --- cache segments ------------------------------------------------------------------------------
class SegmentWriter:
    """Write one cache segment at ``path`` (local) block by block; :meth:`close` renames it into place."""

    def __init__(self, path: Path, dimension: int, rows: int):
        self.path, self.dimension, self.rows, self.written = path, dimension, rows, 0
        self._files = AtomicFiles(SEGMENT_POINT)
        self._tmp = self._files.temp_for(path)
        self._fh = self._tmp.open("wb")
        self._fh.write(_HEADER.pack(SEGMENT_MAGIC, rows, dimension, 0))
        self._vectors_at = _HEADER.size + 16 * rows

    def append(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        if self.written + len(keys) > self.rows:
            raise ValueError(f"{self.path}: more than the {self.rows} rows announced")
        self._fh.seek(_HEADER.size + 16 * self.written)
        self._fh.write(np.ascontiguousarray(keys, DIGEST).tobytes())
        self._fh.seek(self._vectors_at + 4 * self.dimension * self.written)
        self._fh.write(np.ascontiguousarray(vectors, np.float32).tobytes())
        self.written += len(keys)

    def close(self) -> Path:
        if self.written != self.rows:
            raise ValueError(f"{self.path}: {self.written} rows written, {self.rows} announced")
        self._fh.seek(self._vectors_at + 4 * self.dimension * self.rows)
        self._fh.write(SEGMENT_END)
        self._fh.close()
        self._files.commit()
        return self.path

    def discard(self) -> None:
        self._fh.close()
        self._files.discard()


def write_segment(path: Path, keys: np.ndarray, vectors: np.ndarray) -> Path:
    """One complete segment at ``path``, atomically; a full disk is one StorageError line naming it."""
    with write_errors(path):
        writer = SegmentWriter(path, int(vectors.shape[1]), len(keys))
        try:
            writer.append(keys, vectors)
            return writer.close()
        except BaseException:
            writer.discard()
            raise


def segment_size(rows: int, dimension: int) -> int:
    return _HEADER.size + rows * (16 + 4 * dimension) + len(SEGMENT_END)


def open_segment(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(digests, vectors) of a local segment, the vectors memory-mapped; StorageError if it is not whole."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise StorageError(f"{path}: torn embedding segment ({size} bytes, no header)")
        magic, rows, dimension, _ = _HEADER.unpack(head)
        if magic != SEGMENT_MAGIC:
            raise StorageError(f"{path}: not an embedding segment (magic {magic!r})")
        if size != segment_size(rows, dimension):
            raise StorageError(f"{path}: torn embedding segment ({size} bytes, header says {rows} x {dimension})")
        fh.seek(size - len(SEGMENT_END))
        if fh.read(len(SEGMENT_END)) != SEGMENT_END:
            raise StorageError(f"{path}: torn embedding segment (no end mark)")
    if rows == 0:
        return np.zeros(0, DIGEST), np.zeros((0, dimension), np.float32)
    keys = np.array(np.memmap(path, DIGEST, "r", offset=_HEADER.size, shape=(rows,)))
    vectors = np.memmap(path, np.float32, "r", offset=_HEADER.size + 16 * rows, shape=(rows, dimension))
    register(vectors._mmap)
    return keys, vectors


# --- a run's vector matrices ---------------------------------------------------------------------
def _npy_header(rows: int, dimension: int) -> bytes:
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dimension}), }}"
    body = text.encode("latin1").ljust(_NPY_HEADER - 10 - 1) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body


class MatrixWriter:
    """Append float32 row blocks to a ``.npy`` file; :meth:`close` writes the header, renames the file
    into place and returns it memory-mapped (read-only)."""

    def __init__(self, path: Path):
        self.path, self.rows, self.dimension = path, 0, None
        self._files = AtomicFiles()
        self._fh = self._files.temp_for(path).open("wb")
        self._fh.write(b"\0" * _NPY_HEADER)

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, np.float32)
        if self.dimension is None:
            self.dimension = int(block.shape[1])
        elif block.shape[1] != self.dimension:
            raise ValueError(f"{self.path}: rows of dimension {block.shape[1]} after {self.dimension}")
        with write_errors(self.path):
            self._fh.write(block.tobytes())
        self.rows += len(block)

    def close(self, dimension: int = 0) -> np.ndarray:
        """The matrix, memory-mapped; with no rows, an empty in-memory (0, dimension) array."""
        dimension = self.dimension if self.dimension is not None else dimension
        with write_errors(self.path):
            self._fh.seek(0)
            self._fh.write(_npy_header(self.rows, dimension))
            self._fh.close()
            self._files.commit()
        if self.rows == 0:
            return np.zeros((0, dimension), np.float32)
        return load_matrix(self.path)

    def discard(self) -> None:
        self._fh.close()
        self._files.discard()


# --- text columns --------------------------------------------------------------------------------
class TextWriter:
    """Append texts to ``<stem>.offsets`` / ``<stem>.utf8`` (an Arrow large_string's buffers)."""

    def __init__(self, stem: Path):
        self.stem, self.count, self._bytes = stem, 0, 0
        self._files = AtomicFiles()
        self._offsets = self._files.temp_for(stem.with_suffix(".offsets")).open("wb")
        self._data = self._files.temp_for(stem.with_suffix(".utf8")).open("wb")
        self._offsets.write(np.zeros(1, np.int64).tobytes())

    def append(self, texts: Sequence[str] | pa.Array) -> None:
        array = pa.array(texts, pa.large_string()) if not isinstance(texts, pa.Array) else texts
        array = array.cast(pa.large_string())
        if array.null_count:
            raise ValueError("a text column holds no nulls")
        if not len(array):
            return
        _, offsets_buf, data_buf = array.buffers()
        offsets = np.frombuffer(offsets_buf, np.int64, len(array) + 1, array.offset * 8)
        start, end = int(offsets[0]), int(offsets[-1])
        with write_errors(self.stem):
            self._data.write(memoryview(data_buf)[start:end])
            self._offsets.write((offsets[1:] - start + self._bytes).tobytes())
        self._bytes += end - start
        self.count += len(array)

    def close(self) -> pa.Array:
        with write_errors(self.stem):
            self._offsets.close()
            self._data.close()
            self._files.commit()
        return open_texts(self.stem)

    def discard(self) -> None:
        self._offsets.close()
        self._data.close()
        self._files.discard()


def open_texts(stem: Path) -> pa.Array:
    """The text column at ``stem`` as a large_string Array over memory maps (zero-copy)."""
    offsets_path, data_path = stem.with_suffix(".offsets"), stem.with_suffix(".utf8")
    offsets = pa.py_buffer(map_file(offsets_path))
    count = offsets.size // 8 - 1
    data_size = os.path.getsize(data_path)
    ends = np.frombuffer(offsets, np.int64)
    if count < 0 or offsets.size % 8 or int(ends[-1]) != data_size:
        raise StorageError(f"{stem}: text column whose offsets and data disagree")
    data = text_data(data_path) if data_size else pa.py_buffer(b"")
    return pa.Array.from_buffers(pa.large_string(), count, [None, offsets, data])


# --- a clean run's working folder ----------------------------------------------------------------
def work_dir(root: StorePath, name: str) -> Path:
    """A local working folder ``<root>/<name>`` of a clean run; on S3 a local temp folder of this process
    (memory maps need local files)."""
    if is_remote(root):
        key = root.path.replace("/", "_")
        return Path(tempfile.gettempdir()) / f"embed-factory-work-{os.getuid()}" / f"{key}-{os.getpid()}" / name
    return Path(root) / name


class TextSpool:
    """Texts set aside in an Arrow IPC stream file and read back later in the same batches (then deleted)."""

    _SCHEMA = pa.schema([("text", pa.large_string())])

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self._SCHEMA)

    def append(self, texts: pa.Array) -> None:
        if len(texts):
            self._writer.write_batch(pa.record_batch([texts.cast(pa.large_string())], schema=self._SCHEMA))

    def batches(self) -> Iterator[pa.Array]:
        self.close()
        try:
            with pa.memory_map(str(self.path)) as source:
                for batch in pa.ipc.open_stream(source):
                    yield batch.column(0)
        finally:
            self.path.unlink(missing_ok=True)

    def close(self) -> None:
        if not self._sink.closed:
            self._writer.close()
            self._sink.close()
