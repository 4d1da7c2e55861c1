"""Async client for an OpenAI-compatible server (vLLM) that returns schema-valid JSON or a reason.

Bounded in-flight requests (one semaphore shared by every shard of a flow run), per-request
timeouts, and transport retries with exponential backoff and jitter on 408/409/429/5xx, timeouts
and connection errors — those come from the ``openai`` client itself (``max_retries``). On top,
an output that fails schema validation, or a 200 whose body is no chat completion (cut short, not
JSON), is asked again, at most ``schema_retries`` times; an answer cut at ``max_tokens`` only with twice
the tokens, up to ``Sampling.max_tokens_ceiling`` (never again at the same limit). Every HTTP attempt is
counted (an httpx request hook), so ``ClientStats`` reports transport failures and retries, not only outcomes.

Several endpoints (``base_url`` given as a list): each try goes to the endpoint with the fewest
requests in flight (``llm/router.py``); a connection error, timeout or 5xx takes that endpoint
out of rotation for a cool-down and the request goes to another endpoint, at most ``max_retries + 1``
tries in all (the ``openai`` client's own retries are off then). When every endpoint is out, a try
waits at most one longest cool-down, then the request fails with a line naming every endpoint.

A hung endpoint costs seconds, not a request timeout (``llm/fleet_watch.py``: silent endpoints out, their
requests elsewhere; re-admission only by health probe and canary). A request in flight longer than the
fleet's ``hedge_quantile`` latency is also sent to a second endpoint (for at most ``hedge_max_share`` of the
requests): the first answer wins, the other copy is cancelled, and its tokens are counted as the answer's
(an upper bound) so the ledger carries the cost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import httpx
import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion

from ground.secrets import reveal
from ground.settings import Settings
from llm.fleet_watch import FleetWatch
from llm.outcomes import AllEndpointsDown, ClientStats, Completion, RequestFailed, Sampling
from llm.router import EndpointRouter, Lease
from llm.router import log as router_log

__all__ = ["AllEndpointsDown", "ClientStats", "Completion", "LLMClient", "RequestFailed", "Sampling"]
from prompts.render import OutputInvalid, RenderedPrompt, parse_output

#: statuses that mean "busy, ask again" rather than "this endpoint is broken"
_THROTTLED = (408, 409, 429)
#: answers the fleet must have given before its tail quantile is trusted to hedge against (a p95 of fewer is noise)
HEDGE_MIN_ANSWERS = 200


def _new_pool(max_in_flight: int) -> httpx.AsyncClient:
    """An HTTP pool with a connection for every request in flight: the openai client's default pool stops at
    1,000 connections, which would cap a large fleet's ``llm.max_in_flight`` below what is configured."""
    limits = httpx.Limits(max_connections=max_in_flight + 16, max_keepalive_connections=max_in_flight)
    return openai.DefaultAsyncHttpxClient(limits=limits)


