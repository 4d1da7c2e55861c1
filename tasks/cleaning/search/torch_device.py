"""Exact top-N inner-product search as fp32 matrix products on a torch device (the GPU worker's path).

:class:`TorchExactIndex` stands in for ``faiss.IndexFlatIP`` where CUDA torch is installed but faiss-gpu
is not: ``search(x, k) -> (D, I)``, ``ntotal``, ``d``, ``reconstruct``/``reconstruct_batch``. Its results
follow the semantics of the CPU exact search (:mod:`tasks.cleaning.search.bf16`): the k corpus items
with the largest fp32 inner product, best first, ties broken by corpus id (ascending); missing results
(``k > ntotal``) padded with id -1 and score ``-FLT_MAX`` as faiss pads them.

How. The corpus lives on the device in fp32. Per chunk of queries, corpus blocks are multiplied
(``q @ xᵀ``, TF32 switched off for the call so every product is a true fp32 dot product) and each
block's top ``k + TIE_SLACK`` is merged into the chunk's running best by (score descending, id ascending):
a stable sort by score over candidates already ordered by id. Blocks are visited in id order and the
slack keeps items that tie the k-th score, so the merge is exact unless more than ``TIE_SLACK`` items of
one block tie at the boundary (identical vectors; the filter's ranks do not depend on tie order).

The same code runs on CPU tensors (``device="cpu"``), which is how the tests check it against
``IndexFlatIP`` without a GPU. Memory on the device: the corpus (``4·M·d`` bytes: 1.7 GB at 1.1M × 384)
plus one ``query_chunk × corpus_block`` fp32 score block (1 GiB at the GPU defaults).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from tasks.cleaning.search.constants import BLOCK_SHAPE, MISSING_SCORE, TIE_SLACK


@contextlib.contextmanager
def _true_fp32(device: torch.device) -> Iterator[None]:
    """Switch TF32 off for CUDA matmuls in this block (Ampere+ would round inputs to 10-bit mantissas)."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def cuda_available() -> bool:
    """True when torch sees a CUDA device (the GPU worker); False on CPU builds and CPU machines."""
    return torch.cuda.is_available()


def cuda_device_count() -> int:
    """CUDA devices torch sees (0 without CUDA)."""
    return torch.cuda.device_count() if cuda_available() else 0


class TorchExactIndex:
    """Exact inner-product top-N over ``vectors`` (float32 rows) on ``device`` ("cuda", "cuda:1", "cpu")."""

    def __init__(
        self,
        vectors: np.ndarray,
        device: str = "cuda",
        *,
        query_chunk: int | None = None,
        corpus_block: int | None = None,
    ):
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise ValueError(f"expected a 2-d array of vectors, got shape {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise ValueError("the corpus holds non-finite vectors")
        self.device = torch.device(device)
        default_chunk, default_block = BLOCK_SHAPE.get(self.device.type, BLOCK_SHAPE["cpu"])
        self.query_chunk = query_chunk or default_chunk
        self.corpus_block = corpus_block or default_block
        self.ntotal, self.d = vectors.shape
        self._host = vectors  # by reference: reconstruct() reads the host copy
        self._x = torch.from_numpy(vectors).to(self.device)

    # --- faiss-compatible accessors --------------------------------------------------------------
    def reconstruct(self, i: int) -> np.ndarray:
        return self._host[int(i)].copy()

    def reconstruct_batch(self, ids: np.ndarray) -> np.ndarray:
        return self._host[np.asarray(ids, dtype=np.int64)]

    def reconstruct_n(self, start: int, n: int) -> np.ndarray:
        return self._host[start : start + n].copy()

    # --- search ---------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores float32 (n, k), ids int64 (n, k))``, best first, ties by id; padded past ``ntotal``."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.d:
            raise ValueError(f"queries must have shape (n, {self.d}), got {queries.shape}")
        n, k = len(queries), int(k)
        scores = np.full((n, k), MISSING_SCORE, dtype=np.float32)
        ids = np.full((n, k), -1, dtype=np.int64)
        width = min(k, self.ntotal)
        if n == 0 or width == 0:
            return scores, ids
        with torch.inference_mode(), _true_fp32(self.device):
            for start in range(0, n, self.query_chunk):
                q = torch.from_numpy(queries[start : start + self.query_chunk]).to(self.device)
                s, i = self._search_chunk(q, width)
                scores[start : start + len(q), :width] = s.cpu().numpy()
                ids[start : start + len(q), :width] = i.cpu().numpy()
        return scores, ids

    def _search_chunk(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        keep = min(k + TIE_SLACK, self.ntotal)
        best_s = torch.empty((len(q), 0), dtype=torch.float32, device=self.device)
        best_i = torch.empty((len(q), 0), dtype=torch.int64, device=self.device)
        for start in range(0, self.ntotal, self.corpus_block):
            block = q @ self._x[start : start + self.corpus_block].T
            s, i = torch.topk(block, min(keep, block.shape[1]), dim=1)
            # candidates in id order (the running best holds only smaller ids), then a stable sort by score
            cand_s, cand_i = torch.cat([best_s, s], dim=1), torch.cat([best_i, i + start], dim=1)
            by_id = torch.argsort(cand_i, dim=1, stable=True)
            cand_s, cand_i = cand_s.gather(1, by_id), cand_i.gather(1, by_id)
            by_score = torch.argsort(cand_s, dim=1, descending=True, stable=True)[:, :keep]
            best_s, best_i = cand_s.gather(1, by_score), cand_i.gather(1, by_score)
        return best_s[:, :k], best_i[:, :k]
