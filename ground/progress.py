"""A tiny progress sink: stages report finished requests; the CLI shows them as a rich progress bar.

Stages never know who listens: with no listener installed, reports cost a dict lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class ProgressListener(Protocol):
    def add_total(self, stage: str, n: int) -> None: ...

    def advance(self, stage: str, n: int = 1, ok: bool = True) -> None: ...


_listeners: list[ProgressListener] = []


def add_listener(listener: ProgressListener) -> Callable[[], None]:
    _listeners.append(listener)
    return lambda: _listeners.remove(listener)


def add_total(stage: str, n: int) -> None:
    for listener in _listeners:
        listener.add_total(stage, n)


def advance(stage: str, n: int = 1, ok: bool = True) -> None:
    for listener in _listeners:
        listener.advance(stage, n, ok)
