"""Memory maps that keep the clean's big files in the page cache, not in the process: the vector matrices, the
corpus texts and the bf16 search copy are read through shared file maps, and their pages are handed back.

* :func:`map_file`, :func:`load_matrix`, :func:`scratch_map` open maps and register them;
  :func:`release_mapped_pages` drops every registered map's resident pages (``MADV_DONTNEED``: the data stays
  in the page cache, the next read maps it again), :func:`drop_pages` a range of one.
* A random gather through a map faults in far more than it reads: the kernel maps the cached pages around
  each fault (fault-around, 64 KiB), so 5 % of a matrix's rows picked at random made 90 % of the file
  resident. :func:`take_rows` and :func:`take_texts` read such gathers with ``pread`` instead, into memory of
  the gather's size, for a matrix memory-mapped from a file and a text column opened by
  ``storage.vector_files.open_texts``; anything else is indexed as usual.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import weakref
from pathlib import Path

import numpy as np
import pyarrow as pa

#: every live mapping opened here: :func:`release_mapped_pages` drops their resident pages
_MAPPINGS: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()
#: a mapped text column's data buffer address -> (its mapping, its file), for :func:`take_texts`
_TEXT_FILES: dict[int, tuple[weakref.ref, Path]] = {}


def register(mapping: mmap.mmap) -> mmap.mmap:
    _MAPPINGS.add(mapping)
    return mapping


def map_file(path: Path, writable: bool = False) -> mmap.mmap:
    """``path`` memory-mapped (shared: reads come from, and writes go to, the page cache), registered."""
    with open(path, "r+b" if writable else "rb") as fh:
        return register(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ))


def load_matrix(path: Path) -> np.ndarray:
    """A ``.npy`` matrix memory-mapped read-only, registered."""
    matrix = np.load(path, mmap_mode="r")
    register(matrix._mmap)
    return matrix


def text_data(path: Path) -> pa.Buffer:
    """The UTF-8 data file of a text column as an Arrow buffer over its registered map; :func:`take_texts`
    reads gathers from it with ``pread``."""
    mapping = map_file(path)
    buffer = pa.py_buffer(mapping)
    _TEXT_FILES[buffer.address] = (weakref.ref(mapping), path)
    return buffer


def scratch_map(folder: Path, size: int) -> mmap.mmap:
    """``size`` writable bytes mapped from an unlinked temp file in ``folder`` (registered): memory in the page
    cache rather than the process's own, gone with the mapping, nothing left on disk after a crash."""
    with tempfile.TemporaryFile(dir=folder) as fh:
        fh.truncate(max(size, 1))
        return register(mmap.mmap(fh.fileno(), max(size, 1), access=mmap.ACCESS_WRITE))


def drop_pages(mapping: mmap.mmap, start: int, stop: int) -> None:
    """Drop the resident pages of bytes ``start .. stop`` of ``mapping`` (whole pages inside or touching it)."""
    first = start // mmap.PAGESIZE * mmap.PAGESIZE
    stop = min(len(mapping), -(-stop // mmap.PAGESIZE) * mmap.PAGESIZE)
    if stop > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, stop - first)


def release_mapped_pages() -> None:
    """Drop the resident pages of every live registered map from the process (``MADV_DONTNEED``).

    The data stays in the page cache (nothing is written or lost: the maps are shared file maps), and the next
    read maps it back. A pass over memory-mapped vectors and texts calls this between its blocks, so its
    resident set is what one block touches, not every page it has read since the files were opened."""
    for mapping in list(_MAPPINGS):
        if not mapping.closed:
            mapping.madvise(mmap.MADV_DONTNEED)


def _memmap_of(array: np.ndarray) -> np.memmap | None:
    """The memmap that owns the file map under ``array`` (a view's ``offset`` is its parent's, so the owner's
    is the one that places row 0), else None."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array if isinstance(array, np.memmap) and array.filename else None


def mapped_folder(array: np.ndarray) -> Path | None:
    """The folder of the file ``array`` is memory-mapped from (through any views of it), else None."""
    found = _memmap_of(array)
    return Path(found.filename).parent if found is not None else None


def _pread_spans(path: Path, starts: np.ndarray, ends: np.ndarray) -> bytearray:
    """The bytes ``starts[i] .. ends[i]`` of ``path``, concatenated in that order; a span that continues the one
    before it in the file is read with it."""
    out = bytearray(int((ends - starts).sum()))
    if not len(starts):
        return out
    view, at = memoryview(out), 0
    breaks = np.flatnonzero(starts[1:] != ends[:-1]) + 1  # where a span does not continue the one before
    firsts, lasts = np.concatenate([[0], breaks]), np.concatenate([breaks, [len(starts)]]) - 1
    with open(path, "rb", buffering=0) as fh:
        fd = fh.fileno()
        for begin, end in zip(starts[firsts].tolist(), ends[lasts].tolist(), strict=True):
            if end > begin and os.preadv(fd, [view[at : at + end - begin]], begin) != end - begin:
                raise OSError(f"{path}: short read at byte {begin}")
            at += end - begin
    return out


def take_rows(matrix: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``matrix[ids]`` (ids of any shape); for a C-contiguous matrix memory-mapped from a file, read with
    ``pread`` (module doc)."""
    ids = np.asarray(ids, dtype=np.int64)
    source = _memmap_of(matrix)
    if source is None or matrix.ndim != 2 or not matrix.flags.c_contiguous or not ids.size:
        return np.asarray(matrix[ids])
    if ids.min() < -len(matrix) or ids.max() >= len(matrix):
        raise IndexError(f"row ids out of range for {len(matrix)} rows")
    row = matrix.shape[1] * matrix.itemsize
    first = source.offset + matrix.__array_interface__["data"][0] - source.__array_interface__["data"][0]
    starts = first + (ids.reshape(-1) % len(matrix)) * row
    data = _pread_spans(Path(source.filename), starts, starts + row)
    return np.frombuffer(data, matrix.dtype).reshape(*ids.shape, matrix.shape[1])


def _text_file(texts: pa.Array | pa.ChunkedArray) -> Path | None:
    """The file of a text column opened by ``open_texts`` (its map still open), else None."""
    if not isinstance(texts, pa.Array) or texts.type != pa.large_string() or texts.buffers()[2] is None:
        return None
    found = _TEXT_FILES.get(texts.buffers()[2].address)
    mapping = found[0]() if found is not None else None
    return found[1] if mapping is not None and not mapping.closed else None


def take_texts(texts: pa.Array | pa.ChunkedArray, ids: np.ndarray) -> pa.Array:
    """``texts.take(ids)`` as a ``large_string`` array; for a column opened by ``open_texts``, read with
    ``pread`` (module doc)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    path = _text_file(texts)
    if path is None:
        taken = texts.take(pa.array(ids, type=pa.int64()))
        return (taken.combine_chunks() if isinstance(taken, pa.ChunkedArray) else taken).cast(pa.large_string())
    if len(ids) and (ids.min() < 0 or ids.max() >= len(texts)):
        raise IndexError(f"text ids out of range 0..{len(texts) - 1}")
    offsets = np.frombuffer(texts.buffers()[1], np.int64, len(texts) + 1, texts.offset * 8)
    starts, ends = offsets[ids], offsets[ids + 1]
    data = _pread_spans(path, starts, ends)
    out = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(ends - starts, out=out[1:])
    return pa.Array.from_buffers(pa.large_string(), len(ids), [None, pa.py_buffer(out), pa.py_buffer(data)])
