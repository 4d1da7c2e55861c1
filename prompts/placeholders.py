"""Seeded placeholder distributions: the knobs (query type, length, language, ...) a prompt is filled with."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Choice:
    """A categorical distribution over values; weights default to uniform."""

    values: Sequence[Any]
    weights: Sequence[float] | None = None

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("a Choice needs at least one value")
        if self.weights is not None and len(self.weights) != len(self.values):
            raise ValueError("weights and values differ in length")

    def sample(self, rng: random.Random) -> Any:
        if self.weights is None:
            return rng.choice(list(self.values))
        return rng.choices(list(self.values), weights=list(self.weights), k=1)[0]

    def describe(self) -> list:
        return [list(self.values), list(self.weights) if self.weights else None]


@dataclass(frozen=True)
class PlaceholderSpace:
    """Named, independent distributions sampled in a fixed (sorted) order, so a seed gives one answer."""

    choices: Mapping[str, Choice] = field(default_factory=dict)

    def sample(self, rng: random.Random, overrides: Mapping[str, Choice] | None = None) -> dict[str, Any]:
        merged = {**self.choices, **{k: v for k, v in (overrides or {}).items() if k in self.choices}}
        return {name: merged[name].sample(rng) for name in sorted(merged)}

    def describe(self) -> dict[str, list]:
        return {name: self.choices[name].describe() for name in sorted(self.choices)}
