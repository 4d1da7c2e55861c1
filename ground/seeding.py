"""Stable per-item seeds, so a re-run (in any process) samples exactly what the first run did."""

from __future__ import annotations

import random
import zlib


def stable_seed(seed: int, key: str) -> int:
    """A 31-bit seed for ``key`` under the run seed (Python's ``hash`` is salted per process)."""
    return (zlib.crc32(f"{seed}:{key}".encode()) ^ seed) & 0x7FFFFFFF


def rng_for(seed: int, key: str) -> random.Random:
    return random.Random(stable_seed(seed, key))
