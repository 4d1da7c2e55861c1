"""Exact top-N inner-product search on CPUs with native bf16: a bf16 screen, then an exact fp32 rescore.

:class:`Bf16ExactIndex` stands in for ``faiss.IndexFlatIP``: ``search(x, k) -> (D, I)``, ``ntotal``,
``d``, ``reconstruct``/``reconstruct_batch``. It returns what an exact search returns: the ids and
fp32 scores of the k corpus items with the largest inner product, best first, ties broken by
corpus id (ascending); missing results (``k > ntotal``) are padded with id -1 and score
``-FLT_MAX``, as faiss pads them. It is faster than faiss's fp32 GEMM because the O(Q·M·d) part
runs as bf16 matrix products (oneDNN's AVX512-BF16/AMX kernels, ~2.5-3× the fp32 GEMM rate)
and only a few hundred candidates per query are scored in fp32.

Why the result is exact
-----------------------
Notation, for one query q and corpus items x. Queries (per row) and the corpus (globally) are
first scaled by powers of two so that every component has magnitude < 1; this is exact, changes
no ranking, keeps the GEMM away from overflow, and all bounds below are in these scaled units.

* ``q̂ = bf16(q)``, ``x̂ = bf16(x)``: round to nearest even, unit roundoff ``u = 2^-8``.
* ``f(x)``: the fp32 accumulation of ``q̂·x̂`` inside the bf16 GEMM. Products of two bf16 numbers
  are exact in fp32; a sum of d terms in any order is off by at most ``γ_d Σ|q̂_i x̂_i|``,
  ``γ_d = d·2^-24 / (1 - d·2^-24)``. (AVX512-BF16 flushes denormals: at most ``3d·2^-126`` more.)
* ``s̃(x) = R(f(x))``: the GEMM's bf16 output. ``R`` (round to nearest even) is monotone and
  ``|R(v) - v| <= u|v|``. torch's CPU bf16 ``matmul`` (oneDNN) behaves so: its outputs match
  the RNE rounding of an fp32 accumulation (tests/cleaning/test_exact_search.py checks the bound).
* ``F(x)``: the final score, the fp32 dot product of the *original* fp32 vectors, each pair
  computed by the same vectorised loop (``torch.sparse.sampled_addmm``), so identical vectors get
  bit-identical scores; ``|F - q·x| <= γ_d Σ|q_i x_i|``.

**Error bound.** Since ``q̂·x̂ - q·x = (q̂ - q)·x̂ + q·(x̂ - x)``, Cauchy-Schwarz on the actual
rounding residuals gives ``|f(x) - F(x)| <= E`` for every item, with ::

    E = (1 + 2^-6) · ( ‖q̂ - q‖·max‖x̂‖ + ‖q‖·max‖x̂ - x‖          input rounding
                       + γ_d ‖q̂‖·max‖x̂‖ + γ_d ‖q‖·max‖x‖           accumulation in f and in F
                       + 3d·2^-126 )                                 flushed denormals

(norms in float64, maxima over the corpus, ``1 + 2^-6`` a safety factor). For unit vectors
``E ≈ 0.95u ≈ 0.0037``; the coordinate-wise bound ``2u Σ|q_i x_i|`` would be twice as loose.

**Lemma.** Let ``τ_F`` be the N-th largest F over the whole corpus and ``τ_f`` the N-th largest
f. Every item y with ``F(y) >= τ_F`` (the exact top N *and every item tied with its last one*)
has ``f(y) >= τ_f - 2E``.
*Proof.* Let A be the N items with the largest f. If y ∈ A, ``f(y) >= τ_f``. Otherwise fewer
than N items have ``F > F(y)`` (as ``F(y) >= τ_F``), so some z ∈ A, z ≠ y, has ``F(z) <= F(y)``,
and ``f(y) >= F(y) - E >= F(z) - E >= f(z) - 2E >= τ_f - 2E``. ∎

**The threshold, in bf16.** The search sees only ``s̃ = R(f)`` and a lower bound ``τ_lb`` on
``τ̃``, the N-th largest s̃ (``τ̃ = R(τ_f)``, R being monotone). ``|R(τ_f) - τ_f| <= u|τ_f|``
gives ``τ_f >= a := τ_lb - u/(1-u)·|τ_lb|``; by monotonicity ``s̃(y) = R(f(y)) >= R(a - 2E)
>= b - u/(1-u)·|b|`` with ``b = a - 2E``. So every exact top-N item (ties included) satisfies

    s̃(y) >= thr := bf16_round_down(b - u/(1-u)·|b| - 2^-120).

A lower ``τ_lb`` only lowers thr, so any valid lower bound on τ̃ yields a superset of the
candidates ``{y : s̃(y) >= thr}``. Scoring every candidate with F and keeping the N best by
(F descending, id ascending) is therefore exactly the top N by F over the whole corpus, with the
same tie order as a full brute force in the same arithmetic. The margin ``τ_lb - thr`` is about
``2E + 2u|τ|`` (~0.009 for unit vectors): queries get N plus the items within that distance of
the N-th score as candidates (~1.3-2× N on clustered 384-d data).

The scan, per chunk of ``Qc`` queries
-------------------------------------
Corpus blocks of ``Mc`` items give a ``Qc × Mc`` bf16 score block (128 MB: 2048 × 32768), viewed as G = 16
strided slabs; ``gm``, the slab-wise maximum of each column group, costs one pass over the block.

1. *Bound.* ``best`` holds N scores of distinct items (from distinct groups of distinct blocks);
   it absorbs the block's top N group maxima (``np.partition``), and ``τ_lb = min(best)`` — the
   N-th largest of N distinct items' scores is a lower bound on τ̃ — gives thr.
2. *Screen.* Groups with ``gm >= thr`` are expanded to their G members; members with
   ``s̃ >= thr`` are stored as candidates (row, id, s̃). Thresholds only rise, so at the end the
   final thr filters every stored candidate again.
3. *Rescore* the surviving candidates with F and select the top N per query (one sort on
   ``(row, F)``, ties by id).

While every threshold is > 0 the screen works on the int16 bit patterns of the bf16 scores
(positive bf16 numbers order like their patterns, and every number <= +0, -0.0 included, has a
negative pattern): native int16 max and compares. Rows whose threshold is <= 0 use float maxima.
The top-N picks in int16 order are still distinct items' scores, so their float minimum stays a
valid bound whatever their signs.

Edge cases: zero queries score 0 against everything (ids 0..k-1, score 0). Dense ties (many
identical or nearly identical vectors) yield many candidates and stay correct: groups are
expanded in slices, and when a chunk's store passes ``compact_entries`` it is refiltered and, if
still large, rescored into the exact top N per query (an item outside the top N of a subset is
not in the top N of the whole), which bounds memory at the cost of time. Non-finite vectors
raise ``ValueError``. The analysis assumes the fp32 products of the original vectors neither
overflow nor underflow (true for embeddings; faiss makes the same assumption).

Threads and memory: the GEMMs use torch's intra-op pool as the process set it (nothing global is
changed). The screen runs in NumPy (mostly single-threaded, GIL released) on one worker thread,
block j while block j+1 is multiplied, so two score blocks are alive at a time
(``2 × score_block_bytes``, 256 MB by default; ``overlap=False`` keeps one). Small per-hit work
stays out of torch: on a loaded machine every parallel torch call waits until all of its threads
are scheduled, which dominates on small tensors. Besides the blocks, the index holds the fp32
vectors by reference and a bf16 copy (half their size): when the vectors are memory-mapped from a file
(the clean's ``ranking`` folder), the copy is too (an unlinked temp file beside them, in the page cache),
and each corpus block's pages are dropped from the process once multiplied; faiss holds an fp32 copy.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from storage.mapped import drop_pages, mapped_folder, scratch_map, take_rows
from tasks.cleaning.search.bf16_scan import ChunkScan, pow2_scale
from tasks.cleaning.search.constants import (
    BUILD_CHUNK,
    COMPACT_ENTRIES,
    GROUPS,
    MISSING_SCORE,
    QUERY_CHUNK,
    SCORE_BLOCK_BYTES,
)


def _in_inference_mode(fn, *args):
    with torch.inference_mode():
        return fn(*args)


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


class Bf16ExactIndex:
    """Exact inner-product top-k over ``vectors`` (rows), searched as described in the module doc.

    The fp32 vectors are kept by reference when they already are a C-contiguous float32 array
    (do not modify them afterwards), plus a bf16 copy (half their size).
    """

    metric_type = 0  # faiss.METRIC_INNER_PRODUCT
    is_trained = True

    def __init__(
        self,
        vectors: np.ndarray,
        *,
        groups: int = GROUPS,
        score_block_bytes: int = SCORE_BLOCK_BYTES,
        query_chunk: int = QUERY_CHUNK,
        compact_entries: int = COMPACT_ENTRIES,
        overlap: bool = True,
    ) -> None:
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"expected a 2-d array of vectors, got shape {x.shape}")
        # both read the corpus in chunks: a whole-corpus temporary (np.abs(x), np.isfinite(x)) would be its size again
        chunks = [x[s : s + BUILD_CHUNK] for s in range(0, len(x), BUILD_CHUNK)]
        if x.size and not all(np.isfinite(c).all() for c in chunks):
            raise ValueError("the corpus holds non-finite values")
        self.ntotal, self.d = int(x.shape[0]), int(x.shape[1])
        self.groups = max(1, int(groups))
        self.score_block_bytes = int(score_block_bytes)
        self.query_chunk = max(1, int(query_chunk))
        self.compact_entries = int(compact_entries)
        self.overlap = bool(overlap)
        self._x = x
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "non-writable array": a read-only memory map, never written
            self._xt = torch.from_numpy(x)
        max_abs = max((float(np.abs(c).max()) for c in chunks if c.size), default=0.0)
        self._x_scale = float(pow2_scale(max_abs))
        self._xb_map = None  # the bf16 copy's file mapping, when it lives in the page cache
        folder = mapped_folder(vectors)
        if folder is not None and self.ntotal:  # the corpus is a file: its bf16 copy too, in the same folder
            self._xb_map = scratch_map(folder, self.ntotal * self.d * 2)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "non-writable buffer": it is writable
                flat = torch.frombuffer(self._xb_map, dtype=torch.bfloat16, count=self.ntotal * self.d)
            self._xb = flat.view(self.ntotal, self.d)
        else:
            self._xb = torch.empty((self.ntotal, self.d), dtype=torch.bfloat16)
        squares = np.zeros(3)  # max squared norms of x̂, x̂ - x, x (scaled)
        for start in range(0, self.ntotal, BUILD_CHUNK):
            xs = x[start : start + BUILD_CHUNK] * np.float32(self._x_scale)  # exact: a power of two
            xb = torch.from_numpy(xs).to(torch.bfloat16)
            self._xb[start : start + BUILD_CHUNK] = xb
            xb = xb.float().numpy()
            resid = xb - xs  # exact in fp32
            for slot, v in enumerate((xb, resid, xs)):
                squares[slot] = max(squares[slot], float(np.einsum("ij,ij->i", v, v).max()))
        # fp32 sums of d squares (each <= 1): relative error <= (d + 2)·2^-24, underflow <= d·2^-126
        bounds = np.sqrt(squares * (1 + (self.d + 2) * 2.0**-24) + self.d * 2.0**-126)
        self._xhat_max, self._resid_max, self._norm_max = (float(b) for b in bounds)
        self.last_stats: dict[str, int] = {}

    # --- faiss-like accessors -------------------------------------------------------------------
    def reconstruct(self, i: int) -> np.ndarray:
        return self._x[int(i)].copy()

    def reconstruct_batch(self, ids: np.ndarray) -> np.ndarray:
        return take_rows(self._x, ids)

    def reconstruct_n(self, start: int, n: int) -> np.ndarray:
        return self._x[int(start) : int(start) + int(n)].copy()

    # --- search ---------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(D, I)``: float32 scores and int64 ids of the top ``k`` per query, best first."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.d:
            raise ValueError(f"expected queries of shape (n, {self.d}), got {q.shape}")
        if q.size and not np.isfinite(q).all():
            raise ValueError("the queries hold non-finite values")
        n, k = q.shape[0], int(k)
        if k < 0:
            raise ValueError("k must be >= 0")
        scores = np.full((n, k), MISSING_SCORE, dtype=np.float32)
        ids = np.full((n, k), -1, dtype=np.int64)
        width = min(k, self.ntotal)
        self.last_stats = {"queries": n, "screened": 0, "rescored": 0, "compactions": 0, "float_path_blocks": 0}
        if n == 0 or width == 0:
            return scores, ids
        # The bf16 GEMMs run here, on torch's threads; each score block is screened (NumPy, mostly
        # single-threaded, GIL released) by one worker thread while the next block is multiplied.
        # At most two score blocks are alive: the one being screened and the one just computed.
        with torch.inference_mode(), ThreadPoolExecutor(max_workers=1) as worker:
            pending: Future | None = None
            finishing: list[tuple[Future, np.ndarray]] = []
            for start in range(0, n, self.query_chunk):
                chunk = q[start : start + self.query_chunk]
                zero = ~chunk.any(axis=1)
                if zero.any():  # every score is exactly 0: the first ids
                    scores[start : start + len(chunk)][zero, :width] = 0.0
                    ids[start : start + len(chunk)][zero, :width] = np.arange(width)
                live = np.flatnonzero(~zero)
                if not len(live):
                    continue
                scan = ChunkScan(self, chunk[live] if len(live) < len(chunk) else chunk, width)
                for ms, me, g in self._corpus_blocks(len(live)):
                    block = scan.qb @ self._xb[ms:me].t()  # (rows, me - ms) bf16
                    if self._xb_map is not None:  # read once per chunk of queries: back to the page cache
                        drop_pages(self._xb_map, ms * self.d * 2, me * self.d * 2)
                    if pending is not None:
                        pending.result()
                    pending = (
                        worker.submit(_in_inference_mode, scan.scan_block, block, ms, g)
                        if self.overlap
                        else _done(scan.scan_block(block, ms, g))
                    )
                    del block
                pending = worker.submit(_in_inference_mode, scan.finish) if self.overlap else _done(scan.finish())
                finishing.append((pending, start + live))
            for future, rows in finishing:
                s, i = future.result()
                scores[rows, :width] = s
                ids[rows, :width] = i
        return scores, ids

    def _corpus_blocks(self, rows: int) -> list[tuple[int, int, int]]:
        """``(start, stop, groups)`` covering the corpus; each block's size is a multiple of its groups."""
        g = self.groups
        per_block = max(g, (self.score_block_bytes // (2 * max(rows, 1))) // g * g)
        blocks = []
        start = 0
        while start < self.ntotal:
            stop = min(self.ntotal, start + per_block)
            whole = (stop - start) // g * g
            if whole:
                blocks.append((start, start + whole, g))
                start += whole
            else:  # a tail shorter than g: groups of one
                blocks.append((start, stop, 1))
                start = stop
        return blocks

    def _rescore(self, q: np.ndarray, rows: np.ndarray, ids: np.ndarray):
        """fp32 ``q[rows] · x[ids]`` per pair; returns ``(rows, ids, scores)`` reordered by row (stable).

        ``torch.sparse.sampled_addmm`` computes each pair with the same vectorised dot product
        (``vec::map2_reduce_all`` over d), so a pair's score does not depend on its position:
        identical vectors get bit-identical scores.
        """
        total = int(rows.size)
        self.last_stats["rescored"] += total
        if total == 0:
            return rows, ids, np.empty(0, dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        rows, ids = rows[order], ids[order].astype(np.int64)
        nrows = q.shape[0]
        crow = np.zeros(nrows + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=nrows), out=crow[1:])
        columns, corpus = ids, self._xt
        if self._xb_map is not None:  # a file-mapped corpus: only the candidates' rows, read (storage/mapped.py)
            unique, columns = np.unique(ids, return_inverse=True)  # order-preserving: same pairs, same loop
            corpus = torch.from_numpy(take_rows(self._x, unique))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            pattern = torch.sparse_csr_tensor(
                torch.from_numpy(crow),
                torch.from_numpy(np.asarray(columns, dtype=np.int64).reshape(-1)),
                torch.zeros(total, dtype=torch.float32),
                size=(nrows, len(corpus)),
                check_invariants=False,
            )
            scores = torch.sparse.sampled_addmm(pattern, torch.from_numpy(q), corpus.t(), beta=0.0, alpha=1.0).values()
        return rows, ids, scores.numpy().copy()
