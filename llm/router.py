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
  With ``readmit_by_probe`` (what ``LLMClient`` uses) no live request is let through: the client
  checks the endpoint with a health probe and a canary request (``due_for_probe``), then reports
  ``readmit`` or ``probe_failed`` (out again, twice as long).
* **Silent endpoints**: an endpoint with requests in flight that has answered nothing for a while
  (``silent``: the client compares it with the fleet's recent latencies, ``quantile``) is taken out
  as if a request had failed, while the other endpoints keep answering.
* **A lone endpoint is never taken out**: there is nowhere else to send its requests; the ``openai``
  client's own retries apply instead.
* **A mix of models** (``models``: the model each URL serves): a request for a model goes only to the
  endpoints serving it (``acquire(model=...)``), and "lone" means the only endpoint of its model.

Taking out and returning are logged (warning / info), with the reason; ``report_rows`` sums each
endpoint up (requests, failures, median and p99 latency, seconds out of rotation) for the run summary.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

#: answers kept per endpoint for its median / p99, and fleet-wide for the quantiles that steer hedging
ENDPOINT_LATENCIES = 20_000
FLEET_LATENCIES = 1_000
MIN_LATENCIES = 20  # fewer answers than this: no quantile yet

log = logging.getLogger(__name__)


@dataclass
class Endpoint:
    """One endpoint's state and counters (``requests``: leases given; ``answered`` + ``failed`` + released)."""

    url: str
    model: str = ""  # the model it serves ("" when the router was given none)
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
    out_since: float | None = None  # when it left rotation this time
    out_s: float = 0.0  # seconds out of rotation in earlier outages
    busy_since: float = 0.0  # when its in-flight count last rose from 0
    last_heard: float = 0.0  # when it last answered or failed (a cancelled request says nothing)
    latencies: deque = field(default_factory=lambda: deque(maxlen=ENDPOINT_LATENCIES))

    @property
    def in_rotation(self) -> bool:
        return self.down_until is None


@dataclass(frozen=True)
class Lease:
    """The right to send one request to ``endpoint``; report it back exactly once."""

    endpoint: Endpoint
    generation: int
    probe: bool = False
    started: float = 0.0

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
    readmit_by_probe: bool = False  # True: out-of-rotation endpoints get no live request (see the docstring)
    models: Sequence[str] = ()  # the model each of ``urls`` serves; empty: one model for all

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("at least one LLM endpoint is needed")
        if len(set(self.urls)) != len(self.urls):
            raise ValueError(f"LLM endpoints listed twice: {list(self.urls)}")
        if not 0 < self.cooldown_s <= self.max_cooldown_s:
            raise ValueError(f"need 0 < cooldown_s ({self.cooldown_s}) <= max_cooldown_s ({self.max_cooldown_s})")
        if self.models and len(self.models) != len(self.urls):
            raise ValueError(f"{len(self.models)} models for {len(self.urls)} LLM endpoints")
        served = self.models or [""] * len(self.urls)
        self.endpoints = [Endpoint(url, model) for url, model in zip(self.urls, served, strict=True)]
        self._turn = 0  # round-robin start for ties
        self._recent: deque[float] = deque(maxlen=FLEET_LATENCIES)  # latencies of the fleet's last answers
        self._sorted: list[float] = []  # ``_recent`` sorted, refreshed every few answers
        self._stale = 0  # answers recorded since ``_sorted`` was refreshed
        self._last_answer = 0.0  # when any endpoint last answered

    def __len__(self) -> int:
        return len(self.endpoints)

    # --- choosing -------------------------------------------------------------------------------
    def serving(self, model: str | None) -> list[Endpoint]:
        """The endpoints serving ``model`` (None: all)."""
        return [e for e in self.endpoints if model is None or e.model == model]

    def alone(self, e: Endpoint) -> bool:
        """Whether ``e`` is the only endpoint of its model: taking it out would leave its requests nowhere."""
        return sum(x.model == e.model for x in self.endpoints) == 1

    def acquire(self, avoid: Sequence[str] = (), model: str | None = None) -> Lease | None:
        """A lease on the least-loaded usable endpoint not in ``avoid`` (serving ``model`` when given), or None
        while none is usable."""
        now = self.clock()
        n = len(self.endpoints)
        best: Endpoint | None = None
        for k in range(n):
            e = self.endpoints[(self._turn + k) % n]
            if e.url in avoid or (model is not None and e.model != model):
                continue
            if not (e.in_rotation or (not self.readmit_by_probe and now >= e.down_until and not e.probing)):
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
        if best.in_flight == 0:
            best.busy_since = now
        best.in_flight += 1
        best.requests += 1
        return Lease(best, best.generation, probe, now)

    def retry_in(self) -> float:
        """Seconds until an endpoint out of rotation may be tried again (0: one may be tried now)."""
        now = self.clock()
        waits = [max(0.0, e.down_until - now) for e in self.endpoints if not e.in_rotation and not e.probing]
        return min(waits) if waits else self.cooldown_s  # only probes in flight: their answer decides

    # --- the fleet's own latencies ----------------------------------------------------------------
    def quantile(self, q: float, min_answers: int = MIN_LATENCIES) -> float | None:
        """The ``q`` quantile (0..1) of the fleet's recent answer latencies; None before ``min_answers``."""
        if len(self._recent) < min_answers:
            return None
        if len(self._sorted) != len(self._recent) or self._stale >= MIN_LATENCIES:
            self._sorted, self._stale = sorted(self._recent), 0
        return self._sorted[min(len(self._sorted) - 1, int(q * len(self._sorted)))]

    def silent(self, after_s: float) -> list[Endpoint]:
        """Endpoints in rotation with requests in flight that have not answered for ``after_s`` seconds,
        while another endpoint answered within that time (when all are slow, it is the work, not one endpoint)."""
        now = self.clock()
        if len(self.endpoints) == 1 or now - self._last_answer > after_s:
            return []
        return [
            e
            for e in self.endpoints
            if e.in_rotation and e.in_flight and now - max(e.busy_since, e.last_heard) > after_s and not self.alone(e)
        ]

    def take_out(self, e: Endpoint, reason: str) -> None:
        """Take ``e`` out of rotation now, as if a request had failed there (its in-flight leases go stale)."""
        self._take_out(e, reason)

    # --- re-admission by probe (``readmit_by_probe``) ----------------------------------------------
    def due_for_probe(self) -> list[Endpoint]:
        """Endpoints whose cool-down is over and that nobody probes yet; they are marked as being probed."""
        now = self.clock()
        due = [e for e in self.endpoints if not e.in_rotation and not e.probing and now >= e.down_until]
        for e in due:
            e.probing = True
        return due

    def readmit(self, e: Endpoint) -> None:
        """Its health probe and canary request succeeded: back in rotation."""
        e.probing = False
        e.failures_in_row = 0
        self._back(e, "its health probe and a canary request succeeded")

    def probe_failed(self, e: Endpoint, reason: str) -> None:
        """Its probe or canary failed: out again, for twice as long (logged at debug: the take-out said it)."""
        e.probing = False
        e.failures_in_row += 1
        e.down_until = self.clock() + self._cooldown(e)
        self.logger.debug("LLM endpoint %s: probe failed (%s); next probe in %.1fs", e.url, reason, self._cooldown(e))

    # --- reporting ------------------------------------------------------------------------------
    def answered(self, lease: Lease, latency: bool = True) -> None:
        """The endpoint answered (any HTTP response that is not a 5xx): it is alive. ``latency``: a full
        answer, whose latency counts (a 429 or 4xx says the endpoint is alive, not how fast it is)."""
        e = self._release(lease)
        e.answered += 1
        e.last_heard = self.clock()
        if latency:
            took = e.last_heard - lease.started
            e.latencies.append(took)
            self._recent.append(took)
            self._stale += 1
            self._last_answer = e.last_heard
        if lease.generation != e.generation:
            return  # acquired before the last take-out: says nothing about the endpoint now
        if not e.in_rotation:
            self._back(e, f"last: {e.reason}")
        e.failures_in_row = 0

    def _back(self, e: Endpoint, why: str) -> None:
        now = self.clock()
        out = now - (e.out_since or now)
        e.out_s += out
        e.down_until = e.out_since = None
        self.logger.info(
            "LLM endpoint %s is back in rotation after %.1fs out (out %d time(s); %s)", e.url, out, e.taken_out, why
        )

    def failed(self, lease: Lease, reason: str) -> None:
        """The endpoint failed this request (connection error, timeout, 5xx): take it out of rotation."""
        e = self._release(lease)
        e.failed += 1
        e.last_heard = self.clock()
        if lease.generation != e.generation or self.alone(e):
            return  # already out for this outage, or nowhere else to go
        self._take_out(e, reason)

    def _cooldown(self, e: Endpoint) -> float:
        return min(self.max_cooldown_s, self.cooldown_s * 2 ** (e.failures_in_row - 1))

    def _take_out(self, e: Endpoint, reason: str) -> None:
        e.failures_in_row += 1
        cooldown = self._cooldown(e)
        now = self.clock()
        e.down_until = now + cooldown
        if e.out_since is None:
            e.out_since = now
        e.generation += 1
        e.probing = False
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
    def down_message(self, model: str | None = None) -> str:
        """One line for the case where no endpoint (of ``model``, when given) can take a request."""
        now = self.clock()
        parts = []
        endpoints = self.serving(model)
        for e in endpoints:
            if e.in_rotation:
                state = "in rotation"
            elif e.probing:
                state = f"{e.reason}; being probed"
            else:
                state = f"{e.reason}; next try in {max(0.0, e.down_until - now):.0f}s"
            parts.append(f"{e.url} ({state})")
        of = f" of {model}" if model is not None and len(endpoints) < len(self.endpoints) else ""
        return f"all {len(endpoints)} LLM endpoints{of} are out of rotation: " + ", ".join(parts)

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

    def report_rows(self) -> list[dict[str, object]]:
        """One row per endpoint for a run's summary and artifact: requests, failures, median and p99
        latency of its answers (seconds), seconds out of rotation (the current outage included)."""
        now = self.clock()
        rows = []
        for e in self.endpoints:
            ordered = sorted(e.latencies)
            rows.append(
                {
                    "endpoint": e.url,
                    "model": e.model,
                    "requests": e.requests,
                    "failures": e.failed,
                    "median_latency_s": round(statistics.median(ordered), 3) if ordered else None,
                    "p99_latency_s": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3)
                    if ordered
                    else None,
                    "out_of_rotation_s": round(e.out_s + (now - e.out_since if e.out_since is not None else 0.0), 1),
                    "taken_out": e.taken_out,
                    "last_reason": e.reason,
                    "in_rotation": e.in_rotation,
                }
            )
        return rows
