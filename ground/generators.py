"""A mix of generator models: which endpoint serves which model, and which model writes which example.

``llm.endpoints`` lists ``{url, model}`` pairs; the old settings (``llm.base_url`` / ``llm.base_urls`` with
``llm.model``) are read as that list with one model, so every run goes through one code path
(``Settings.llm_endpoints``). ``llm.mix`` weighs the served models (default: in proportion to the endpoints
each has), ``llm.mix_by_task_type`` replaces the weights for a task type. :func:`assign` gives each of a
round's requests of one type a model: exact quotas by weight (largest remainder), shuffled by the run's
seed, so the ratio holds in every round and a model's rows are not tied to a position in the plan.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field


class LLMEndpoint(BaseModel):
    """One OpenAI-compatible endpoint and the model name it serves (what requests ask for, and what rows record)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(min_length=1)
    model: str = Field(min_length=1)


def served_models(endpoints: Sequence[LLMEndpoint]) -> list[str]:
    """The distinct models of ``endpoints``, in the order they are first listed."""
    return list(dict.fromkeys(e.model for e in endpoints))


def check_weights(where: str, weights: Mapping[str, float], models: Sequence[str]) -> None:
    """Weights name served models, none is negative or not finite, and they do not all vanish; else ValueError."""
    unknown = sorted(set(weights) - set(models))
    if unknown:
        raise ValueError(
            f"{where} names {', '.join(unknown)}, which no endpoint serves (llm.endpoints serve: {', '.join(models)})"
        )
    bad = {m: w for m, w in weights.items() if not (math.isfinite(w) and w >= 0)}
    if bad:
        raise ValueError(f"{where}: weights must be 0 or more, not {', '.join(f'{m} = {w}' for m, w in bad.items())}")
    if weights and not sum(weights.values()) > 0:
        raise ValueError(f"{where}: the weights add up to 0; at least one model needs a positive weight")


def mix_weights(
    endpoints: Sequence[LLMEndpoint],
    mix: Mapping[str, float],
    by_type: Mapping[str, Mapping[str, float]],
    task_type: str,
) -> dict[str, float]:
    """The weight of each served model for ``task_type``: its per-type weights, else ``mix``, else in
    proportion to the endpoints serving it; a model a given table leaves out weighs 0."""
    models = served_models(endpoints)
    chosen = by_type.get(task_type) or mix
    if not chosen:
        return {m: float(sum(e.model == m for e in endpoints)) for m in models}
    return {m: float(chosen.get(m, 0.0)) for m in models}


def quotas(weights: Mapping[str, float], n: int) -> dict[str, int]:
    """``n`` split by ``weights`` in whole rows (largest remainder; ties to the model listed first)."""
    whole = sum(weights.values())
    exact = {m: n * w / whole for m, w in weights.items()}
    counts = {m: math.floor(x) for m, x in exact.items()}
    order = sorted(weights, key=lambda m: -(exact[m] - counts[m]))
    for m in order[: n - sum(counts.values())]:
        counts[m] += 1
    return counts


def assign(weights: Mapping[str, float], n: int, rng: random.Random) -> list[str]:
    """A model for each of ``n`` requests: ``quotas`` of each, in an order shuffled by ``rng``."""
    if len(weights) == 1:
        return [next(iter(weights))] * n
    models = [m for m, k in quotas(weights, n).items() for _ in range(k)]
    rng.shuffle(models)
    return models
