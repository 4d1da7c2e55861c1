"""MinHash signature matrices of texts' character shingles, hashed with numpy: the sketch step of near dedup.

A text's shingles are its substrings of ``k`` characters (the whole text when it is shorter). Each
shingle's UTF-8 bytes are hashed with the 64-bit byte hash ``rensa`` 0.5 applies to ``str`` tokens
(an FxHash-style fold, :func:`shingle_hashes`), computed over a whole batch of texts at once from one
byte buffer, and ``rensa``'s ``RMinHash.digest_matrix_from_flat_token_hashes`` turns the flat hashes
into the (texts, num_perm) uint32 matrix. So the signatures are exactly those of
``RMinHash.from_token_sets`` over the shingle strings (a test holds the hash to ``rensa``'s), without a
Python string per shingle: shingling was most of near dedup's time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from rensa import RMinHash

#: MinHash seed; fixed, so results do not depend on anything but the data and the settings
MINHASH_SEED = 20240501
#: characters shingled per batch (bounds the per-shingle arrays: ~100 bytes per character)
BATCH_CHARS = 1_000_000

_M32 = np.uint64(0xFFFFFFFF)
_K = np.uint64(0xF1357AEA2E62A9C5)
_SEED1, _SEED2 = np.uint64(0x243F6A8885A308D3), np.uint64(0x13198A2E03707344)
_ZERO_GUARD = np.uint64(0xA4093822299F31D0)


def _mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Low xor high 64 bits of the 128-bit products x * y (uint64 arrays), from 32-bit halves."""
    s32 = np.uint64(32)
    xl, xh, yl, yh = x & _M32, x >> s32, y & _M32, y >> s32
    ll, lh, hl, hh = xl * yl, xl * yh, xh * yl, xh * yh
    mid = (ll >> s32) + (lh & _M32) + (hl & _M32)
    low = (ll & _M32) | (mid << s32)
    high = hh + (lh >> s32) + (hl >> s32) + (mid >> s32)
    return low ^ high


def _read(padded: np.ndarray, at: np.ndarray, width: int) -> np.ndarray:
    """Little-endian unsigned integers of ``width`` bytes (4 or 8) starting at byte offsets ``at``."""
    # an unaligned view with a stride of one byte: element i is the integer at byte i
    view = np.ndarray((len(padded) - width + 1,), dtype=f"<u{width}", buffer=padded, strides=(1,))
    return view[at].astype(np.uint64)


def _hash_spans(data: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """The 64-bit hash of each byte span ``data[start:start + length]`` (uint64)."""
    padded = np.concatenate([data, np.zeros(16, dtype=np.uint8)])
    s0 = np.full(len(start), _SEED1, dtype=np.uint64)
    s1 = np.full(len(start), _SEED2, dtype=np.uint64)
    with np.errstate(over="ignore"):
        tiny = (length > 0) & (length < 4)
        if tiny.any():
            at, n = start[tiny], length[tiny]
            s0[tiny] ^= padded[at].astype(np.uint64)
            s1[tiny] ^= (padded[at + n - 1].astype(np.uint64) << np.uint64(8)) | padded[at + n // 2]
        for low, high, width in ((4, 8, 4), (8, 17, 8)):
            sel = (length >= low) & (length < high)
            at, n = start[sel], length[sel]
            s0[sel] ^= _read(padded, at, width)
            s1[sel] ^= _read(padded, at + n - width, width)
        long = np.flatnonzero(length > 16)
        if len(long):
            at, n = start[long], length[long]
            a0, a1, off = s0[long], s1[long], np.zeros(len(long), dtype=np.int64)
            while (active := off < n - 16).any():
                t = _mix(a0 ^ _read(padded, at + off, 8), _ZERO_GUARD ^ _read(padded, at + off + 8, 8))
                a0, a1 = np.where(active, a1, a0), np.where(active, t, a1)
                off += 16 * active
            s0[long] = a0 ^ _read(padded, at + n - 16, 8)
            s1[long] = a1 ^ _read(padded, at + n - 8, 8)
        folded = (_mix(s0, s1) ^ length.astype(np.uint64)) * _K
    return (folded << np.uint64(26)) | (folded >> np.uint64(38))


def shingle_hashes(texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(flat uint64 hashes of every text's k-character shingles, uint64 row offsets: len(texts) + 1)."""
    data = np.frombuffer("".join(texts).encode("utf-8"), dtype=np.uint8)
    char_bytes = np.flatnonzero((data & 0xC0) != 0x80)  # byte offset of every character
    char_bytes = np.append(char_bytes, len(data))
    chars = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    first_char = np.cumsum(chars) - chars
    counts = np.maximum(chars - k + 1, 1)  # a text of <= k characters is one shingle
    offsets = np.concatenate([[0], np.cumsum(counts)])
    starts = np.repeat(first_char, counts) + np.arange(offsets[-1]) - np.repeat(offsets[:-1], counts)
    ends = np.minimum(starts + k, np.repeat(first_char + chars, counts))
    byte_start = char_bytes[starts]
    spans = _hash_spans(data, byte_start, char_bytes[ends] - byte_start)
    return spans, offsets.astype(np.uint64)


def _batches(texts: Sequence[str] | pa.Array) -> list[tuple[int, int]]:
    """(start, stop) ranges of about :data:`BATCH_CHARS` characters."""
    if isinstance(texts, pa.Array):
        lengths = pc.fill_null(pc.utf8_length(texts), 0).to_numpy(zero_copy_only=False)
    else:
        lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    ends = np.cumsum(lengths + 1)
    cuts = np.searchsorted(ends, np.arange(BATCH_CHARS, ends[-1] if len(ends) else 0, BATCH_CHARS), side="right")
    bounds = np.unique(np.concatenate([[0], cuts, [len(lengths)]]))
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))


def signatures(texts: Sequence[str] | pa.Array, num_perm: int, shingle_size: int) -> np.ndarray:
    """The (len(texts), num_perm) uint32 MinHash matrix of the texts' character shingles."""
    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    for start, stop in _batches(texts):
        chunk = texts[start:stop]
        chunk = chunk.to_pylist() if isinstance(chunk, pa.Array) else chunk
        flat, offsets = shingle_hashes(chunk, shingle_size)
        matrix = RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets, num_perm=num_perm, seed=MINHASH_SEED)
        out[start:stop] = np.asarray(matrix.to_rows(), dtype=np.uint32)
    return out
