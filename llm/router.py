"""Spread LLM requests over several OpenAI-compatible endpoints (vLLM replicas) and route around failures.

:class:`EndpointRouter` is plain bookkeeping with no I/O, so it is cheap to test: the client asks it
for a :class:`Lease` on an endpoint, sends the request there, and reports how it went.

* **Least in flight**: a lease goes to the endpoint in rotation with the fewest requests in flight;
  ties go round-robin, so sequential requests alternate too.
* **Take-out**: an endpoint failure (connection refused or reset, timeout, 5xx) takes the endpoint out
  of rotation for a cool-down; the client sends the failed request to another endpoint. Requests that
  were already in flight there and fail afterwards belong to the same outage and change nothing.
* **Cool-down and return**: when the cool-down is over, one request at a time is let through (a
  probe). A probe that gets an answer puts the endpoint back in rotation; a probe that fails takes it
  out again with twice the cool-down, up to ``max_cooldown_s``. A success resets the cool-down.
* **A lone endpoint is never taken out**: there is nowhere else to send its requests; the ``openai``
  client's own retries apply instead.

Taking out and returning are logged (warning / info), with the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class Endpoint:
    """One endpoint's state and counters (``requests``: leases given; ``answered`` + ``failed`` + released)."""

    url: str
    in_flight: int = 0
    requests: int = 0
    answered: int = 0
    failed: int = 0
    failures_in_row: int = 0  # consecutive take-outs without an answer in between: the cool-down exponent
    down_until: float | None = None  # None: in rotation; else out until then, after that on probation
    generation: int = 0  # bumped at each take-out; a lease from an older generation reports nothing new
    probing: bool = False  # a probe is in flight (only one at a time after a cool-down)
    reason: str = ""  # why it was last taken out
    taken_out: int = 0  # how many times

    @property
    def in_rotation(self) -> bool:
        return self.down_until is None


@dataclass(frozen=True)
class Lease:
    """The right to send one request to ``endpoint``; report it back exactly once."""

    endpoint: Endpoint
    generation: int
    probe: bool = False

    @property
    def url(self) -> str:
        return self.endpoint.url


@dataclass
class EndpointRouter:
    urls: Sequence[str]
    cooldown_s: float = 2.0
    max_cooldown_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    logger: logging.Logger | logging.LoggerAdapter = field(default=log)

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("at least one LLM endpoint is needed")
        if len(set(self.urls)) != len(self.urls):
            raise ValueError(f"LLM endpoints listed twice: {list(self.urls)}")
        if not 0 < self.cooldown_s <= self.max_cooldown_s:
            raise ValueError(f"need 0 < cooldown_s ({self.cooldown_s}) <= max_cooldown_s ({self.max_cooldown_s})")
        self.endpoints = [Endpoint(url) for url in self.urls]
        self._turn = 0  # round-robin start for ties

    def __len__(self) -> int:
        return len(self.endpoints)

    # --- choosing -------------------------------------------------------------------------------
    def acquire(self) -> Lease | None:
        """A lease on the least-loaded usable endpoint, or None while every endpoint is out (or probed)."""
        now = self.clock()
        n = len(self.endpoints)
        best: Endpoint | None = None
        for k in range(n):
            e = self.endpoints[(self._turn + k) % n]
            if not (e.in_rotation or (now >= e.down_until and not e.probing)):
                continue
            if best is None or e.in_flight < best.in_flight:
                best = e
        if best is None:
            return None
        self._turn = (self._turn + 1) % n
        probe = not best.in_rotation
        if probe:
            best.probing = True
            self.logger.info("LLM endpoint %s: cool-down over, trying it again", best.url)
        best.in_flight += 1
        best.requests += 1
        return Lease(best, best.generation, probe)

    def retry_in(self) -> float:
        """Seconds until an endpoint out of rotation may be tried again (0: one may be tried now)."""
        now = self.clock()
        waits = [max(0.0, e.down_until - now) for e in self.endpoints if not e.in_rotation and not e.probing]
        return min(waits) if waits else self.cooldown_s  # only probes in flight: their answer decides

    # --- reporting ------------------------------------------------------------------------------
    def answered(self, lease: Lease) -> None:
        """The endpoint answered (any HTTP response that is not a 5xx): it is alive."""
        e = self._release(lease)
        e.answered += 1
        if lease.generation != e.generation:
            return  # acquired before the last take-out: says nothing about the endpoint now
        if not e.in_rotation:
            self.logger.info(
                "LLM endpoint %s is back in rotation (out %d time(s); last: %s)", e.url, e.taken_out, e.reason
            )
            e.down_until = None
        e.failures_in_row = 0

    def failed(self, lease: Lease, reason: str) -> None:
        """The endpoint failed this request (connection error, timeout, 5xx): take it out of rotation."""
        e = self._release(lease)
        e.failed += 1
        if lease.generation != e.generation or len(self.endpoints) == 1:
            return  # already out for this outage, or nowhere else to go
        e.failures_in_row += 1
        cooldown = min(self.max_cooldown_s, self.cooldown_s * 2 ** (e.failures_in_row - 1))
        e.down_until = self.clock() + cooldown
        e.generation += 1
        e.reason = reason
        e.taken_out += 1
        left = sum(x.in_rotation for x in self.endpoints)
        self.logger.warning(
            "LLM endpoint %s out of rotation for %.1fs after: %s (%d of %d endpoints in rotation)",
            e.url,
            cooldown,
            reason,
            left,
            len(self.endpoints),
        )

    def release(self, lease: Lease) -> None:
        """The request ended without saying anything about the endpoint (e.g. it was cancelled)."""
        self._release(lease)

    def _release(self, lease: Lease) -> Endpoint:
        e = lease.endpoint
        e.in_flight -= 1
        if lease.probe and lease.generation == e.generation:
            e.probing = False
        return e

    # --- reporting to people --------------------------------------------------------------------
    def down_message(self) -> str:
        """One line for the case where no endpoint can take a request."""
        now = self.clock()
        parts = []
        for e in self.endpoints:
            if e.in_rotation:
                state = "in rotation"
            elif e.probing:
                state = f"{e.reason}; being probed"
            else:
                state = f"{e.reason}; next try in {max(0.0, e.down_until - now):.0f}s"
            parts.append(f"{e.url} ({state})")
        return f"all {len(self.endpoints)} LLM endpoints are out of rotation: " + ", ".join(parts)

    def snapshot(self) -> dict[str, dict[str, int | bool]]:
        """Per-endpoint counters, e.g. for a run summary or a test."""
        return {
            e.url: {
                "requests": e.requests,
                "answered": e.answered,
                "failed": e.failed,
                "in_flight": e.in_flight,
                "taken_out": e.taken_out,
                "in_rotation": e.in_rotation,
            }
            for e in self.endpoints
        }
