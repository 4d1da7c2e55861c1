"""Near-duplicate clusters of texts by MinHash LSH, in compact arrays: the engine of :mod:`tasks.cleaning.dedup`.

For texts already in "earlier first" order, :func:`near_clusters` returns each text's cluster
representative (its smallest position). The rule is the one ``rensa``'s ``RMinHashLSH`` applies:
character shingles -> a MinHash signature per text (``rensa``'s batch API, ``num_perm`` uint32 values);
a pair whose signatures agree on all rows of at least one LSH band is a candidate; a candidate whose
estimated Jaccard similarity (the share of equal signature values) is >= the threshold is an edge; the
clusters are the connected components of the edges.

Everything per row is a numpy array (signature matrix, band keys, labels), and candidate pairs exist
only in blocks of :data:`PAIR_BLOCK`: one band at a time, pairs whose rows are already joined are
skipped (as the union-find loop this replaced did), the rest verified by one vectorised comparison,
and the components recomputed with ``scipy.sparse.csgraph``. Time and memory grow with the rows and the
candidate pairs, with no Python object per row or per pair.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from rensa import RMinHash
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

#: MinHash seed; fixed, so results do not depend on anything but the data and the settings
MINHASH_SEED = 20240501
#: texts shingled and sketched per batch (bounds the memory the shingle lists take)
SKETCH_BATCH = 2048
#: lower bound on the probability that a pair at the threshold becomes an LSH candidate
LSH_RECALL_AT_THRESHOLD = 0.99
#: candidate pairs verified per block (two blocks of signature rows: PAIR_BLOCK * num_perm * 8 bytes)
PAIR_BLOCK = 65_536


def lsh_bands(num_perm: int, threshold: float, recall: float = LSH_RECALL_AT_THRESHOLD) -> int:
    """The fewest LSH bands (a divisor of ``num_perm``) that make a pair at ``threshold`` a candidate
    with probability >= ``recall``: fewer bands mean fewer false candidates to verify."""
    divisors = [b for b in range(1, num_perm + 1) if num_perm % b == 0]
    for bands in divisors:
        rows = num_perm // bands
        if 1.0 - (1.0 - threshold**rows) ** bands >= recall:
            return bands
    return num_perm


def _shingles(text: str, k: int) -> list[str]:
    if len(text) <= k:
        return [text]
    return [text[i : i + k] for i in range(len(text) - k + 1)]


def signatures(texts: Sequence[str] | pa.Array, num_perm: int, shingle_size: int) -> np.ndarray:
    """The (len(texts), num_perm) uint32 MinHash matrix of the texts' character shingles (``rensa``'s
    ``RMinHash`` digests, built in batches of :data:`SKETCH_BATCH` texts)."""
    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    for start in range(0, len(texts), SKETCH_BATCH):
        chunk = texts[start : start + SKETCH_BATCH]
        chunk = chunk.to_pylist() if isinstance(chunk, pa.Array) else chunk
        batch = [_shingles(t, shingle_size) for t in chunk]
        matrix = RMinHash.digest_matrix_from_token_sets(batch, num_perm=num_perm, seed=MINHASH_SEED)
        out[start : start + len(batch)] = np.asarray(matrix.to_rows(), dtype=np.uint32)
    return out


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
    (transitively), starting from ``labels`` (the same kind of array; default: every row alone)."""
    if labels is None:
        labels = np.arange(n, dtype=np.int64)
    a, b = labels[left], labels[right]
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n)).tocsr()
    _, comp = connected_components(graph, directed=False)
    smallest = np.full(comp.max() + 1, n, dtype=np.int64)
    np.minimum.at(smallest, comp, np.arange(n))
    return smallest[comp[labels]]


def near_clusters(texts: Sequence[str] | pa.Array, num_perm: int, shingle_size: int, threshold: float) -> np.ndarray:
    """For texts already in "earlier first" order: each text's cluster representative (smallest position),
    as an int64 array. Texts are read once, in batches, for their signatures."""
    n = len(texts)
    labels = np.arange(n, dtype=np.int64)
    if n < 2:
        return labels
    return clusters_of_signatures(signatures(texts, num_perm, shingle_size), threshold)


def clusters_of_signatures(sig: np.ndarray, threshold: float) -> np.ndarray:
    """:func:`near_clusters` from the (n, num_perm) signature matrix."""
    n, num_perm = sig.shape
    labels = np.arange(n, dtype=np.int64)
    bands = lsh_bands(num_perm, threshold)
    rows = num_perm // bands
    for b in range(bands):
        keys = _band_keys(sig[:, b * rows : (b + 1) * rows])
        for left, right in band_pairs(keys, labels):
            joined = labels[left] == labels[right]  # already one cluster: no need to verify
            left, right = left[~joined], right[~joined]
            agree = np.count_nonzero(sig[left] == sig[right], axis=1)
            edge = agree / num_perm >= threshold
            if edge.any():
                labels = join(n, left[edge], right[edge], labels)
    return labels
