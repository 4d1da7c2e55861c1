"""Near-duplicate clusters of texts by MinHash LSH, in compact arrays: the engine of :mod:`tasks.cleaning.dedup`.

For texts already in "earlier first" order, :func:`near_clusters` returns each text's cluster
representative (its smallest position). The rule is the one ``rensa``'s ``RMinHashLSH`` applies:
character shingles -> a MinHash signature per text (``num_perm`` uint32 values,
:mod:`tasks.cleaning.dedup_minhash`); a pair whose signatures agree on all rows of at least one LSH
band is a candidate; a candidate whose estimated Jaccard similarity (the share of equal signature
values) is >= the threshold is an edge; the clusters are the connected components of the edges.

Everything per row is a numpy array (signature matrix, band keys, labels), and candidate pairs exist
only in blocks of :data:`PAIR_BLOCK`: one band at a time, pairs whose rows are already joined are
skipped (as the union-find loop this replaced did), the rest verified by vectorised comparisons (the
low byte of every signature value first: a pair with too many unequal low bytes cannot be an edge, so
most candidates cost 2 * num_perm bytes read), and the clusters the edges touch merged with
``scipy.sparse.csgraph``. Time and memory grow with the rows and the candidate pairs, with no Python
object per row or per pair. Candidate pairs between texts of Jaccard 0.4-0.7 (templated documents)
grow with n^2; the low-byte filter keeps their cost per pair small.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from tasks.cleaning.dedup_minhash import signatures

#: lower bound on the probability that a pair at the threshold becomes an LSH candidate
LSH_RECALL_AT_THRESHOLD = 0.99
#: candidate pairs verified per block (~3 * num_perm bytes each, for the low bytes of both rows and their comparison)
PAIR_BLOCK = 262_144


def lsh_bands(num_perm: int, threshold: float, recall: float = LSH_RECALL_AT_THRESHOLD) -> int:
    """The fewest LSH bands (a divisor of ``num_perm``) that make a pair at ``threshold`` a candidate
    with probability >= ``recall``: fewer bands mean fewer false candidates to verify."""
    divisors = [b for b in range(1, num_perm + 1) if num_perm % b == 0]
    for bands in divisors:
        rows = num_perm // bands
        if 1.0 - (1.0 - threshold**rows) ** bands >= recall:
            return bands
    return num_perm


def _band_keys(band: np.ndarray) -> np.ndarray:
    """One uint64 key per row of a band (its ``rows`` uint32 values mixed; equal bands, equal keys)."""
    key = np.zeros(len(band), dtype=np.uint64)
    mult = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for col in band.T:
            key = (key ^ col.astype(np.uint64)) * mult
            key ^= key >> np.uint64(29)
    return key


def band_pairs(keys: np.ndarray, labels: np.ndarray, block: int = PAIR_BLOCK):
    """Yield (left, right) int64 position arrays (left < right) of the pairs of rows with equal ``keys``,
    about ``block`` pairs at a time. Buckets whose rows all share one label make no pairs."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    sorted_labels = labels[order]
    mixed = np.minimum.reduceat(sorted_labels, starts) != np.maximum.reduceat(sorted_labels, starts)
    buckets = np.flatnonzero((sizes > 1) & mixed)
    if not len(buckets):
        return
    # member t (a sorted position) of a bucket ending at `end` pairs with the end - t - 1 members after it
    member_sizes = sizes[buckets]
    first = np.cumsum(member_sizes) - member_sizes
    member = np.repeat(starts[buckets] - first, member_sizes) + np.arange(member_sizes.sum())
    counts = np.repeat(starts[buckets] + member_sizes, member_sizes) - member - 1
    total = np.cumsum(counts)
    cuts = np.searchsorted(total, np.arange(block, total[-1], block), side="left") + 1
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(member)], strict=True):
        c = counts[lo:hi]
        if not c.any():
            continue
        left = np.repeat(member[lo:hi], c)
        right = left + 1 + np.arange(len(left)) - np.repeat(np.cumsum(c) - c, c)
        left, right = order[left], order[right]
        yield np.minimum(left, right), np.maximum(left, right)


def join(n: int, left: np.ndarray, right: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """Each of ``n`` rows' smallest joined position after joining ``left[k]`` with ``right[k]``
    (transitively), starting from ``labels`` (the same kind of array; default: every row alone).
    The graph is built on the clusters the pairs touch only, so a join costs O(pairs) plus one remap."""
    if labels is None:
        labels = np.arange(n, dtype=np.int64)
    a, b = labels[left], labels[right]
    nodes = np.unique(np.concatenate([a, b]))  # cluster representatives, ascending
    k = len(nodes)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (np.searchsorted(nodes, a), np.searchsorted(nodes, b))), (k, k))
    _, comp = connected_components(graph.tocsr(), directed=False)
    smallest = np.full(comp.max() + 1, n, dtype=np.int64)
    np.minimum.at(smallest, comp, nodes)
    remap = np.arange(n, dtype=np.int64)
    remap[nodes] = smallest[comp]
    return remap[labels]


def near_clusters(texts: Sequence[str] | pa.Array, num_perm: int, shingle_size: int, threshold: float) -> np.ndarray:
    """For texts already in "earlier first" order: each text's cluster representative (smallest position),
    as an int64 array. Texts are read once, in batches, for their signatures."""
    if len(texts) < 2:
        return np.arange(len(texts), dtype=np.int64)
    return clusters_of_signatures(signatures(texts, num_perm, shingle_size), threshold)


def clusters_of_signatures(sig: np.ndarray, threshold: float) -> np.ndarray:
    """:func:`near_clusters` from the (n, num_perm) signature matrix."""
    n, num_perm = sig.shape
    labels = np.arange(n, dtype=np.int64)
    bands = lsh_bands(num_perm, threshold)
    rows = num_perm // bands
    mismatches = np.arange(num_perm + 1)
    # the most unequal positions a pair may have and still be an edge (the rule: agree / num_perm >= threshold)
    most_unequal = int(mismatches[(num_perm - mismatches) / num_perm >= threshold].max(initial=-1))
    # low bytes: unequal low bytes mean unequal values, so most candidates are rejected reading 1/4 of the bytes
    low = sig.astype(np.uint8)
    for b in range(bands):
        keys = _band_keys(sig[:, b * rows : (b + 1) * rows])
        for left, right in band_pairs(keys, labels, PAIR_BLOCK):
            keep = labels[left] != labels[right]  # already one cluster: no need to verify
            left, right = left[keep], right[keep]
            keep = np.count_nonzero(low[left] != low[right], axis=1) <= most_unequal
            left, right = left[keep], right[keep]
            edge = np.count_nonzero(sig[left] == sig[right], axis=1) / num_perm >= threshold
            if edge.any():
                labels = join(n, left[edge], right[edge], labels)
    return labels
