"""The exact search split by query block: each block against the whole corpus on a worker, merged in query order.

The quadratic stage of cleaning (every query against every corpus item) parallelises over queries: a block of
queries needs the whole corpus but no other query. :func:`iter_split` cuts the queries into
``cfg.search_blocks`` blocks, searches each on a worker and yields ``(start, scores, ids)`` per block in
query order; :func:`search_split` collects them into the ``(scores, ids)`` arrays of one search (faiss's
order, as ``index.search`` returns them; :func:`~tasks.cleaning.search.build.search` returns ``(ids, scores)``).

Workers. With ``runner=None`` the blocks run one after another in this process. With a Prefect task runner
(the clean flow's ``stage_runner``: the flow's thread pool or a Dask cluster) each block is one run of the
task :data:`search_query_block`. Each worker builds its own index of the corpus with
:func:`~tasks.cleaning.search.build.build_index` (same ``cfg`` and forced ``backend``) on its own device: a
process that sees several CUDA devices puts block ``b`` on ``cuda:{b mod devices}``; a Dask worker of a GPU
cluster (one device visible) on its one GPU; without CUDA, or with ``cfg.search_device = "cpu"``, on the
CPU. Vectors reach a thread pool by reference; other runners get ``.npy`` paths that each worker memory-maps
(``np.load(mmap_mode="r")``) and slices its block's queries from, so no n × d copy is pickled per block.
Arrays are written once to a temporary folder (``scratch``: on a filesystem every worker sees) and removed
afterwards; paths given as inputs are used as they are.

Same results as one search. Block boundaries are multiples of
:data:`~tasks.cleaning.search.constants.SEARCH_BATCH`, the batch of the single-process search, so a block
makes exactly the ``index.search`` calls that search makes for its rows: the same arithmetic on the same
shapes, hence the same ids, scores and tie order (ties by id) for every back end. Each row's top k is
computed against the whole corpus, so merging is placing the blocks at their rows.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from prefect import task
from prefect.cache_policies import NONE as NO_CACHE
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from ground.settings import CleanSettings
from tasks.cleaning.search.build import Backend, as_matrix, build_index, search
from tasks.cleaning.search.constants import MISSING_SCORE, SEARCH_BATCH
from tasks.cleaning.search.torch_device import cuda_available, cuda_device_count

log = logging.getLogger(__name__)

#: vectors as an array (in this process) or the path of a 2-d float32 ``.npy`` file (memory-mapped by workers)
Vectors = np.ndarray | str | os.PathLike


class BlockResult(NamedTuple):
    """One query block's top k: rows ``start .. start + len(scores)`` of the whole search."""

    start: int
    scores: np.ndarray  # (rows, k) float32, best first; MISSING_SCORE past the corpus
    ids: np.ndarray  # (rows, k) int64 corpus ids; -1 past the corpus


def query_blocks(n: int, blocks: int, align: int = SEARCH_BATCH) -> list[tuple[int, int]]:
    """``(start, stop)`` of at most ``blocks`` blocks covering ``range(n)``; every boundary a multiple of ``align``.

    The blocks are as even as the alignment allows (all but the last the same size), so fewer than ``blocks``
    come out when ``n`` is small: 20,000 queries in 2 blocks of 8192-aligned rows are 16,384 + 3,616.
    """
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    size = max(align, math.ceil(math.ceil(n / blocks) / align) * align)
    return [(start, min(n, start + size)) for start in range(0, n, size)]


def block_device(block: int, cfg: CleanSettings) -> str:
    """The torch device for block number ``block``: its own CUDA device where several are visible, else CPU."""
    if cfg.search_device == "cpu" or not cuda_available():
        return "cpu"
    return f"cuda:{block % cuda_device_count()}"


def _open(vectors: Vectors) -> np.ndarray:
    if isinstance(vectors, np.ndarray):
        return vectors
    return np.load(vectors, mmap_mode="r")


def _search_query_block(
    corpus: Vectors,
    queries: Vectors,
    start: int,
    stop: int,
    k: int,
    cfg: CleanSettings,
    backend: Backend = "auto",
    block: int = 0,
) -> BlockResult:
    """Search queries ``start:stop`` against the whole corpus on this worker's device: the block's top ``k``."""
    with warnings.catch_warnings():  # torch tensors over a read-only memory map: the index never writes to them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        index = build_index(as_matrix(_open(corpus)), cfg, backend, device=block_device(block, cfg))
    ids, scores = search(index, as_matrix(_open(queries)[start:stop]), k)
    return BlockResult(start, scores, ids)


#: the Prefect task a runner runs per block (task runs named by their rows)
search_query_block = task(
    _search_query_block,
    name="search-query-block",
    task_run_name="search-queries-{start}-{stop}",
    cache_policy=NO_CACHE,
)


@contextlib.contextmanager
def _shared(arrays: dict[str, Vectors], by_reference: bool, scratch: Path | None) -> Iterator[dict[str, Vectors]]:
    """``arrays`` as workers receive them: as they are (threads, paths), or written once to ``.npy`` files."""
    if by_reference or all(not isinstance(a, np.ndarray) for a in arrays.values()):
        yield arrays
        return
    if scratch is not None:
        Path(scratch).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="split-search-", dir=scratch) as folder:
        out: dict[str, Vectors] = {}
        for name, array in arrays.items():
            if isinstance(array, np.ndarray):
                path = Path(folder) / f"{name}.npy"
                np.save(path, as_matrix(array))
                array = str(path)
            out[name] = array
        yield out


