"""The faiss back end: ``IndexFlatIP`` (exact), ``IndexIVFFlat`` and ``IndexHNSWFlat`` (approximate), inner product.

With GPUs visible to faiss (the image's faiss-gpu), flat and IVF indexes are moved to all of them; HNSW stays
on the CPU.
"""

from __future__ import annotations

import faiss
import numpy as np

from ground.settings import CleanSettings


def num_gpus() -> int:
    """GPUs faiss sees (0 with faiss-cpu, which has no ``get_num_gpus``)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def faiss_index(vectors: np.ndarray, cfg: CleanSettings, hnsw_ef_search: int) -> faiss.Index:
    """A faiss index of kind ``cfg.index`` over ``vectors`` (float32 C-contiguous rows).

    * ``flat``: ``IndexFlatIP``, exact.
    * ``ivf``: ``IndexIVFFlat``, trained on the corpus; ``nlist`` is capped so that each list gets at least 39
      training points (faiss's minimum), ``nprobe = cfg.ivf_nprobe``.
    * ``hnsw``: ``IndexHNSWFlat``, ``M = cfg.hnsw_m``, ``efSearch`` at least ``hnsw_ef_search``.
    """
    n, dim = vectors.shape
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
