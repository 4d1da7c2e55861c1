"""Semantic instruction dedup: instructions of one task type closer than a threshold are one intent.

Greedy clustering in brainstorm order: an instruction joins the first earlier intent (its first
instruction) whose cosine is at or above ``generation.intent_threshold``, else it starts a new intent;
deterministic, O(instructions x intents). Adding later rounds never changes earlier assignments, so a
resumed run assigns the same intents. ``encode`` is any text → L2-normalised rows function
(``llm/embedder.py`` through the embedding cache of ``storage/embedding_cache.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Encode = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class Intents:
    """Per instruction (input order): its intent number within its task type and its nearest-neighbour cosine."""

    intent: list[int]
    nearest: list[float | None]  # cosine to the most similar other instruction of its type (None: alone)


def cluster_intents(task_types: Sequence[str], vectors: np.ndarray, threshold: float) -> Intents:
    """Greedy intents per task type over rows in order (see the module docstring)."""
    intent = [0] * len(task_types)
    nearest: list[float | None] = [None] * len(task_types)
    by_type: dict[str, list[int]] = {}
    for i, t in enumerate(task_types):
        by_type.setdefault(t, []).append(i)
    for rows in by_type.values():
        vecs = vectors[rows]
        sims = vecs @ vecs.T
        np.fill_diagonal(sims, -np.inf)
        heads: list[int] = []  # position (within the type) of each intent's first instruction
        for k in range(len(rows)):
            joined = next((j for j, h in enumerate(heads) if sims[k, h] >= threshold), None)
            if joined is None:
                heads.append(k)
                joined = len(heads) - 1
            intent[rows[k]] = joined
            if len(rows) > 1:
                nearest[rows[k]] = float(sims[k].max())
    return Intents(intent, nearest)


def intent_summary(task_types: Sequence[str], intent_ids: Sequence[str | None], nearest: Sequence[float | None]):
    """Per task type: instructions, distinct intents, clusters of two or more, mean nearest-neighbour cosine."""
    out: dict[str, dict[str, float | int | None]] = {}
    for t in sorted(set(task_types)):
        rows = [i for i, x in enumerate(task_types) if x == t]
        sizes: dict[str | None, int] = {}
        for i in rows:
            sizes[intent_ids[i]] = sizes.get(intent_ids[i], 0) + 1
        sims = [nearest[i] for i in rows if nearest[i] is not None]
        out[t] = {
            "instructions": len(rows),
            "intents": len(sizes),
            "clusters": sum(1 for n in sizes.values() if n > 1),
            "mean_nn_similarity": round(float(np.mean(sims)), 4) if sims else None,
        }
    return out
