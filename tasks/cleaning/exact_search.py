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
  the RNE rounding of an fp32 accumulation (tests/test_exact_search.py checks the bound).
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
vectors by reference and a bf16 copy (half their size); faiss holds an fp32 copy.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

#: faiss's filler for missing results (``-FLT_MAX``)
MISSING_SCORE = float(np.finfo(np.float32).min)
#: bf16 unit roundoff (round to nearest even)
BF16_U = 2.0 ** -8
#: target size of one bf16 score block (query chunk × corpus block), bytes; two are alive at a time
SCORE_BLOCK_BYTES = 128 * 2**20
#: queries per chunk (2048 × 32768 corpus items per 128 MB block)
QUERY_CHUNK = 2048
#: strided slabs per corpus block for the group-max screen
GROUPS = 16
#: candidate entries per query chunk above which the store is compacted
COMPACT_ENTRIES = 4_000_000
#: float32 rows per chunk when scanning the corpus at construction
_BUILD_CHUNK = 65536


def _pow2_scale(max_abs: np.ndarray) -> np.ndarray:
    """Powers of two ``s`` with ``max_abs * s`` in [0.5, 1) (1 where ``max_abs`` is 0)."""
    max_abs = np.asarray(max_abs, dtype=np.float64)
    _, exp = np.frexp(np.where(max_abs > 0, max_abs, 1.0))  # max_abs = m * 2^exp, m in [0.5, 1)
    return np.where(max_abs > 0, np.ldexp(1.0, -exp), 1.0)


def _bf16_floor(values: np.ndarray) -> torch.Tensor:
    """The largest bf16 number <= each float64 value (-inf stays -inf), as a bf16 tensor."""
    v = np.asarray(values, dtype=np.float64)
    f = v.astype(np.float32)
    f = np.where(f.astype(np.float64) > v, np.nextafter(f, np.float32(-np.inf)), f).astype(np.float32)
    bits = f.view(np.uint32)
    low = bits & np.uint32(0xFFFF)
    high = bits & np.uint32(0xFFFF0000)
    negative = (bits >> np.uint32(31)) == 1
    # truncation rounds toward zero: down for positives, up for negatives (step one bf16 ulp away)
    bumped = np.where(negative & (low != 0), high + np.uint32(0x10000), high)
    out = (bumped >> np.uint32(16)).astype(np.uint16).view(np.int16)
    return torch.from_numpy(out.copy()).view(torch.bfloat16)


