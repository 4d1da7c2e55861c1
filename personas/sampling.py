"""Deterministic, seeded persona sampling: the same seed and pool give the same personas."""

from __future__ import annotations

import random
from collections.abc import Sequence

from personas.sources import Persona


class PersonaSampler:
    """Draws personas for brainstorm requests; ``draw(key)`` depends only on the pool, seed and key."""

    def __init__(self, pool: Sequence[Persona], seed: int):
        if not pool:
            raise ValueError("persona pool is empty")
        # order by id so the pool's file order does not change which persona a key gets
        self.pool = sorted(pool, key=lambda p: p.persona_id)
        self.seed = seed

    def draw(self, key: str) -> Persona:
        return random.Random(f"{self.seed}:{key}").choice(self.pool)

    def sample(self, n: int, key: str = "sample") -> list[Persona]:
        """``n`` distinct personas (all of them if the pool is smaller)."""
        rng = random.Random(f"{self.seed}:{key}")
        return rng.sample(self.pool, k=min(n, len(self.pool)))
