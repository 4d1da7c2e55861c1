"""Semantic instruction dedup: instructions of one task type closer than a threshold are one intent.

Greedy clustering in brainstorm order: an instruction joins the first earlier intent (its first
instruction) whose cosine is at or above ``generation.intent_threshold``, else it starts a new intent;
deterministic; O(instructions x intents) time, O(block x intents) memory. Adding later rounds never changes
earlier assignments, so a resumed run assigns the same intents. ``encode`` is any text → L2-normalised rows function
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


BLOCK = 1024  # instructions compared at once: memory O(BLOCK x intents), never instructions x instructions


def cluster_intents(task_types: Sequence[str], vectors: np.ndarray, threshold: float, block: int = BLOCK) -> Intents:
    """Greedy intents per task type over rows in order (see the module docstring).

    Blockwise: a block of instructions is scored against the intents so far in one product; an instruction
    that joins none is then compared, in order, with the intents started earlier in its own block. Memory
    stays O(block x intents) and the loop in Python runs once per new intent, so 40k instructions take
    seconds (the all-pairs matrix of 400k would not fit in memory).
    """
    intent = [0] * len(task_types)
    nearest: list[float | None] = [None] * len(task_types)
    by_type: dict[str, list[int]] = {}
    for i, t in enumerate(task_types):
        by_type.setdefault(t, []).append(i)
    for rows in by_type.values():
        vecs = np.ascontiguousarray(vectors[rows], dtype=np.float32)
        for k, (joined, near) in enumerate(zip(_greedy(vecs, threshold, block), _nearest(vecs, block), strict=True)):
            intent[rows[k]] = joined
            nearest[rows[k]] = near
    return Intents(intent, nearest)


def _greedy(vecs: np.ndarray, threshold: float, block: int) -> list[int]:
    """Per row: the first intent (in order of creation) whose head is at or above ``threshold``, else a new one."""
    heads = np.empty_like(vecs)  # the head vector of each intent, in order of creation
    count = 0
    joined: list[int] = []
    for start in range(0, len(vecs), block):
        chunk = vecs[start : start + block]
        first = np.full(len(chunk), -1)
        if count:
            hits = chunk @ heads[:count].T >= threshold
            first = np.where(hits.any(axis=1), hits.argmax(axis=1), -1)
        inner = chunk @ chunk.T
        local: list[int] = []  # positions in the chunk of the intents this chunk started
        for i in range(len(chunk)):
            if first[i] < 0:  # no earlier intent: the first of this chunk's own that it is close to
                close = np.flatnonzero(inner[i, local] >= threshold) if local else ()
                if len(close):
                    first[i] = count - len(local) + int(close[0])
                else:
                    heads[count] = chunk[i]
                    local.append(i)
                    first[i] = count
                    count += 1
        joined.extend(int(x) for x in first)
    return joined


def _nearest(vecs: np.ndarray, block: int) -> list[float | None]:
    """Per row: its cosine to the most similar other row (None when it is alone)."""
    if len(vecs) < 2:
        return [None] * len(vecs)
    out: list[float | None] = []
    for start in range(0, len(vecs), block):
        sims = vecs[start : start + block] @ vecs.T
        sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf
        out.extend(float(x) for x in sims.max(axis=1))
    return out


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