def _bf16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    """float32 values of bf16 numbers given as their int16 bit patterns."""
    return (bits.astype(np.int16).view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _in_inference_mode(fn, *args):
    with torch.inference_mode():
        return fn(*args)


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _gamma(d: int) -> float:
    nu = d * 2.0 ** -24
    return nu / (1.0 - nu)


def _desc_key(values: np.ndarray) -> np.ndarray:
    """uint32-range int64 keys ordering float32 values descending (-0.0 equal to +0.0)."""
    v = (np.asarray(values, dtype=np.float32) + np.float32(0.0)).view(np.int32).astype(np.int64)  # -0.0 -> +0.0
    ordered = np.where(v >= 0, v, -(v + 2**31) - 1)  # ascending with the float value, in [-2^31, 2^31)
    return (2**31 - 1) - ordered  # in [0, 2^32)


def _select_top(rows: np.ndarray, ids: np.ndarray, scores: np.ndarray, n: int):
    """Per row, the ``n`` entries with the largest score (ties: smaller id first), sorted by (row, rank).

    Returns ``(rows, ids, scores, position)``, position = 0-based rank within the row.
    """
    if rows.size == 0:
        return rows, ids, scores, rows.copy()
    key = rows.astype(np.int64) << 32 | _desc_key(scores)
    order = np.argsort(key)
    sorted_key = key[order]
    tied = sorted_key[1:] == sorted_key[:-1]
    if tied.any():  # equal scores within a row: order each run of equal keys by id
        at = np.flatnonzero(np.concatenate([tied, [False]]) | np.concatenate([[False], tied]))
        sub = order[at]
        order[at] = sub[np.lexsort((ids[sub], key[sub]))]
    rows, ids, scores = rows[order], ids[order], scores[order]
    counts = np.bincount(rows)
    starts = np.cumsum(counts) - counts
    position = np.arange(rows.size) - starts[rows]
    keep = position < n
    return rows[keep], ids[keep], scores[keep], position[keep]


class Bf16ExactIndex:
    """Exact inner-product top-k over ``vectors`` (rows), searched as described in the module doc.

    The fp32 vectors are kept by reference when they already are a C-contiguous float32 array
    (do not modify them afterwards), plus a bf16 copy (half their size).
    """

    metric_type = 0  # faiss.METRIC_INNER_PRODUCT
    is_trained = True

    def __init__(self, vectors: np.ndarray, *, groups: int = GROUPS, score_block_bytes: int = SCORE_BLOCK_BYTES,
                 query_chunk: int = QUERY_CHUNK, compact_entries: int = COMPACT_ENTRIES, overlap: bool = True) -> None:
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"expected a 2-d array of vectors, got shape {x.shape}")
        if x.size and not np.isfinite(x).all():
            raise ValueError("the corpus holds non-finite values")
        self.ntotal, self.d = int(x.shape[0]), int(x.shape[1])
        self.groups = max(1, int(groups))
        self.score_block_bytes = int(score_block_bytes)
        self.query_chunk = max(1, int(query_chunk))
        self.compact_entries = int(compact_entries)
        self.overlap = bool(overlap)
        self._x = x
        self._xt = torch.from_numpy(x)
        max_abs = float(np.abs(x).max()) if x.size else 0.0
        self._x_scale = float(_pow2_scale(max_abs))
        self._xb = torch.empty((self.ntotal, self.d), dtype=torch.bfloat16)
        squares = np.zeros(3)  # max squared norms of x̂, x̂ - x, x (scaled)
        for start in range(0, self.ntotal, _BUILD_CHUNK):
            xs = x[start:start + _BUILD_CHUNK] * np.float32(self._x_scale)  # exact: a power of two
            xb = torch.from_numpy(xs).to(torch.bfloat16)
            self._xb[start:start + _BUILD_CHUNK] = xb
            xb = xb.float().numpy()
            resid = xb - xs  # exact in fp32
            for slot, v in enumerate((xb, resid, xs)):
                squares[slot] = max(squares[slot], float(np.einsum("ij,ij->i", v, v).max()))
        # fp32 sums of d squares (each <= 1): relative error <= (d + 2)·2^-24, underflow <= d·2^-126
        bounds = np.sqrt(squares * (1 + (self.d + 2) * 2.0 ** -24) + self.d * 2.0 ** -126)
        self._xhat_max, self._resid_max, self._norm_max = (float(b) for b in bounds)
        self.last_stats: dict[str, int] = {}

    # --- faiss-like accessors -------------------------------------------------------------------
    def reconstruct(self, i: int) -> np.ndarray:
        return self._x[int(i)].copy()

    def reconstruct_batch(self, ids: np.ndarray) -> np.ndarray:
        return self._x[np.asarray(ids, dtype=np.int64)]

    def reconstruct_n(self, start: int, n: int) -> np.ndarray:
        return self._x[int(start):int(start) + int(n)].copy()

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
                chunk = q[start:start + self.query_chunk]
                zero = ~chunk.any(axis=1)
                if zero.any():  # every score is exactly 0: the first ids
                    scores[start:start + len(chunk)][zero, :width] = 0.0
                    ids[start:start + len(chunk)][zero, :width] = np.arange(width)
                live = np.flatnonzero(~zero)
                if not len(live):
                    continue
                scan = _ChunkScan(self, chunk[live] if len(live) < len(chunk) else chunk, width)
                for ms, me, g in self._corpus_blocks(len(live)):
                    block = scan.qb @ self._xb[ms:me].t()  # (rows, me - ms) bf16
                    if pending is not None:
                        pending.result()
                    pending = worker.submit(_in_inference_mode, scan.scan_block, block, ms, g) if self.overlap \
                        else _done(scan.scan_block(block, ms, g))
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            pattern = torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(ids),
                                              torch.zeros(total, dtype=torch.float32),
                                              size=(nrows, self.ntotal), check_invariants=False)
            scores = torch.sparse.sampled_addmm(pattern, torch.from_numpy(q), self._xt.t(), beta=0.0, alpha=1.0).values()
        return rows, ids, scores.numpy().copy()


