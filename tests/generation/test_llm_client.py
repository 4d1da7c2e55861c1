"""LLMClient: transport retries on 429/5xx, bounded schema retries, bounded in-flight requests, on both request
paths (``llm.client``: "lean", the default, and "openai", the SDK's); the lean path sends the same bodies and
rejects the same answers with the same words; its compiled answer checks agree with jsonschema."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time

import httpx
import pytest

from ground.task_types import ALL_TASK_TYPES, BRAINSTORM_TASK_TYPES
from llm.answers import _BAD, compile_schema, parse_answer
from llm.client import LLMClient, RequestFailed, Sampling
from prompts.render import OutputInvalid, RenderedPrompt, parse_output, render_brainstorm, render_example
from prompts.schemas import EXAMPLE_SCHEMAS, brainstorm_schema, object_schema, string_field
from prompts.task_types import get_task_type

PATHS = ("lean", "openai")

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


@pytest.fixture(params=PATHS)
def path(request) -> str:
    """Each test that takes it runs on both request paths."""
    return request.param


def make_client(responses: list, path: str = "lean", headers: dict | None = None, **kwargs) -> tuple[LLMClient, list]:
    """A client whose HTTP layer answers from ``responses`` in order (status, body); ``seen``: the bodies sent,
    each with its ``x-stainless-retry-count`` header under ``"_retry"``."""
    seen: list = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append({**json.loads(request.content), "_retry": request.headers.get("x-stainless-retry-count")})
        status, body = responses[min(len(seen) - 1, len(responses) - 1)]
        raw = {"content": body} if isinstance(body, bytes) else {"json": body}
        return httpx.Response(status, **raw, headers={"retry-after-ms": "1"} if headers is None else headers)

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return LLMClient("http://llm.test/v1", "m", http_client=http, client=path, **kwargs), seen


def run(coro):
    return asyncio.run(coro)


def test_retries_429_and_5xx_then_succeeds(path):
    client, seen = make_client(
        [(429, {"error": "busy"}), (503, {"error": "down"}), (200, completion('{"answer": "ok"}'))],
        path,
        max_retries=3,
    )
    result = run(client.complete_json(PROMPT, SAMPLING, seed=1))
    assert result.parsed == {"answer": "ok"}
    assert len(seen) == 3
    assert seen[0]["response_format"]["type"] == "json_schema"
    assert seen[0]["response_format"]["json_schema"]["schema"] == PROMPT.schema
    assert [body["_retry"] for body in seen] == ["0", "1", "2"]  # the retry count header, as the SDK sends it
    assert (client.stats.http_attempts, client.stats.transport_retries) == (3, 2)


def test_transport_retries_are_bounded(path):
    client, seen = make_client([(500, {"error": {"message": "boom"}})], path, max_retries=2)
    with pytest.raises(RequestFailed) as failure:
        run(client.complete_json(PROMPT, SAMPLING, seed=1))
    assert failure.value.reason == "http 500: Error code: 500 - boom"  # the SDK's wording on both paths
    assert len(seen) == 3  # first try + 2 retries
    assert client.stats.failed == 1


def test_invalid_output_is_asked_again_then_given_up(path):
    client, seen = make_client(
        [(200, completion("not json")), (200, completion('{"answer": ""}')), (200, completion('{"wrong": 1}'))],
        path,
        schema_retries=2,
        max_retries=0,
    )
    with pytest.raises(RequestFailed) as failure:
        run(client.complete_json(PROMPT, SAMPLING, seed=1))
    assert len(seen) == 3
    assert "invalid output" in failure.value.reason and failure.value.attempts == 3
    assert failure.value.text == '{"wrong": 1}'


def test_schema_retry_recovers_and_sums_tokens(path):
    client, seen = make_client(
        [(200, completion('{"answer": 5}')), (200, completion('{"answer": " fine "}'))],
        path,
        schema_retries=1,
        max_retries=0,
    )
    result = run(client.complete_json(PROMPT, SAMPLING, seed=1))
    assert result.parsed == {"answer": "fine"} and result.attempts == 2
    assert result.completion_tokens == 10 and result.prompt_tokens == 6


def test_seed_is_sent_only_when_enabled(path):
    for send_seed in (False, True):
        client, seen = make_client([(200, completion('{"answer": "a"}'))], path, send_seed=send_seed)
        run(client.complete_json(PROMPT, SAMPLING, seed=77))
        assert ("seed" in seen[0]) is send_seed


def test_in_flight_requests_are_bounded(path):
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
        client = LLMClient("http://llm.test/v1", "m", http_client=http, max_in_flight=3, client=path)
        await asyncio.gather(*(client.complete_json(PROMPT, SAMPLING, seed=i) for i in range(20)))
        return client

    client = run(main())
    assert peak == 3
    assert client.stats.succeeded == 20 and client.stats.completion_tokens == 100


def test_a_truncated_answer_is_asked_again_only_with_more_room(path):
    cut = completion('{"answer": "a long answ', finish="length")
    client, seen = make_client([(200, cut), (200, cut), (200, completion('{"answer": "ok"}'))], path, max_retries=0)
    sampling = Sampling(temperature=0.5, top_p=1.0, max_tokens=20, max_tokens_ceiling=50)
    result = run(client.complete_json(PROMPT, sampling, seed=1))
    assert result.parsed == {"answer": "ok"}
    assert [body["max_tokens"] for body in seen] == [20, 40, 50]  # doubled, bounded by the ceiling


def test_a_truncated_answer_at_its_ceiling_is_not_asked_again(path):
    cut = completion('{"answer": "a long answ', finish="length")
    for sampling in (SAMPLING, Sampling(temperature=0.5, top_p=1.0, max_tokens=20, max_tokens_ceiling=20)):
        client, seen = make_client([(200, cut), (200, completion('{"answer": "ok"}'))], path, max_retries=0)
        with pytest.raises(RequestFailed) as failure:
            run(client.complete_json(PROMPT, sampling, seed=1))
        assert len(seen) == 1, "asked again at the same limit"
        assert failure.value.reason.startswith("truncated at max_tokens 20 (no more room)")
        assert failure.value.attempts == 1 and client.stats.truncated == 1


# --- Retry-After, on both paths ------------------------------------------------------------------
def test_retry_after_is_waited_and_an_excessive_one_is_not(path):
    answers = [(429, {"error": {"message": "busy"}}), (200, completion('{"answer": "ok"}'))]
    client, seen = make_client(answers, path, headers={"retry-after-ms": "300"}, max_retries=2)
    started = time.monotonic()
    assert run(client.complete_json(PROMPT, SAMPLING, seed=1)).parsed == {"answer": "ok"}
    assert 0.3 <= time.monotonic() - started < 3 and len(seen) == 2
    # a server asking for more than two minutes is not waited for: the request fails at once
    client, seen = make_client(answers, path, headers={"retry-after": "500"}, max_retries=2)
    with pytest.raises(RequestFailed) as failure:
        run(client.complete_json(PROMPT, SAMPLING, seed=1))
    assert len(seen) == 1 and failure.value.reason == "http 429: Error code: 429 - busy"


# --- the lean path against the SDK's ------------------------------------------------------------
def sent_bodies(path: str, prompts: list[RenderedPrompt], send_seed: bool) -> list[dict]:
    client, seen = make_client([(200, completion('{"answer": "ok"}'))], path, send_seed=send_seed, schema_retries=0)

    async def main():
        for k, prompt in enumerate(prompts):
            with contextlib.suppress(RequestFailed):  # the canned answer fits none of these schemas
                await client.complete_json(prompt, Sampling(0.9, 0.95, 300 + k), seed=k)

    run(main())
    return seen


def test_lean_bodies_equal_the_sdk_bodies_for_every_task_type():
    from generation import bench_plan  # bench/generation.py: a plan over every task type

    requests = [r for shard in bench_plan(12, 12, seed=3) for r in shard.requests]
    prompts = [render_example(get_task_type(r.task_type), r.instruction, dict(r.placeholders)) for r in requests]
    prompts += [render_brainstorm(get_task_type(t), "A nurse who writes code.", 5) for t in BRAINSTORM_TASK_TYPES]
    assert {r.task_type for r in requests} == set(ALL_TASK_TYPES)
    for send_seed in (False, True):
        lean, sdk = sent_bodies("lean", prompts, send_seed), sent_bodies("openai", prompts, send_seed)
        assert len(lean) == len(prompts) and lean == sdk  # the same JSON, compared after parsing
        assert ("seed" in lean[0]) is send_seed


MALFORMED = [
    "not json",
    '{"answer": "ok"',
    "[1, 2]",
    '{"answer": ""}',
    '{"answer": "   "}',
    '{"answer": 5}',
    '{"answer": null}',
    '{"wrong": "x"}',
    '{"answer": "ok", "extra": "x"}',
    '{"answer": "' + "a" * 51 + '"}',
    '{"answer": NaN}',
]


def test_a_malformed_answer_is_rejected_with_the_same_words_on_both_paths():
    for text in MALFORMED:
        reasons = []
        for path in PATHS:
            client, _ = make_client([(200, completion(text))], path, schema_retries=0, max_retries=0)
            with pytest.raises(RequestFailed) as failure:
                run(client.complete_json(PROMPT, SAMPLING, seed=1))
            reasons.append(failure.value.reason)
        assert reasons[0] == reasons[1] and reasons[0].startswith("invalid output (stop): "), (text, reasons)


def test_a_body_that_is_not_json_is_worded_alike_on_both_paths():
    for declared, words in (({"content-type": "application/json"}, "JSONDecodeError: Expecting value"), ({}, "<h")):
        reasons = []
        for path in PATHS:
            answers = [(200, b"<html>502</html>")]
            client, _ = make_client(answers, path, headers=declared, schema_retries=0, max_retries=0)
            with pytest.raises(RequestFailed) as failure:
                run(client.complete_json(PROMPT, SAMPLING, seed=1))
            reasons.append(failure.value.reason)
        assert reasons[0] == reasons[1] and reasons[0].startswith(f"invalid response body: {words}"), reasons


def test_both_paths_get_the_same_answers_from_a_real_server():
    from generation import bench_plan

    from support.stub_llm import StubLLM

    request = bench_plan(6, 6, seed=5)[0].requests[0]
    prompt = render_example(get_task_type(request.task_type), request.instruction, dict(request.placeholders))
    with StubLLM(invalid_every=0, duplicate_every=0) as server:
        parsed = []
        for path in PATHS:
            client = LLMClient(server.base_url, server.model, client=path, max_retries=0, schema_retries=0)

            async def ask(client=client):
                async with client:
                    return [await client.complete_json(prompt, SAMPLING_LONG, seed=k) for k in range(3)]

            answers = run(ask())
            assert client.stats.http_attempts == 3 and client.stats.completion_tokens > 0
            parsed.append([a.parsed for a in answers])
    assert parsed[0] == parsed[1]


SAMPLING_LONG = Sampling(temperature=0.5, top_p=1.0, max_tokens=2000)


# --- the compiled answer checks against jsonschema --------------------------------------------------
SCHEMAS = [
    *EXAMPLE_SCHEMAS.values(),
    brainstorm_schema(3),
    {
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": ["yes", "no"]},
            "score": {"type": "integer", "minimum": 1, "maximum": 5},
            "weight": {"type": "number", "minimum": 0},
            "ok": {"type": "boolean"},
            "none": {"type": "null"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        },
        "required": ["label", "score"],
    },
]


def valid_value(schema: dict, rng: random.Random):
    kind = schema["type"]
    if kind == "object":
        return {key: valid_value(sub, rng) for key, sub in schema["properties"].items()}
    if kind == "array":
        return [valid_value(schema["items"], rng) for _ in range(max(1, schema.get("minItems", 0)))]
    if kind == "string":
        if "enum" in schema:
            return rng.choice(schema["enum"])
        return "x" * rng.randint(schema.get("minLength", 1) or 1, min(schema.get("maxLength", 40), 40))
    return {"integer": 3, "number": 0.5, "boolean": True, "null": None}[kind]


def mutations(schema: dict, value, rng: random.Random):
    """The value, and variants near every bound: lengths ±1, padding, blanks, wrong types, keys added or missing."""
    yield value
    if schema["type"] == "object":
        for key, sub in schema["properties"].items():
            for variant in mutations(sub, value[key], rng):
                yield {**value, key: variant}
            yield {k: v for k, v in value.items() if k != key}
        yield {**value, "extra": "x"}
    elif schema["type"] == "array":
        yield []
        yield value * (schema.get("maxItems", 3) + 1)
        for variant in mutations(schema["items"], value[0], rng):
            yield [variant]
    elif schema["type"] == "string":
        for n in {schema.get("minLength", 1) - 1, schema.get("minLength", 1), schema.get("maxLength", 9) + 1}:
            yield "é" * max(0, n)
        yield "  " + value + "\n"
        yield " " * 5
        yield value.upper()
    yield from (None, 1, 1.0, 2.5, True, "7", [value], {"v": value}, -1, 6)


def test_compiled_checks_agree_with_jsonschema():
    rng = random.Random(11)
    compared = rejected = 0
    for schema in SCHEMAS:
        check = compile_schema(schema)
        assert check is not None
        for _ in range(5):
            for value in mutations(schema, valid_value(schema, rng), rng):
                text = json.dumps(value)
                try:
                    expected = parse_output(text, schema)
                except OutputInvalid:
                    expected = None
                got = check(value)
                assert (got is _BAD) == (expected is None), (schema, value)
                assert got is _BAD or got == expected
                compared, rejected = compared + 1, rejected + (expected is None)
    assert compared > 1000 and 0.3 < rejected / compared < 0.95  # both verdicts well represented


def test_a_schema_the_checks_do_not_know_goes_to_jsonschema():
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^c"}}, "required": ["a"]}
    assert compile_schema(schema) is None
    assert parse_answer('{"a": " cat "}', schema) == {"a": "cat"}
    with pytest.raises(OutputInvalid, match="does not match"):
        parse_answer('{"a": "dog"}', schema)


def test_the_setting_picks_the_path_and_refuses_others():
    from pydantic import ValidationError

    from ground.settings import load_settings
    from llm.wire_lean import LeanWire
    from llm.wire_openai import OpenAIWire

    for path, wire in (("lean", LeanWire), ("openai", OpenAIWire)):
        settings = load_settings(llm={"base_url": "http://llm.test/v1", "model": "m", "client": path})
        assert type(LLMClient.from_settings(settings)._wire) is wire
    with pytest.raises(ValidationError, match="client"):
        load_settings(llm={"client": "requests"})
