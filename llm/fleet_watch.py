"""The watch over a fleet of LLM endpoints: find a silent (hung) endpoint in seconds, re-admit by probe.

``LLMClient`` with several endpoints starts one :class:`FleetWatch` task on its event loop. Every tick:

* **Silent endpoints out**: an endpoint in rotation with requests in flight that has answered nothing for
  ``silent_after_p99`` × the fleet's recent p99 latency (at least a second; ``silent_fallback_s``, the request
  timeout, before the fleet's first answer), while other endpoints answered within that time, is taken
  out of rotation; the tasks waiting on it are cancelled and marked, and the client sends their requests
  to other endpoints as it does after a failure. A vLLM replica whose engine deadlocks or whose GPU
  wedges accepts connections and never answers: without this, each request sent there waits out its
  whole timeout.
* **Re-admission by probe**: an endpoint whose cool-down is over gets a health probe
  (``GET <url>/models`` within ``probe_timeout_s``) and then a one-token canary chat request (within
  ``canary_timeout_s``); both succeed: back in rotation; else out again for twice the cool-down. Live
  requests never test an endpoint that is out.

Probes use their own small HTTP client, so they never queue behind live traffic in the request pool and
are not counted as request attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx

from llm.router import Endpoint, EndpointRouter

MAX_TICK_S = 0.5
SILENT_MIN_S = 1.0  # never call an endpoint silent sooner: a stall of a moment is not a hang
SILENT_MIN_ANSWERS = 1  # the bound follows the fleet's answers from the first one on: a small first round that
# waits for a hung endpoint may have only a few (before any: the request timeout)


class FleetWatch:
    def __init__(
        self,
        router: EndpointRouter,
        model: str,
        api_key: str,
        *,
        silent_fallback_s: float,
        silent_after_p99: float = 2.0,
        probe_timeout_s: float = 5.0,
        canary_timeout_s: float = 60.0,
    ):
        self.router, self.model, self.api_key = router, model, api_key
        self.silent_fallback_s, self.silent_after_p99 = silent_fallback_s, silent_after_p99
        self.probe_timeout_s, self.canary_timeout_s = probe_timeout_s, canary_timeout_s
        #: the tasks waiting on each endpoint now (the client adds and removes them around each HTTP call)
        self.waiting: dict[str, set[asyncio.Task]] = {e.url: set() for e in router.endpoints}
        self._moved: set[asyncio.Task] = set()  # cancelled by the watch to move their request elsewhere
        self._task: asyncio.Task | None = None
        self._probes: set[asyncio.Task] = set()
        self._http: httpx.AsyncClient | None = None

    def start(self) -> None:
        """Start the watch on the running loop, unless it runs already (a no-op for a lone endpoint)."""
        if len(self.router) > 1 and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run(), name="llm-fleet-watch")

    def was_moved(self, task: asyncio.Task) -> bool:
        """Whether ``task`` was cancelled by the watch (and not by its owner); asking clears the mark."""
        if task in self._moved:
            self._moved.discard(task)
            return True
        return False

    async def close(self) -> None:
        for task in (self._task, *self._probes):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                    await task
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def silent_after_s(self) -> float:
        p99 = self.router.quantile(0.99, SILENT_MIN_ANSWERS)
        return max(SILENT_MIN_S, self.silent_after_p99 * p99) if p99 is not None else self.silent_fallback_s

    async def _run(self) -> None:
        while True:
            after = self.silent_after_s()
            await asyncio.sleep(max(0.01, min(MAX_TICK_S, self.router.cooldown_s / 2, after / 4)))
            self.check(after)

    def check(self, after_s: float) -> None:
        """One tick: take silent endpoints out (moving their requests), start probes of those due."""
        for e in self.router.silent(after_s):
            self.router.take_out(e, f"silent for {after_s:.1f}s with {e.in_flight} requests in flight")
            for task in list(self.waiting[e.url]):
                self._moved.add(task)
                task.cancel()
        for e in self.router.due_for_probe():
            probe = asyncio.get_running_loop().create_task(self._probe(e), name=f"llm-probe {e.url}")
            self._probes.add(probe)
            probe.add_done_callback(self._probes.discard)

    async def _probe(self, e: Endpoint) -> None:
        if self._http is None:
            self._http = httpx.AsyncClient(headers={"Authorization": f"Bearer {self.api_key}"})
        try:
            health = await self._http.get(f"{e.url}/models", timeout=self.probe_timeout_s)
            health.raise_for_status()
            canary = await self._http.post(
                f"{e.url}/chat/completions", json=self._canary(e.model or self.model), timeout=self.canary_timeout_s
            )
            canary.raise_for_status()
            if not canary.json().get("choices"):
                raise ValueError("the canary's answer has no choices")
        except (httpx.HTTPError, ValueError) as exc:
            self.router.probe_failed(e, f"{type(exc).__name__}: {exc}"[:120])
        else:
            self.router.readmit(e)

    def _canary(self, model: str) -> dict[str, Any]:
        return {"model": model, "messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 1}