class _ChunkScan:
    """The scan over the whole corpus for one chunk of nonzero queries; see the module doc."""

    def __init__(self, index: Bf16ExactIndex, q: np.ndarray, n: int) -> None:
        self.index, self.q, self.n = index, np.ascontiguousarray(q), n
        self.rows = rows = q.shape[0]
        qs = q * _pow2_scale(np.abs(q).max(axis=1)).astype(np.float32)[:, None]  # exact: powers of two
        self.qb = torch.from_numpy(qs).to(torch.bfloat16)
        qs64 = qs.astype(np.float64)
        qb64 = self.qb.float().numpy().astype(np.float64)
        resid = qb64 - qs64
        q_norm = np.sqrt(np.einsum("ij,ij->i", qs64, qs64))
        qhat_norm = np.sqrt(np.einsum("ij,ij->i", qb64, qb64))
        q_resid = np.sqrt(np.einsum("ij,ij->i", resid, resid))
        gamma = _gamma(index.d)
        self.err = (q_resid * index._xhat_max + q_norm * index._resid_max
                    + gamma * qhat_norm * index._xhat_max + gamma * q_norm * index._norm_max
                    + 3 * index.d * 2.0 ** -126) * (1 + 2.0 ** -6)
        self.best = np.full((rows, n), -np.inf, dtype=np.float32)  # N largest known distinct-item scores
        self.store: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # candidates: (rows, ids, bf16 bits)
        self.stored = 0
        self.exact: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # compacted (rows, ids, scores)
        self.thr_bits = np.empty(0, np.int16)
        self.thr_float = np.empty(0, np.float32)
        self.positive = False
        self.hit_slice = max(1, index.compact_entries // (2 * index.groups))

    def _update_threshold(self) -> None:
        u = BF16_U / (1 - BF16_U)
        tau = self.best.min(axis=1).astype(np.float64)  # the N-th largest known score: a lower bound on τ̃
        with np.errstate(invalid="ignore"):
            a = tau - u * np.abs(tau)
            b = a - 2 * self.err
            thr = b - u * np.abs(b) - 2.0 ** -120
        thr = np.where(np.isfinite(tau), thr, -np.inf)
        self.thr_bits = _bf16_floor(thr).view(torch.int16).numpy()
        self.thr_float = _bf16_bits_to_float(self.thr_bits)
        # bf16 numbers > +0 compare like their int16 bit patterns, and every bf16 <= +0 (incl. -0.0)
        # has a negative pattern: with all thresholds > 0 the screen runs on int16 (native max/compare)
        self.positive = bool((self.thr_float > 0).all())

    def scan_block(self, s: torch.Tensor, ms: int, g: int) -> None:
        """Tighten the bound with one score block (columns ``ms ...``) and store its candidates."""
        rows, n = self.rows, self.n
        size = s.shape[1]
        width = size // g
        bits = s.view(torch.int16).numpy()  # bf16 bit patterns, (rows, size)
        gm = bits.reshape(rows, g, width).max(axis=1) if g > 1 else bits  # int16 order (see below)
        # 1. tighten the bound with this block: the top n group maxima in int16 order. Each is some
        #    item's score, all items distinct (also from earlier blocks), so the N-th largest (as
        #    floats) of `best` ∪ these is a valid lower bound on τ̃ whatever their signs.
        top = np.partition(gm, width - n, axis=1)[:, width - n:] if width > n else gm
        merged = np.concatenate([self.best, _bf16_bits_to_float(top)], axis=1)
        self.best = -np.partition(-merged, n - 1, axis=1)[:, :n]
        self._update_threshold()
        # 2. screen the groups, then their members
        if self.positive:
            hits = np.flatnonzero(gm >= self.thr_bits[:, None])
        else:  # rows with a threshold <= 0: int16 order is not float order there, use float maxima
            self.index.last_stats["float_path_blocks"] += 1
            mask = gm >= self.thr_bits[:, None]
            low = np.flatnonzero(self.thr_float <= 0)
            block = s[torch.from_numpy(low)].view(low.size, g, width)
            mask[low] = block.amax(dim=1).float().numpy() >= self.thr_float[low][:, None]
            hits = np.flatnonzero(mask)
        for start in range(0, hits.size, self.hit_slice):  # bounded memory when almost everything passes
            self._expand(bits, hits[start:start + self.hit_slice], ms, g, width)
            if self.stored > self.index.compact_entries:
                self._compact()

    def _expand(self, bits: np.ndarray, hits: np.ndarray, ms: int, g: int, width: int) -> None:
        """Store the members (items) of the passing groups ``hits`` that pass the threshold."""
        hit_r, hit_g = np.divmod(hits, width)
        # the members of group (r, c): columns c + j * width, j < g
        vals = bits.reshape(self.rows, g, width)[hit_r, :, hit_g]  # (hits, g)
        if self.positive:
            passing = np.flatnonzero(vals >= self.thr_bits[hit_r][:, None])
        else:
            passing = np.flatnonzero(_bf16_bits_to_float(vals) >= self.thr_float[hit_r][:, None])
        p, j = np.divmod(passing, g)
        item_rows = hit_r[p].astype(np.int32)
        self.store.append((item_rows, hit_g[p] + j * width + ms, vals.reshape(-1)[passing]))
        self.stored += item_rows.size
        self.index.last_stats["screened"] += item_rows.size

    def _candidates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The stored candidates that pass the current threshold, ``(rows, ids, bits)``; empties the store."""
        if not self.store:
            return np.empty(0, np.int32), np.empty(0, np.int64), np.empty(0, np.int16)
        rows = np.concatenate([e[0] for e in self.store])
        ids = np.concatenate([e[1] for e in self.store])
        bits = np.concatenate([e[2] for e in self.store])
        self.store.clear()
        self.stored = 0
        keep = _bf16_bits_to_float(bits) >= self.thr_float[rows]
        return rows[keep], ids[keep], bits[keep]

    def _compact(self) -> None:
        rows, ids, bits = self._candidates()
        if rows.size <= self.index.compact_entries // 2:  # the tighter threshold was enough
            self.store.append((rows, ids, bits))
            self.stored = int(rows.size)
            return
        # rescore and keep the exact top n per query: an item outside the top n of a subset is not in
        # the top n of the whole corpus
        self.index.last_stats["compactions"] += 1
        rows, ids, scores = self.index._rescore(self.q, rows, ids)
        if self.exact is not None:
            rows, ids, scores = (np.concatenate([self.exact[0], rows]), np.concatenate([self.exact[1], ids]),
                                 np.concatenate([self.exact[2], scores]))
        rows, ids, scores, _ = _select_top(rows, ids, scores, self.n)
        self.exact = (rows, ids, scores)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Rescore the surviving candidates; the chunk's ``(scores, ids)``, (rows, n) each."""
        n = self.n
        rows, ids, _ = self._candidates()
        rows, ids, scores = self.index._rescore(self.q, rows, ids)
        if self.exact is not None:
            rows, ids, scores = (np.concatenate([self.exact[0], rows]), np.concatenate([self.exact[1], ids]),
                                 np.concatenate([self.exact[2], scores]))
        rows, ids, scores, pos = _select_top(rows, ids, scores, n)
        if np.bincount(rows, minlength=self.rows).min() != n:  # pragma: no cover - would break the bound
            raise RuntimeError("bf16 screen lost candidates (outside its error bound); please report")
        out_scores = np.empty((self.rows, n), dtype=np.float32)
        out_ids = np.empty((self.rows, n), dtype=np.int64)
        out_scores[rows, pos] = scores
        out_ids[rows, pos] = ids
        return out_scores, out_ids
