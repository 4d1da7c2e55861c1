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

    def without(self, value: Any) -> Choice:
        """This distribution with ``value`` removed (the other weights keep their proportions)."""
        keep = [i for i, v in enumerate(self.values) if v != value]
        if not keep:
            raise ValueError(f"no value is left once {value!r} is excluded from {list(self.values)}")
        weights = [self.weights[i] for i in keep] if self.weights is not None else None
        return Choice([self.values[i] for i in keep], weights)


@dataclass(frozen=True)
class PlaceholderSpace:
    """Named distributions sampled in a fixed (sorted) order, so a seed gives one answer.

    ``distinct``: pairs of placeholders that never take the same value (bitext's source and target
    language): the later one in sorted order is drawn from its distribution without the earlier one's value.
    """

    choices: Mapping[str, Choice] = field(default_factory=dict)
    distinct: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for pair in self.distinct:
            if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(self.choices):
                raise ValueError(f"distinct pair {pair} must name two placeholders of {sorted(self.choices)}")

    def merged(self, overrides: Mapping[str, Choice] | None = None) -> dict[str, Choice]:
        """The distributions with ``overrides`` in place (names this space lacks are ignored)."""
        return {**self.choices, **{k: v for k, v in (overrides or {}).items() if k in self.choices}}

    def sample(self, rng: random.Random, overrides: Mapping[str, Choice] | None = None) -> dict[str, Any]:
        merged = self.merged(overrides)
        values: dict[str, Any] = {}
        for name in sorted(merged):
            choice = merged[name]
            for other in self.differs_from(name):
                if other in values:
                    choice = choice.without(values[other])
            values[name] = choice.sample(rng)
        return values

    def differs_from(self, name: str) -> list[str]:
        """The placeholders that ``name`` must differ from."""
        return [b if a == name else a for a, b in self.distinct if name in (a, b)]

    def describe(self) -> dict[str, list]:
        described = {name: self.choices[name].describe() for name in sorted(self.choices)}
        if self.distinct:  # a constraint changes the distribution, so it is part of the prompt version
            described["distinct"] = [list(pair) for pair in self.distinct]
        return described