def _rows(vectors: Vectors) -> int:
    return len(vectors) if isinstance(vectors, np.ndarray) else len(_open(vectors))


def iter_split(
    corpus_vecs: Vectors,
    query_vecs: Vectors,
    k: int,
    cfg: CleanSettings,
    blocks: int | None = None,
    runner: TaskRunner | None = None,
    backend: Backend = "auto",
    scratch: Path | None = None,
) -> Iterator[BlockResult]:
    """Per query block, in query order, its :class:`BlockResult` (top ``k`` against the whole corpus).

    ``blocks``: how many (default ``cfg.search_blocks``; fewer for few queries, see :func:`query_blocks`).
    ``runner``: a started Prefect task runner, one :data:`search_query_block` run per block, all submitted
    at once; None: the blocks one after another in this process. ``backend``: as for
    :func:`~tasks.cleaning.search.build.build_index` (tests force one). A block is yielded as soon as it and
    the blocks before it are done, so a consumer works on block 0 while later ones are searched.
    """
    n = _rows(query_vecs)
    spans = query_blocks(n, cfg.search_blocks if blocks is None else blocks)
    by_reference = runner is None or isinstance(runner, ThreadPoolTaskRunner)
    with _shared({"corpus": corpus_vecs, "queries": query_vecs}, by_reference, scratch) as shared:
        common = {"k": k, "cfg": cfg, "backend": backend, **shared}
        if runner is None:
            results = (_search_query_block(start=a, stop=z, block=b, **common) for b, (a, z) in enumerate(spans))
        else:
            futures = [
                runner.submit(search_query_block, {"start": a, "stop": z, "block": b, **common})
                for b, (a, z) in enumerate(spans)
            ]
            results = (future.result() for future in futures)
        for b, result in enumerate(results):
            log.info("exact search: query block %d/%d (rows %d-%d) done", b + 1, len(spans), *spans[b])
            yield result


def merge_blocks(parts: Iterable[BlockResult], n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)`` of ``n`` queries from blocks in any order; they must cover every row exactly once."""
    scores = np.full((n, k), MISSING_SCORE, dtype=np.float32)
    ids = np.full((n, k), -1, dtype=np.int64)
    covered = np.zeros(n, dtype=np.int8)
    for start, block_scores, block_ids in parts:
        rows = len(block_ids)
        if block_scores.shape != block_ids.shape or block_ids.shape[1:] != (k,):
            raise ValueError(f"block at row {start}: expected ({rows}, {k}) scores and ids")
        if start < 0 or start + rows > n:
            raise ValueError(f"block rows {start}..{start + rows} outside the {n} queries")
        scores[start : start + rows] = block_scores
        ids[start : start + rows] = block_ids
        covered[start : start + rows] += 1
    if n and (covered != 1).any():
        row = int(np.flatnonzero(covered != 1)[0])
        raise ValueError(f"query row {row} is in {int(covered[row])} blocks, not one")
    return scores, ids


def search_split(
    corpus_vecs: Vectors,
    query_vecs: Vectors,
    k: int,
    cfg: CleanSettings,
    blocks: int | None = None,
    runner: TaskRunner | None = None,
    backend: Backend = "auto",
    scratch: Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)`` of the whole search, as :func:`iter_split` computes them block by block.

    ``k`` is capped at the corpus size (as :func:`~tasks.cleaning.search.build.search` caps it).
    """
    width = max(0, min(int(k), _rows(corpus_vecs)))
    parts = iter_split(corpus_vecs, query_vecs, width, cfg, blocks, runner, backend, scratch)
    return merge_blocks(parts, _rows(query_vecs), width)


class SplitCursor:
    """The split search's blocks, read back as consecutive row ranges of any size (the rank filter's blocks):
    ``take(start, stop)`` returns ``(scores, ids)`` of those queries; ranges must come in row order. Holds at
    most the split blocks that the range spans."""

    def __init__(self, parts: Iterable[BlockResult]):
        self._parts = iter(parts)
        self._held: list[BlockResult] = []

    def take(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        if stop <= start:
            raise ValueError(f"empty query range {start}..{stop}")
        self._held = [p for p in self._held if p.start + len(p.ids) > start]  # blocks before the range go
        while not self._held or self._held[-1].start + len(self._held[-1].ids) < stop:
            part = next(self._parts, None)
            if part is None:
                raise ValueError(f"the split search ended before query row {stop}")
            self._held.append(part)
        if self._held[0].start > start:
            raise ValueError(f"query rows {start}..{stop} asked for out of order")
        pieces = [(p, max(start - p.start, 0), min(stop - p.start, len(p.ids))) for p in self._held]
        pieces = [(p, a, z) for p, a, z in pieces if a < z]
        scores = np.concatenate([p.scores[a:z] for p, a, z in pieces]) if pieces else np.zeros((0, 0), np.float32)
        ids = np.concatenate([p.ids[a:z] for p, a, z in pieces]) if pieces else np.zeros((0, 0), np.int64)
        return scores, ids
