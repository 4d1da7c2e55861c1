"""The bf16 screen of :class:`tasks.cleaning.search.bf16.Bf16ExactIndex`: bf16 bit helpers, the per-row top-N
selection, and :class:`ChunkScan`, the scan over the whole corpus for one chunk of queries.

Why the candidates it keeps always contain the exact top N (and the threshold it uses) is proved
in the module docstring of :mod:`tasks.cleaning.search.bf16`; this code follows that text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from tasks.cleaning.search.constants import BF16_U

if TYPE_CHECKING:
    from tasks.cleaning.search.bf16 import Bf16ExactIndex


def pow2_scale(max_abs: np.ndarray) -> np.ndarray:
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


def _gamma(d: int) -> float:
    nu = d * 2.0**-24
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


class ChunkScan:
    """The scan over the whole corpus for one chunk of nonzero queries; see :mod:`tasks.cleaning.search.bf16`."""

    def __init__(self, index: Bf16ExactIndex, q: np.ndarray, n: int) -> None:
        self.index, self.q, self.n = index, np.ascontiguousarray(q), n
        self.rows = rows = q.shape[0]
        qs = q * pow2_scale(np.abs(q).max(axis=1)).astype(np.float32)[:, None]  # exact: powers of two
        self.qb = torch.from_numpy(qs).to(torch.bfloat16)
        qs64 = qs.astype(np.float64)
        qb64 = self.qb.float().numpy().astype(np.float64)
        resid = qb64 - qs64
        q_norm = np.sqrt(np.einsum("ij,ij->i", qs64, qs64))
        qhat_norm = np.sqrt(np.einsum("ij,ij->i", qb64, qb64))
        q_resid = np.sqrt(np.einsum("ij,ij->i", resid, resid))
        gamma = _gamma(index.d)
        self.err = (
            q_resid * index._xhat_max
            + q_norm * index._resid_max
            + gamma * qhat_norm * index._xhat_max
            + gamma * q_norm * index._norm_max
            + 3 * index.d * 2.0**-126
        ) * (1 + 2.0**-6)
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
            thr = b - u * np.abs(b) - 2.0**-120
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
        top = np.partition(gm, width - n, axis=1)[:, width - n :] if width > n else gm
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
            self._expand(bits, hits[start : start + self.hit_slice], ms, g, width)
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

    def _rescore_with_exact(self, rows: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """fp32 scores of the candidates ``(rows, ids)``, joined by those kept exactly at earlier compactions."""
        rows, ids, scores = self.index._rescore(self.q, rows, ids)
        if self.exact is None:
            return rows, ids, scores
        return tuple(np.concatenate([kept, new]) for kept, new in zip(self.exact, (rows, ids, scores), strict=True))

    def _compact(self) -> None:
        rows, ids, bits = self._candidates()
        if rows.size <= self.index.compact_entries // 2:  # the tighter threshold was enough
            self.store.append((rows, ids, bits))
            self.stored = int(rows.size)
            return
        # rescore and keep the exact top n per query: an item outside the top n of a subset is not in
        # the top n of the whole corpus
        self.index.last_stats["compactions"] += 1
        rows, ids, scores = self._rescore_with_exact(rows, ids)
        rows, ids, scores, _ = _select_top(rows, ids, scores, self.n)
        self.exact = (rows, ids, scores)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Rescore the surviving candidates; the chunk's ``(scores, ids)``, (rows, n) each."""
        n = self.n
        rows, ids, _ = self._candidates()
        rows, ids, scores = self._rescore_with_exact(rows, ids)
        rows, ids, scores, pos = _select_top(rows, ids, scores, n)
        if np.bincount(rows, minlength=self.rows).min() != n:  # pragma: no cover - would break the bound
            raise RuntimeError("bf16 screen lost candidates (outside its error bound); please report")
        out_scores = np.empty((self.rows, n), dtype=np.float32)
        out_ids = np.empty((self.rows, n), dtype=np.int64)
        out_scores[rows, pos] = scores
        out_ids[rows, pos] = ids
        return out_scores, out_ids
