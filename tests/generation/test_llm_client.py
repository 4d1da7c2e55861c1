"""LLMClient: transport retries on 429/5xx, bounded schema retries, bounded in-flight requests."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from llm.client import LLMClient, RequestFailed, Sampling
from prompts.render import RenderedPrompt
from prompts.schemas import object_schema, string_field

PROMPT = RenderedPrompt(
    messages=[{"role": "user", "content": "hi"}],
    schema=object_schema({"answer": string_field(1, 50)}),
    schema_name="t",
    prompt_version="v",
)
SAMPLING = Sampling(temperature=0.5, top_p=1.0, max_tokens=20)


def completion(content: str, finish: str = "stop") -> dict:
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
    }


def make_client(responses: list, **kwargs) -> tuple[LLMClient, list]:
    """A client whose HTTP layer answers from ``responses`` in order (status, body)."""
    seen: list = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        status, body = responses[min(len(seen) - 1, len(responses) - 1)]
        return httpx.Response(status, json=body, headers={"retry-after-ms": "1"})

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return LLMClient("http://llm.test/v1", "m", http_client=http, **kwargs), seen


def run(coro):
    return asyncio.run(coro)


def test_retries_429_and_5xx_then_succeeds():
    client, seen = make_client(
        [(429, {"error": "busy"}), (503, {"error": "down"}), (200, completion('{"answer": "ok"}'))], max_retries=3
    )
    result = run(client.complete_json(PROMPT, SAMPLING, seed=1))
    assert result.parsed == {"answer": "ok"}
    assert len(seen) == 3
    assert seen[0]["response_format"]["type"] == "json_schema"
    assert seen[0]["response_format"]["json_schema"]["schema"] == PROMPT.schema


def test_transport_retries_are_bounded():
    client, seen = make_client([(500, {"error": "boom"})], max_retries=2)
    with pytest.raises(RequestFailed) as failure:
        run(client.complete_json(PROMPT, SAMPLING, seed=1))
    assert "http 500" in failure.value.reason
    assert len(seen) == 3  # first try + 2 retries
    assert client.stats.failed == 1


def test_invalid_output_is_asked_again_then_given_up():
    client, seen = make_client(
        [(200, completion("not json")), (200, completion('{"answer": ""}')), (200, completion('{"wrong": 1}'))],
        schema_retries=2,
        max_retries=0,
    )
    with pytest.raises(RequestFailed) as failure:
        run(client.complete_json(PROMPT, SAMPLING, seed=1))
    assert len(seen) == 3
    assert "invalid output" in failure.value.reason and failure.value.attempts == 3
    assert failure.value.text == '{"wrong": 1}'


def test_schema_retry_recovers_and_sums_tokens():
    client, seen = make_client(
        [(200, completion('{"answer": 5}')), (200, completion('{"answer": " fine "}'))], schema_retries=1, max_retries=0
    )
    result = run(client.complete_json(PROMPT, SAMPLING, seed=1))
    assert result.parsed == {"answer": "fine"} and result.attempts == 2
    assert result.completion_tokens == 10 and result.prompt_tokens == 6


def test_seed_is_sent_only_when_enabled():
    for send_seed in (False, True):
        client, seen = make_client([(200, completion('{"answer": "a"}'))], send_seed=send_seed)
        run(client.complete_json(PROMPT, SAMPLING, seed=77))
        assert ("seed" in seen[0]) is send_seed


def test_in_flight_requests_are_bounded():
    peak = 0
    current = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal peak, current
        current += 1
        peak = max(peak, current)
        await asyncio.sleep(0.01)
        current -= 1
        return httpx.Response(200, json=completion('{"answer": "a"}'))

    async def main():
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        client = LLMClient("http://llm.test/v1", "m", http_client=http, max_in_flight=3)
        await asyncio.gather(*(client.complete_json(PROMPT, SAMPLING, seed=i) for i in range(20)))
        return client

    client = run(main())
    assert peak == 3
    assert client.stats.succeeded == 20 and client.stats.completion_tokens == 100


def test_a_truncated_answer_is_asked_again_only_with_more_room():
    cut = completion('{"answer": "a long answ', finish="length")
    client, seen = make_client([(200, cut), (200, cut), (200, completion('{"answer": "ok"}'))], max_retries=0)
    sampling = Sampling(temperature=0.5, top_p=1.0, max_tokens=20, max_tokens_ceiling=50)
    result = run(client.complete_json(PROMPT, sampling, seed=1))
    assert result.parsed == {"answer": "ok"}
    assert [body["max_tokens"] for body in seen] == [20, 40, 50]  # doubled, bounded by the ceiling


def test_a_truncated_answer_at_its_ceiling_is_not_asked_again():
    cut = completion('{"answer": "a long answ', finish="length")
    for sampling in (SAMPLING, Sampling(temperature=0.5, top_p=1.0, max_tokens=20, max_tokens_ceiling=20)):
        client, seen = make_client([(200, cut), (200, completion('{"answer": "ok"}'))], max_retries=0)
        with pytest.raises(RequestFailed) as failure:
            run(client.complete_json(PROMPT, sampling, seed=1))
        assert len(seen) == 1, "asked again at the same limit"
        assert failure.value.reason.startswith("truncated at max_tokens 20 (no more room)")
        assert failure.value.attempts == 1 and client.stats.truncated == 1
