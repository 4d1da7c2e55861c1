"""Async client for an OpenAI-compatible server (vLLM) that returns schema-valid JSON or a reason.

Bounded in-flight requests (one semaphore shared by every shard of a flow run), per-request
timeouts, and transport retries with exponential backoff and jitter on 408/409/429/5xx, timeouts
and connection errors, at most ``max_retries`` — done by the request path (``llm.client``: ``llm/wire_lean.py``,
the default, or the ``openai`` SDK, ``llm/wire_openai.py``; both word failures alike, ``llm/wire.py``). On top,
an output that fails schema validation, or a 200 whose body is no chat completion (cut short, not
JSON), is asked again, at most ``schema_retries`` times; an answer cut at ``max_tokens`` only with twice
the tokens, up to ``Sampling.max_tokens_ceiling`` (never again at the same limit). Every HTTP attempt is
counted, so ``ClientStats`` reports transport failures and retries, not only outcomes. The lean path checks
answers with compiled schema checks (``llm/answers.py``), the same verdicts and error words as jsonschema's.

Several endpoints (``base_url`` given as a list): each try goes to the endpoint with the fewest
requests in flight (``llm/router.py``); a connection error, timeout or 5xx takes that endpoint
out of rotation for a cool-down and the request goes to another endpoint, at most ``max_retries + 1``
tries in all (the request path's own retries are off then). When every endpoint is out, a try
waits at most one longest cool-down, then the request fails with a line naming every endpoint.

A mix of models (``models``: the one each endpoint serves, ``llm.endpoints``): ``complete_json(..., model=)``
asks that model, on its endpoints only; without it, the client's ``model`` (the first endpoint's).

A hung endpoint costs seconds, not a request timeout (``llm/fleet_watch.py``: silent endpoints out, their
requests elsewhere; re-admission only by health probe and canary). A request in flight longer than the
fleet's ``hedge_quantile`` latency is also sent to a second endpoint (for at most ``hedge_max_share`` of the
requests): the first answer wins, the other copy is cancelled, and its tokens are counted as the answer's
(an upper bound) so the ledger carries the cost.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import httpx

from ground.secrets import reveal
from ground.settings import Settings
from llm.answers import parse_answer
from llm.fleet_watch import FleetWatch
from llm.outcomes import AllEndpointsDown, ClientStats, Completion, RequestFailed, Sampling
from llm.router import EndpointRouter, Lease
from llm.router import log as router_log
from llm.wire import THROTTLED, Answer, BadBody, ConnectFailure, StatusFailure, TimeoutFailure
from llm.wire_lean import LeanWire
from prompts.render import OutputInvalid, RenderedPrompt, parse_output

__all__ = ["AllEndpointsDown", "ClientStats", "Completion", "LLMClient", "RequestFailed", "Sampling"]

#: answers the fleet must have given before its tail quantile is trusted to hedge against (a p95 of fewer is noise)
HEDGE_MIN_ANSWERS = 200
#: the request paths: ``llm/wire_lean.py`` (aiohttp, orjson, compiled answer checks) and the ``openai`` SDK's
#: (imported only when chosen: the SDK takes seconds to import)
CLIENTS = ("lean", "openai")


class LLMClient:
    """One per flow run; safe to share across the concurrent shard tasks of that run's event loop."""

    @classmethod
    def from_settings(
        cls, settings: Settings, logger: logging.Logger | logging.LoggerAdapter | None = None, **overrides: Any
    ) -> LLMClient:
        """The client for the configured endpoint(s): several get least-in-flight routing (per model)."""
        llm = settings.llm
        endpoints = overrides.pop("endpoints", None) or settings.llm_endpoints
        options: dict[str, Any] = dict(
            base_url=[e.url for e in endpoints],
            models=[e.model for e in endpoints],
            model=settings.llm_model,
            api_key=reveal(llm.api_key),
            max_in_flight=llm.max_in_flight,
            timeout_s=llm.request_timeout_s,
            max_retries=llm.max_retries,
            schema_retries=llm.schema_retries,
            send_seed=llm.send_seed,
            endpoint_cooldown_s=llm.endpoint_cooldown_s,
            endpoint_max_cooldown_s=llm.endpoint_max_cooldown_s,
            probe_timeout_s=llm.probe_timeout_s,
            canary_timeout_s=llm.canary_timeout_s,
            silent_after_p99=llm.silent_after_p99,
            hedge_quantile=llm.hedge_quantile,
            hedge_max_share=llm.hedge_max_share,
            client=llm.client,
            logger=logger,
        )
        if "base_url" in overrides:  # URLs given without their models: all serve the settings' model
            options.pop("models")
        return cls(**{**options, **overrides})

    def __init__(
        self,
        base_url: str | Sequence[str],
        model: str,
        api_key: str = "EMPTY",
        max_in_flight: int = 16,
        timeout_s: float = 180.0,
        max_retries: int = 4,
        schema_retries: int = 2,
        send_seed: bool = False,
        http_client: httpx.AsyncClient | None = None,  # tests inject a mock transport here
        endpoint_cooldown_s: float = 2.0,
        endpoint_max_cooldown_s: float = 60.0,
        probe_timeout_s: float = 5.0,
        canary_timeout_s: float = 60.0,
        silent_after_p99: float = 2.0,
        hedge_quantile: float = 0.95,
        hedge_max_share: float = 0.03,
        client: Literal["lean", "openai"] = "lean",  # the request path (``llm.client``)
        logger: logging.Logger | logging.LoggerAdapter | None = None,
        models: Sequence[str] = (),  # the model each of ``base_url`` serves; empty: all serve ``model``
    ):
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if client not in CLIENTS:
            raise ValueError(f"llm.client must be one of {', '.join(CLIENTS)}, not {client!r}")
        models = list(models) or [model] * len(urls)
        if model not in models:  # the default model must be served somewhere
            model = models[0]
        self.router = EndpointRouter(
            urls,
            endpoint_cooldown_s,
            endpoint_max_cooldown_s,
            logger=logger or router_log,
            readmit_by_probe=True,
            models=models,
        )
        self.watch = FleetWatch(
            self.router,
            model,
            api_key,
            silent_fallback_s=timeout_s,
            silent_after_p99=silent_after_p99,
            probe_timeout_s=probe_timeout_s,
            canary_timeout_s=canary_timeout_s,
        )
        self._hedge_quantile, self._hedge_max_share = hedge_quantile, hedge_max_share
        self.model = model
        self.models = list(dict.fromkeys(models))  # the served models, in endpoint order
        self.base_url = urls[0]
        self.schema_retries = schema_retries
        self.send_seed = send_seed
        self._slots = asyncio.Semaphore(max_in_flight)
        self.stats = ClientStats()
        # several endpoints: the router retries elsewhere (one try per send), at most max_retries + 1 tries in all
        self._tries = max_retries + 1
        self._routing = len(urls) > 1
        if client == "openai":
            from llm.wire_openai import OpenAIWire as wire
        else:
            wire = LeanWire
        self._wire = wire(
            urls, model, api_key, timeout_s, max_retries, max_in_flight, self.stats, send_seed, http_client
        )
        self._parse = parse_answer if client == "lean" else parse_output

    async def close(self) -> None:
        await self.watch.close()
        await self._wire.close()

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def complete_json(
        self, prompt: RenderedPrompt, sampling: Sampling, seed: int, model: str | None = None
    ) -> Completion:
        """Ask ``model`` (default: the client's) until the output validates against ``prompt.schema``; raise
        ``RequestFailed`` otherwise."""
        model = model or self.model
        if model not in self.models:
            raise ValueError(f"no LLM endpoint serves {model!r} (served: {', '.join(self.models)})")
        usage_prompt = usage_completion = 0
        last_text: str | None = None
        last_finish: str | None = None
        last_reason = ""
        started = time.monotonic()
        for attempt in range(1, self.schema_retries + 2):
            # a new seed per attempt, so a retry is not the same bad sample again
            attempt_seed = seed + 1_000_003 * (attempt - 1)
            try:
                answer, copies = await self._create(prompt, sampling, attempt_seed, model)
            except AllEndpointsDown as exc:
                self._count_failure()
                raise RequestFailed(str(exc), attempt) from None
            except StatusFailure as exc:
                self._count_failure()
                raise RequestFailed(f"http {exc.status}: {_short(exc.message)}", attempt) from None
            except TimeoutFailure:
                self._count_failure()
                raise RequestFailed("timeout after retries", attempt) from None
            except ConnectFailure as exc:
                self._count_failure()
                raise RequestFailed(f"connection error after retries: {_short(exc.detail)}", attempt) from None
            except BadBody as exc:  # a 2xx whose body is no chat completion (not retried by the wire): ask again
                self.stats.invalid_bodies += 1
                last_reason = f"invalid response body: {_short(str(exc))}"
                last_text = last_finish = None
                continue
            self.stats.http_ok += 1
            last_text, last_finish = answer.content, answer.finish_reason
            if answer.usage:  # a hedged request: the cancelled copy is counted as costly as the answer
                prompt_tokens, completion_tokens, total_tokens = answer.usage
                usage_prompt += copies * prompt_tokens
                usage_completion += copies * completion_tokens
                self.stats.prompt_tokens += copies * prompt_tokens
                self.stats.completion_tokens += copies * completion_tokens
                self.stats.hedge_tokens += (copies - 1) * total_tokens
            try:
                parsed = self._parse(last_text, prompt.schema)
            except OutputInvalid as exc:
                last_reason = f"invalid output ({last_finish}): {_short(str(exc))}"
                if last_finish == "length":  # cut short: ask again only with more room
                    grown = min(2 * sampling.max_tokens, sampling.max_tokens_ceiling or sampling.max_tokens)
                    if grown <= sampling.max_tokens:
                        last_reason = (
                            f"truncated at max_tokens {sampling.max_tokens} (no more room): {_short(str(exc))}"
                        )
                        self.stats.truncated += 1
                        break
                    sampling = replace(sampling, max_tokens=grown)
                if attempt <= self.schema_retries:
                    self.stats.schema_retries += 1
                continue
            self.stats.succeeded += 1
            return Completion(
                parsed=parsed,
                text=last_text,
                finish_reason=last_finish,
                prompt_tokens=usage_prompt,
                completion_tokens=usage_completion,
                latency_s=time.monotonic() - started,
                attempts=attempt,
            )
        self._count_failure()
        raise RequestFailed(last_reason, attempt, last_text, last_finish)

    async def _create(self, prompt: RenderedPrompt, sampling: Sampling, seed: int, model: str) -> tuple[Answer, int]:
        """The answer and how many copies of the request were sent for it (2 when hedged)."""
        request = self._wire.prepare(prompt, sampling, seed, model)
        async with self._slots:
            self.stats.requests += 1
            self.stats.in_flight += 1
            try:
                if self._routing:
                    return await self._hedged(request, model)
                return await self._wire.send(request), 1
            finally:
                self.stats.in_flight -= 1

    async def _hedged(self, request: Any, model: str) -> tuple[Answer, int]:
        """The request on one endpoint; still in flight after the fleet's hedge quantile (and within the cap),
        a copy on another endpoint too: the first answer wins, the other copy is cancelled."""
        self.watch.start()
        where: list[str] = []
        after = self._hedge_after()
        if after is None:
            return await self._routed(request, where, model), 1
        first = asyncio.ensure_future(self._routed(request, where, model))
        second = None
        try:
            done, _ = await asyncio.wait((first,), timeout=after)
            lease = None if done or self._hedge_after() is None else self.router.acquire(avoid=where, model=model)
            if lease is None:
                return await first, 1
            self.stats.hedges += 1
            second = asyncio.ensure_future(self._routed(request, [], model, lease))
            pending: set[asyncio.Future] = {first, second}
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for copy in done:
                    if copy.exception() is None:
                        self.stats.hedges_won += copy is second
                        return copy.result(), 2
            return await first, 2  # both failed: the first copy's error
        finally:
            for copy in (first, second):
                if copy is not None and not copy.done():
                    copy.cancel()

    def _hedge_after(self) -> float | None:
        """Seconds after which a request is hedged; None while hedging is off, capped or not yet informed."""
        if (self.stats.hedges + 1) > self._hedge_max_share * self.stats.requests:
            return None
        return self.router.quantile(self._hedge_quantile, HEDGE_MIN_ANSWERS)

    async def _routed(self, request: Any, where: list[str], model: str, lease: Lease | None = None) -> Answer:
        """Try the least-loaded endpoint in rotation; an endpoint failure sends the next try elsewhere.
        ``where`` is kept to the endpoint it waits on (a hedge avoids it); ``lease``: the first try's."""
        task = asyncio.current_task()
        for attempt in range(self._tries):
            last = attempt == self._tries - 1
            if lease is None:
                lease = await self._lease(model)
            where[:] = [lease.url]
            waiting = self.watch.waiting[lease.url]
            waiting.add(task)
            try:
                answer = await self._wire.send(request, lease.url)
            except asyncio.CancelledError:  # by the watch (the endpoint is silent: go elsewhere), or by its owner
                if not self.watch.was_moved(task) or task.uncancel() > 0:
                    self.router.release(lease)
                    raise
                self.stats.moved_off_silent += 1
                self._endpoint_failed(lease, "silent", TimeoutFailure("silent", "silent"), last, model)
            except StatusFailure as exc:
                if exc.status < 500:  # it answered: alive; busy (429 …) is asked again, anything else is final
                    self.router.answered(lease, latency=False)
                    if last or exc.status not in THROTTLED:
                        raise
                    await asyncio.sleep(_retry_delay(exc.headers, attempt))
                    continue
                self._endpoint_failed(lease, f"http {exc.status}", exc, last, model)
            except TimeoutFailure as exc:
                self._endpoint_failed(lease, "timeout", exc, last, model)
            except ConnectFailure as exc:  # refused, reset, cut short (some have no message: then their type)
                self._endpoint_failed(lease, _short(exc.detail, 80) or exc.kind, exc, last, model)
            except BadBody as exc:  # JSON without choices: the endpoint answered; not JSON: says nothing
                if exc.answered:
                    self.router.answered(lease)
                else:
                    self.router.release(lease)
                raise
            except BaseException:
                self.router.release(lease)
                raise
            else:
                self.router.answered(lease)
                return answer
            finally:
                waiting.discard(task)
            if self.router.alone(lease.endpoint):  # never taken out, nowhere else to go: back off, as one URL does
                await asyncio.sleep(_retry_delay({}, attempt))
            lease = None
            self.stats.failovers += 1
        raise AssertionError("unreachable")  # pragma: no cover

    def _endpoint_failed(self, lease: Lease, reason: str, exc: Exception, last: bool, model: str) -> None:
        """Take the endpoint out; on the last try re-raise, naming every endpoint of the model when none is left."""
        self.router.failed(lease, reason)
        if last:
            if not any(e.in_rotation for e in self.router.serving(model)):
                raise AllEndpointsDown(self.router.down_message(model)) from exc
            raise exc

    async def _lease(self, model: str) -> Lease:
        """A lease on an endpoint of ``model``; while all are out, wait at most one longest cool-down for one."""
        deadline = time.monotonic() + self.router.max_cooldown_s
        while (lease := self.router.acquire(model=model)) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AllEndpointsDown(self.router.down_message(model))
            await asyncio.sleep(min(max(self.router.retry_in(), 0.01), 0.5, remaining))
        return lease

    def _count_failure(self) -> None:
        self.stats.failed += 1


def _retry_delay(headers: Any, attempt: int) -> float:
    """The server's ``retry-after(-ms)`` if sane, else exponential backoff with jitter (0.5 s … 8 s)."""
    try:
        if "retry-after-ms" in headers:
            delay = float(headers["retry-after-ms"]) / 1000
        else:
            delay = float(headers["retry-after"])
        if 0 <= delay <= 60:
            return delay
    except (KeyError, ValueError):
        pass
    return min(8.0, 0.5 * 2**attempt) * random.uniform(0.75, 1.0)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
