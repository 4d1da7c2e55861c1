"""The request path through the ``openai`` SDK (``llm.client = "openai"``): kept so ``bench/fleet.py`` can
measure it beside the lean path (``llm/wire_lean.py``) in one run, and as a fallback.

One ``AsyncOpenAI`` for the lone endpoint with the SDK's own transport retries (``max_retries``: 408/409/429/5xx,
timeouts and connection errors, with backoff and Retry-After); with several endpoints, one per endpoint with
retries off (the router retries elsewhere), each with its own HTTP pool. Every HTTP attempt is counted (an
httpx request hook). The SDK's errors are translated into ``llm/wire.py``'s.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import httpx
import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion

from llm.outcomes import ClientStats, Sampling
from llm.wire import Answer, BadBody, ConnectFailure, StatusFailure, TimeoutFailure
from prompts.render import RenderedPrompt


def _new_pool(max_in_flight: int) -> httpx.AsyncClient:
    """An HTTP pool with a connection for every request in flight: the openai client's default pool stops at
    1,000 connections, which would cap a large fleet's ``llm.max_in_flight`` below what is configured."""
    limits = httpx.Limits(max_connections=max_in_flight + 16, max_keepalive_connections=max_in_flight)
    return openai.DefaultAsyncHttpxClient(limits=limits)


class OpenAIWire:
    def __init__(
        self,
        urls: Sequence[str],
        model: str,
        api_key: str,
        timeout_s: float,
        max_retries: int,
        max_in_flight: int,
        stats: ClientStats,
        send_seed: bool,
        http_client: httpx.AsyncClient | None = None,
    ):
        self.model, self.stats, self.send_seed = model, stats, send_seed
        self._client = AsyncOpenAI(
            base_url=urls[0],
            api_key=api_key,
            timeout=timeout_s,
            max_retries=max_retries,
            http_client=self._counting(http_client or _new_pool(max_in_flight)),
        )
        # several endpoints: each gets its own HTTP pool: httpcore matches queued requests to connections by
        # scanning the whole pool on every event, so one pool of 256 connections cost more CPU per request than
        # the rest of the client (bench/fleet.py). An injected client (tests' mock transport) is shared.
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
        for client in (self._client, *self._endpoint_clients.values()):
            await client.close()

    def prepare(
        self, prompt: RenderedPrompt, sampling: Sampling, seed: int, model: str | None = None
    ) -> dict[str, Any]:
        extra: dict[str, Any] = {"seed": seed} if self.send_seed else {}
        return dict(
            model=model or self.model,
            messages=prompt.messages,
            response_format=prompt.response_format,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            **extra,
        )

    async def send(self, request: dict[str, Any], url: str | None = None) -> Answer:
        client = self._client if url is None else self._endpoint_clients[url]
        try:
            response = await _post_chat(client, request)
        except openai.APIStatusError as exc:
            raise StatusFailure(exc.status_code, exc.message, exc.response.headers) from exc
        except openai.APITimeoutError as exc:
            raise TimeoutFailure("timeout", "APITimeoutError") from exc
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            raise ConnectFailure(str(cause), type(cause).__name__) from exc
        except json.JSONDecodeError as exc:  # a 200 whose body is not JSON (the openai client does not retry it)
            raise BadBody(f"{type(exc).__name__}: {exc}", answered=False) from None
        if not getattr(response, "choices", None):  # JSON without choices
            raise BadBody(str(response), answered=True)
        choice, usage = response.choices[0], response.usage
        tokens = (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) if usage else None
        return Answer(choice.message.content or "", choice.finish_reason, tokens)


async def _post_chat(client: AsyncOpenAI, request: dict[str, Any]) -> ChatCompletion:
    """``chat.completions.create`` without its request transform: the SDK walks every parameter against its
    TypedDicts (the JSON schema of ``response_format`` included), ~9 ms of CPU per request in bench/fleet.py's
    profile, for a body that is already plain JSON. Same endpoint, body, retries, timeout and response type."""
    return await client.post("/chat/completions", cast_to=ChatCompletion, body=request)
