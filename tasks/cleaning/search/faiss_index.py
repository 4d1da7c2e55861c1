"""The faiss back end: ``IndexFlatIP`` (exact), ``IndexIVFFlat`` and ``IndexHNSWFlat`` (approximate), inner product.

With GPUs visible to faiss (the image's faiss-gpu), flat and IVF indexes are moved to all of them; HNSW stays
on the CPU.
"""

from __future__ import annotations

import faiss
import numpy as np

from ground.settings import CleanSettings
from storage.mapped import take_rows


def num_gpus() -> int:
    """GPUs faiss sees (0 with faiss-cpu, which has no ``get_num_gpus``)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


class FlatIP:
    """Exact inner-product search over ``vectors`` held by reference, so a memory-mapped corpus stays in the page
    cache: faiss's ``IndexFlatIP`` search (``faiss.knn``: the same kernel, results and padding: id -1, score
    -FLT_MAX) without the copy of the corpus ``IndexFlatIP.add`` makes."""

    metric_type = faiss.METRIC_INNER_PRODUCT
    is_trained = True

    def __init__(self, vectors: np.ndarray):
        self._x = vectors
        self.ntotal, self.d = (int(v) for v in vectors.shape)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return faiss.knn(np.ascontiguousarray(queries, np.float32), self._x, int(k), metric=self.metric_type)

    def reconstruct(self, i: int) -> np.ndarray:
        return np.array(self._x[int(i)])

    def reconstruct_batch(self, ids: np.ndarray) -> np.ndarray:
        return take_rows(self._x, ids)

    def reconstruct_n(self, start: int, n: int) -> np.ndarray:
        return np.array(self._x[int(start) : int(start) + int(n)])


def faiss_index(vectors: np.ndarray, cfg: CleanSettings, hnsw_ef_search: int) -> faiss.Index | FlatIP:
    """A faiss index of kind ``cfg.index`` over ``vectors`` (float32 C-contiguous rows).

    * ``flat``: exact: :class:`FlatIP` (the vectors by reference) on the CPU, ``IndexFlatIP`` on GPUs.
    * ``ivf``: ``IndexIVFFlat``, trained on the corpus; ``nlist`` is capped so that each list gets at least 39
      training points (faiss's minimum), ``nprobe = cfg.ivf_nprobe``.
    * ``hnsw``: ``IndexHNSWFlat``, ``M = cfg.hnsw_m``, ``efSearch`` at least ``hnsw_ef_search``.
    """
    n, dim = vectors.shape
    if cfg.index == "flat" and num_gpus() == 0:
        return FlatIP(vectors)
    if cfg.index == "flat":
        index: faiss.Index = faiss.IndexFlatIP(dim)
        index.add(vectors)
    elif cfg.index == "ivf":
        nlist = max(1, min(cfg.ivf_nlist, n // 39))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)  # keeps a ref
        index.train(vectors)
        index.add(vectors)
        index.nprobe = min(cfg.ivf_nprobe, nlist)
        index.make_direct_map()  # so vectors can be reconstructed by id
    elif cfg.index == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = max(40, 2 * cfg.hnsw_m)
        index.hnsw.efSearch = max(64, hnsw_ef_search)
        index.add(vectors)
    else:  # pragma: no cover - settings validate the choice
        raise ValueError(f"unknown index type {cfg.index!r}")
    if cfg.index != "hnsw" and num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    return index
