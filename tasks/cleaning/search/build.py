"""``build_index``: the one place that picks a search back end, and ``search``, the batched top-N over any of them."""

from __future__ import annotations

from typing import Literal

import faiss
import numpy as np

from ground.compute import bf16_supported
from ground.settings import CleanSettings
from tasks.cleaning.search.bf16 import Bf16ExactIndex
from tasks.cleaning.search.constants import SEARCH_BATCH
from tasks.cleaning.search.faiss_index import FlatIP, faiss_index, num_gpus
from tasks.cleaning.search.torch_device import TorchExactIndex, cuda_available

#: what :func:`build_index` returns: a faiss index or one of our exact indexes (the same ``search`` / ``ntotal`` /
#: ``reconstruct`` surface)
Index = faiss.Index | FlatIP | Bf16ExactIndex | TorchExactIndex

#: exact back ends :func:`build_index` can be told to use (``auto``: chosen by the hardware, as in production)
Backend = Literal["auto", "faiss", "bf16", "torch"]


def as_matrix(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` as a C-contiguous float32 2-d array; anything else is a ValueError."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-d array of vectors, got shape {vectors.shape}")
    return vectors


def result_width(cfg: CleanSettings) -> int:
    """How many results per query one search must return for both the filter and mining."""
    return max(cfg.rank_top_k, cfg.negative_rank_max)


def build_index(vectors: np.ndarray, cfg: CleanSettings, backend: Backend = "auto", device: str | None = None) -> Index:
    """An inner-product index over ``vectors`` (L2-normalised rows), as ``cfg.index`` asks.

    * ``flat``: exact search, the default and KaLM's choice. With faiss-gpu: ``IndexFlatIP`` on all GPUs.
      With CUDA torch but no faiss-gpu: :class:`~tasks.cleaning.search.torch_device.TorchExactIndex` (fp32
      GEMMs on the GPU, same top-N and ties as the CPU path); ``cfg.search_device = "cpu"`` opts out.
      On a CPU with native bf16 (AVX512-BF16 or AMX) and no GPU visible to faiss:
      :class:`~tasks.cleaning.search.bf16.Bf16ExactIndex` (a bf16 screen with a proven error bound, then
      exact fp32 rescoring: the same top-N as ``IndexFlatIP``, ties by id, ~2-3× faster); otherwise
      :class:`~tasks.cleaning.search.faiss_index.FlatIP` (``IndexFlatIP``'s search, the vectors by reference).
    * ``ivf`` / ``hnsw``: approximate faiss indexes (:func:`~tasks.cleaning.search.faiss_index.faiss_index`).

    ``backend`` forces an exact back end whatever the hardware (``flat`` only): ``faiss`` (``IndexFlatIP``),
    ``bf16`` (emulated by torch on CPUs without native bf16: slower, same results), ``torch`` (fp32 GEMMs on
    CUDA when torch sees it, else on CPU tensors). Tests use it so that every branch runs on every machine.
    ``device`` names the torch device of the torch back end (``"cuda:1"``, ``"cpu"``; the split search gives
    each block its own); None: ``"cuda"`` when torch sees CUDA, else ``"cpu"``.
    """
    vectors = as_matrix(vectors)
    if backend != "auto":
        if cfg.index != "flat":
            raise ValueError(f"backend {backend!r} is an exact search; clean.index is {cfg.index!r}")
        if backend == "bf16":
            return Bf16ExactIndex(vectors)
        if backend == "torch":
            return TorchExactIndex(vectors, device or ("cuda" if cuda_available() else "cpu"))
        return faiss_index(vectors, cfg, 2 * result_width(cfg))
    if cfg.index == "flat" and num_gpus() == 0:
        if cfg.search_device != "cpu" and cuda_available():
            return TorchExactIndex(vectors, device or "cuda")  # CUDA torch without faiss-gpu: fp32 GEMMs on the GPU
        if cfg.search_device == "cuda":
            raise ValueError("clean.search_device = 'cuda' but torch sees no CUDA device")
        if bf16_supported():
            return Bf16ExactIndex(vectors)
    return faiss_index(vectors, cfg, 2 * result_width(cfg))


def search(index: Index, queries: np.ndarray, k: int, batch: int = SEARCH_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (ids int64, scores float32) per query, best first, searched ``batch`` queries at a time.

    ``k`` is capped at the index size; ids of missing results (approximate indexes) are -1.
    """
    queries = as_matrix(queries)
    k = max(0, min(int(k), int(index.ntotal)))
    n = len(queries)
    ids = np.empty((n, k), dtype=np.int64)
    scores = np.empty((n, k), dtype=np.float32)
    if k == 0 or n == 0:
        return ids, scores
    for start in range(0, n, batch):
        s, i = index.search(queries[start : start + batch], k)
        scores[start : start + batch] = s
        ids[start : start + batch] = i
    return ids, scores
