"""Async client for an OpenAI-compatible server (vLLM) that returns schema-valid JSON or a reason.

Bounded in-flight requests (one semaphore shared by every shard of a flow run), per-request
timeouts, and transport retries with exponential backoff and jitter on 408/409/429/5xx, timeouts
and connection errors — those come from the ``openai`` client itself (``max_retries``). On top,
an output that fails schema validation is asked again, at most ``schema_retries`` times.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
from openai import AsyncOpenAI

from prompts.render import OutputInvalid, RenderedPrompt, parse_output


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_tokens: int

    def as_dict(self, seed: int | None) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens, "seed": seed}


@dataclass
class Completion:
    """A parsed answer and what it cost."""

    parsed: dict[str, Any]
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    attempts: int


@dataclass
class RequestFailed(Exception):
    """A request that ended without a parsed answer; ``reason`` goes to the rejects table."""

    reason: str
    attempts: int
    text: str | None = None
    finish_reason: str | None = None

    def __str__(self) -> str:
        return self.reason


@dataclass
class ClientStats:
    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    schema_retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    in_flight: int = 0
    started: float = field(default_factory=time.monotonic)


class LLMClient:
    """One per flow run; safe to share across the concurrent shard tasks of that run's event loop."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "EMPTY",
        max_in_flight: int = 16,
        timeout_s: float = 180.0,
        max_retries: int = 4,
        schema_retries: int = 2,
        send_seed: bool = False,
        http_client: "httpx.AsyncClient | None" = None,  # tests inject a mock transport here
    ):
        self.model = model
        self.base_url = base_url
        self.schema_retries = schema_retries
        self.send_seed = send_seed
        self._client = AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=max_retries,
                                   http_client=http_client)
        self._slots = asyncio.Semaphore(max_in_flight)
        self.stats = ClientStats()

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "LLMClient":
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
                response = await self._create(prompt, sampling, attempt_seed)
            except openai.APIStatusError as exc:
                self._count_failure()
                raise RequestFailed(f"http {exc.status_code}: {_short(exc.message)}", attempt) from None
            except openai.APITimeoutError:
                self._count_failure()
                raise RequestFailed("timeout after retries", attempt) from None
            except openai.APIConnectionError as exc:
                self._count_failure()
                raise RequestFailed(f"connection error after retries: {_short(str(exc.__cause__ or exc))}", attempt) from None
            choice = response.choices[0]
            last_text = choice.message.content or ""
            last_finish = choice.finish_reason
            if response.usage:
                usage_prompt += response.usage.prompt_tokens
                usage_completion += response.usage.completion_tokens
                self.stats.prompt_tokens += response.usage.prompt_tokens
                self.stats.completion_tokens += response.usage.completion_tokens
            try:
                parsed = parse_output(last_text, prompt.schema)
            except OutputInvalid as exc:
                last_reason = f"invalid output ({last_finish}): {_short(str(exc))}"
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
        raise RequestFailed(last_reason, self.schema_retries + 1, last_text, last_finish)

    async def _create(self, prompt: RenderedPrompt, sampling: Sampling, seed: int):
        extra: dict[str, Any] = {"seed": seed} if self.send_seed else {}
        async with self._slots:
            self.stats.requests += 1
            self.stats.in_flight += 1
            try:
                return await self._client.chat.completions.create(
                    model=self.model,
                    messages=prompt.messages,
                    response_format=prompt.response_format,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    max_tokens=sampling.max_tokens,
                    **extra,
                )
            finally:
                self.stats.in_flight -= 1

    def _count_failure(self) -> None:
        self.stats.failed += 1


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