class LLMClient:
    """One per flow run; safe to share across the concurrent shard tasks of that run's event loop."""

    @classmethod
    def from_settings(
        cls, settings: Settings, logger: logging.Logger | logging.LoggerAdapter | None = None, **overrides: Any
    ) -> LLMClient:
        """The client for the configured endpoint(s): several ``base_urls`` get least-in-flight routing."""
        llm = settings.llm
        options: dict[str, Any] = dict(
            base_url=settings.llm_base_urls,
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
            logger=logger,
        )
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
        logger: logging.Logger | logging.LoggerAdapter | None = None,
    ):
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        self.router = EndpointRouter(
            urls, endpoint_cooldown_s, endpoint_max_cooldown_s, logger=logger or router_log, readmit_by_probe=True
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
        self.base_url = base_url = urls[0]
        self.schema_retries = schema_retries
        self.send_seed = send_seed
        self._slots = asyncio.Semaphore(max_in_flight)
        self.stats = ClientStats()
        self._client = AsyncOpenAI(
            base_url=base_url,
            api_key=api_key,
            timeout=timeout_s,
            max_retries=max_retries,
            http_client=self._counting(http_client or _new_pool(max_in_flight)),
        )
        # several endpoints: the router retries elsewhere, so each endpoint's client does not. Each gets its own
        # HTTP pool: httpcore matches queued requests to connections by scanning the whole pool on every event,
        # so one pool of 256 connections cost more CPU per request than the rest of the client (bench/fleet.py).
        # An injected client (tests' mock transport) is shared.
        self._tries = max_retries + 1
        self._endpoint_clients: dict[str, AsyncOpenAI] = {}
        if len(urls) > 1:
            for url in urls:
                pool = {} if http_client else {"http_client": self._counting(_new_pool(max_in_flight))}
                self._endpoint_clients[url] = self._client.with_options(base_url=url, max_retries=0, **pool)

    def _counting(self, http_client):
        """Count every HTTP attempt on ``http_client`` into ``stats`` (an httpx request hook)."""

        async def on_send(_request) -> None:
            self.stats.http_attempts += 1

        http_client.event_hooks["request"].append(on_send)
        return http_client

    async def close(self) -> None:
        await self.watch.close()
        for client in (self._client, *self._endpoint_clients.values()):
            await client.close()

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def complete_json(self, prompt: RenderedPrompt, sampling: Sampling, seed: int) -> Completion:
        """Ask until the output validates against ``prompt.schema``; raise ``RequestFailed`` otherwise."""
        usage_prompt = usage_completion = 0
        last_text: str | None = None
        last_finish: str | None = None
        last_reason = ""
        started = time.monotonic()
        for attempt in range(1, self.schema_retries + 2):
            # a new seed per attempt, so a retry is not the same bad sample again
            attempt_seed = seed + 1_000_003 * (attempt - 1)
            try:
                response, copies = await self._create(prompt, sampling, attempt_seed)
            except AllEndpointsDown as exc:
                self._count_failure()
                raise RequestFailed(str(exc), attempt) from None
            except openai.APIStatusError as exc:
                self._count_failure()
                raise RequestFailed(f"http {exc.status_code}: {_short(exc.message)}", attempt) from None
            except openai.APITimeoutError:
                self._count_failure()
                raise RequestFailed("timeout after retries", attempt) from None
            except openai.APIConnectionError as exc:
                self._count_failure()
                raise RequestFailed(
                    f"connection error after retries: {_short(str(exc.__cause__ or exc))}", attempt
                ) from None
            except json.JSONDecodeError as exc:  # a 200 whose body is not JSON (the openai client does not retry it)
                response, copies = f"{type(exc).__name__}: {exc}", 1
            if not getattr(response, "choices", None):  # not JSON, or JSON without choices: ask again
                self.stats.invalid_bodies += 1
                last_reason = f"invalid response body: {_short(str(response))}"
                last_text = last_finish = None
                continue
            self.stats.http_ok += 1
            choice = response.choices[0]
            last_text = choice.message.content or ""
            last_finish = choice.finish_reason
            if response.usage:  # a hedged request: the cancelled copy is counted as costly as the answer
                usage_prompt += copies * response.usage.prompt_tokens
                usage_completion += copies * response.usage.completion_tokens
                self.stats.prompt_tokens += copies * response.usage.prompt_tokens
                self.stats.completion_tokens += copies * response.usage.completion_tokens
                self.stats.hedge_tokens += (copies - 1) * response.usage.total_tokens
            try:
                parsed = parse_output(last_text, prompt.schema)
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

    async def _create(self, prompt: RenderedPrompt, sampling: Sampling, seed: int) -> tuple[Any, int]:
        """The response and how many copies of the request were sent for it (2 when hedged)."""
        extra: dict[str, Any] = {"seed": seed} if self.send_seed else {}
        request = dict(
            model=self.model,
            messages=prompt.messages,
            response_format=prompt.response_format,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            **extra,
        )
        async with self._slots:
            self.stats.requests += 1
            self.stats.in_flight += 1
            try:
                if self._endpoint_clients:
                    return await self._hedged(request)
                return await _post_chat(self._client, request), 1
            finally:
                self.stats.in_flight -= 1

    async def _hedged(self, request: dict[str, Any]) -> tuple[Any, int]:
        """The request on one endpoint; still in flight after the fleet's hedge quantile (and within the cap),
        a copy on another endpoint too: the first answer wins, the other copy is cancelled."""
        self.watch.start()
        where: list[str] = []
        after = self._hedge_after()
        if after is None:
            return await self._routed(request, where), 1
        first = asyncio.ensure_future(self._routed(request, where))
        second = None
        try:
            done, _ = await asyncio.wait((first,), timeout=after)
            lease = None if done or self._hedge_after() is None else self.router.acquire(avoid=where)
            if lease is None:
                return await first, 1
            self.stats.hedges += 1
            second = asyncio.ensure_future(self._routed(request, [], lease))
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

    async def _routed(self, request: dict[str, Any], where: list[str], lease: Lease | None = None):
        """Try the least-loaded endpoint in rotation; an endpoint failure sends the next try elsewhere.
        ``where`` is kept to the endpoint it waits on (a hedge avoids it); ``lease``: the first try's."""
        task = asyncio.current_task()
        for attempt in range(self._tries):
            last = attempt == self._tries - 1
            if lease is None:
                lease = await self._lease()
            where[:] = [lease.url]
            waiting = self.watch.waiting[lease.url]
            waiting.add(task)
            try:
                response = await _post_chat(self._endpoint_clients[lease.url], request)
            except asyncio.CancelledError:  # by the watch (the endpoint is silent: go elsewhere), or by its owner
                if not self.watch.was_moved(task) or task.uncancel() > 0:
                    self.router.release(lease)
                    raise
                self.stats.moved_off_silent += 1
                timeout = openai.APITimeoutError(request=httpx.Request("POST", lease.url))
                self._endpoint_failed(lease, "silent", timeout, last)
            except openai.APIStatusError as exc:
                if exc.status_code < 500:  # it answered: alive; busy (429 …) is asked again, anything else is final
                    self.router.answered(lease, latency=False)
                    if last or exc.status_code not in _THROTTLED:
                        raise
                    await asyncio.sleep(_retry_delay(exc.response, attempt))
                    continue
                self._endpoint_failed(lease, f"http {exc.status_code}", exc, last)
            except openai.APIConnectionError as exc:  # refused, reset, timed out
                cause = exc.__cause__ or exc  # some connection errors have no message: then their type
                reason = _short(str(cause), 80) or type(cause).__name__
                reason = "timeout" if isinstance(exc, openai.APITimeoutError) else reason
                self._endpoint_failed(lease, reason, exc, last)
            except BaseException:
                self.router.release(lease)
                raise
            else:
                self.router.answered(lease)
                return response
            finally:
                waiting.discard(task)
            lease = None
            self.stats.failovers += 1

    def _endpoint_failed(self, lease: Lease, reason: str, exc: Exception, last: bool) -> None:
        """Take the endpoint out; on the last try re-raise, naming every endpoint when none is left."""
        self.router.failed(lease, reason)
        if last:
            if not any(e.in_rotation for e in self.router.endpoints):
                raise AllEndpointsDown(self.router.down_message()) from exc
            raise exc

    async def _lease(self) -> Lease:
        """A lease on an endpoint; while all are out, wait at most one longest cool-down for one to return."""
        deadline = time.monotonic() + self.router.max_cooldown_s
        while (lease := self.router.acquire()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AllEndpointsDown(self.router.down_message())
            await asyncio.sleep(min(max(self.router.retry_in(), 0.01), 0.5, remaining))
        return lease

    def _count_failure(self) -> None:
        self.stats.failed += 1


async def _post_chat(client: AsyncOpenAI, request: dict[str, Any]) -> ChatCompletion:
    """``chat.completions.create`` without its request transform: the SDK walks every parameter against its
    TypedDicts (the JSON schema of ``response_format`` included), ~9 ms of CPU per request in bench/fleet.py's
    profile, for a body that is already plain JSON. Same endpoint, body, retries, timeout and response type."""
    return await client.post("/chat/completions", cast_to=ChatCompletion, body=request)


def _retry_delay(response: httpx.Response, attempt: int) -> float:
    """The server's ``retry-after(-ms)`` if sane, else exponential backoff with jitter (0.5 s … 8 s)."""
    try:
        if "retry-after-ms" in response.headers:
            delay = float(response.headers["retry-after-ms"]) / 1000
        else:
            delay = float(response.headers["retry-after"])
        if 0 <= delay <= 60:
            return delay
    except (KeyError, ValueError):
        pass
    return min(8.0, 0.5 * 2**attempt) * random.uniform(0.75, 1.0)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
