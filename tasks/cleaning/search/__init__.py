"""Exact (and approximate) top-N inner-product search for the cleaning stages, behind one :func:`build_index`.

Back ends, one module each, all with faiss's ``search(x, k) -> (D, I)`` / ``ntotal`` / ``reconstruct`` surface
and its padding (id -1, score :data:`~tasks.cleaning.search.constants.MISSING_SCORE`):

* ``faiss_index``: ``IndexFlatIP`` (exact), IVF and HNSW (approximate); on all GPUs with faiss-gpu;
* ``bf16`` (+ ``bf16_scan``, its screen): exact search on CPUs with native bf16, a bf16 screen with a proven
  error bound and an fp32 rescore;
* ``torch_device``: exact fp32 GEMMs on a torch device (the GPU worker without faiss-gpu).

``build`` chooses among them (by hardware, or as a caller forces); ``split`` runs one search as query blocks
on a task runner's workers (same results); ``constants`` holds every constant.
"""

from tasks.cleaning.search.build import Backend, Index, as_matrix, build_index, result_width, search
from tasks.cleaning.search.constants import MISSING_SCORE
from tasks.cleaning.search.split import BlockResult, SplitCursor, iter_split, merge_blocks, search_split

__all__ = [
    "MISSING_SCORE",
    "Backend",
    "BlockResult",
    "Index",
    "SplitCursor",
    "as_matrix",
    "build_index",
    "iter_split",
    "merge_blocks",
    "result_width",
    "search",
    "search_split",
]
