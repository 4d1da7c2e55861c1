"""Server faults: a misbehaving LLM server costs retries and rejects, never a lost or doubled request.

* Client level (mock transport): a 200 whose body is not JSON, or JSON without choices, is asked
  again within ``schema_retries``; every HTTP attempt is counted, so transport failures and retries
  are reported, not hidden.
* Flow level, through :class:`proxy.FaultProxy` in front of an OpenAI-compatible upstream: 429s
  with Retry-After, 500s, answers slower than the client's timeout, bodies cut mid-way and invalid
  JSON, at a seeded rate. The run completes; every planned request ends exactly once in the examples
  or in the rejects (with its reason); the proxy sees no request retried more often than the
  settings allow; and the summary, the CLI and the warnings report the failure rate.
* The session's real embedded vLLM server is killed with SIGKILL mid-run and restarted: the run
  completes with no request lost, and the server is back for the tests after it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from proxy import FAULT_KINDS, FaultProxy, prompt_sha

from llm.client import LLMClient, RequestFailed, Sampling
from prompts.render import RenderedPrompt, render_example
from prompts.schemas import object_schema, string_field
from prompts.task_types import get_task_type
from storage.schemas import count_by_type
from storage.shards import RunStore
from tasks.generation.generate import plan_examples, split_targets

PROMPT = RenderedPrompt(
    messages=[{"role": "user", "content": "hi"}],
    schema=object_schema({"answer": string_field(1, 50)}),
    schema_name="t",
    prompt_version="v",
)
SAMPLING = Sampling(temperature=0.5, top_p=1.0, max_tokens=20)


def completion(content: str) -> dict:
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
    }


def mock_client(answers: list[tuple[int, bytes]], **kwargs) -> LLMClient:
    """A client whose HTTP layer answers (status, raw body) in order, the last one repeated."""
    sent = []

    async def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        status, body = answers[min(len(sent) - 1, len(answers) - 1)]
        return httpx.Response(status, content=body, headers={"content-type": "application/json", "retry-after-ms": "1"})

    return LLMClient(
        "http://llm.test/v1", "m", http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)), **kwargs
    )


# --------------------------------------------------------------------------- client level
def test_a_body_that_is_not_json_is_asked_again_and_counted():
    good = json.dumps(completion('{"answer": "ok"}')).encode()
    client = mock_client(
        [(200, b'{"id": "x", "choices": [{"ind'), (200, b'{"id": "x"}'), (500, b"{}"), (200, good)],
        max_retries=2,
        schema_retries=2,
    )
    result = asyncio.run(client.complete_json(PROMPT, SAMPLING, seed=1))
    assert result.parsed == {"answer": "ok"} and result.attempts == 3
    s = client.stats
    assert (s.requests, s.http_attempts, s.http_ok, s.invalid_bodies) == (3, 4, 1, 2)
    assert s.transport_failures == 3 and s.transport_retries == 1  # the 500 was retried by the openai client


def test_bad_bodies_end_in_a_reject_with_the_reason():
    client = mock_client([(200, b"<html>502 Bad Gateway</html>")], max_retries=0, schema_retries=1)
    with pytest.raises(RequestFailed) as failure:
        asyncio.run(client.complete_json(PROMPT, SAMPLING, seed=1))
    assert failure.value.reason.startswith("invalid response body") and failure.value.attempts == 2
    assert client.stats.failed == 1 and client.stats.transport_failures == 2


# --------------------------------------------------------------------------- each fault kind, through the proxy
#: what each fault does to a request when every attempt gets it (max_retries=1, schema_retries=1)
EXPECTED = {  # kind: (reason prefix, HTTP attempts at the proxy)
    "429": ("http 429", 2),  # retried once (after Retry-After), then given up
    "500": ("http 500", 2),
    "slow": ("timeout after retries", 2),
    "truncated": ("connection error after retries", 2),
    "invalid_json": ("invalid response body", 2),  # not retried by the openai client: asked again instead
}


@pytest.fixture
def stub():
    from support.stub_llm import StubLLM

    with StubLLM(invalid_every=0, duplicate_every=0) as server:
        yield server


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_each_fault_kind_ends_in_its_reason_after_bounded_attempts(stub, kind):
    reason, attempts = EXPECTED[kind]
    with FaultProxy(stub.base_url, rate=1.0, kinds=(kind,), slow_s=1.5, retry_after_s=1) as proxy:
        client = LLMClient(proxy.base_url, stub.model, timeout_s=0.5, max_retries=1, schema_retries=1)
        started = time.monotonic()
        with pytest.raises(RequestFailed) as failure:
            asyncio.run(client.complete_json(PROMPT, SAMPLING, seed=1))
        took = time.monotonic() - started
        hits = proxy.chat_hits()
    assert failure.value.reason.startswith(reason), failure.value.reason
    assert len(hits) == attempts and all(h.fault == kind for h in hits)
    assert client.stats.http_attempts == attempts and client.stats.transport_failures == attempts
    if kind == "429":  # the openai client waited the Retry-After second before its retry
        assert hits[1].at - hits[0].at >= 0.95 and took >= 0.95
    if kind == "invalid_json":
        assert client.stats.invalid_bodies == 2 and failure.value.attempts == 2
    else:
        assert [h.retry_count for h in hits] == [0, 1]


def test_without_faults_the_proxy_is_transparent(stub):
    with FaultProxy(stub.base_url, rate=0.0) as proxy:
        client = LLMClient(proxy.base_url, stub.model, max_retries=0, schema_retries=0)
        result = asyncio.run(client.complete_json(PROMPT, SAMPLING, seed=1))
        assert result.parsed["answer"] and proxy.faults() == Counter()
        assert client.stats.transport_failures == 0 and client.stats.http_attempts == 1


# --------------------------------------------------------------------------- helpers
def planned_ids(
    run_id: str, store: RunStore, targets: dict[str, int], seed: int, shard_size: int, rounds: int
) -> list[str]:
    """Every request the flow planned: round 0, then each top-up round for what was still missing."""
    examples = store.read_kind("examples")
    instructions = store.read_instructions()
    ids: list[str] = []
    for round_idx in range(rounds + 1):
        have = count_by_type(examples.filter(_round_mask(examples, range(round_idx))))
        wanted = targets if round_idx == 0 else {t: max(0, targets[t] - have.get(t, 0)) for t in targets}
        if not any(wanted.values()):
            break
        ids += [
            r.example_id
            for s in plan_examples(run_id, round_idx, wanted, instructions, seed, shard_size)
            for r in s.requests
        ]
    return ids


def _round_mask(table, rounds):
    import pyarrow as pa

    prefixes = {f":r{r:02d}-" for r in rounds}
    return pa.array([any(p in eid for p in prefixes) for eid in table["example_id"].to_pylist()])


def assert_every_request_once(store: RunStore, planned: list[str]) -> tuple[int, int]:
    examples = store.read_kind("examples")
    rejects = [r for r in store.read_kind("rejects").to_pylist() if r["stage"] == "generate"]
    ids = examples["example_id"].to_pylist() + [r["example_id"] for r in rejects]
    assert len(ids) == len(set(ids)), "no request recorded twice"
    assert sorted(ids) == sorted(planned), "every planned request ended in the examples or the rejects"
    assert all(r["reason"] for r in rejects), "every reject says why"
    return examples.num_rows, len(rejects)


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "embed_factory.cli", *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --------------------------------------------------------------------------- the real server, killed and restarted
@pytest.mark.llm
def test_vllm_killed_and_restarted_mid_run_loses_no_request(llm_base_url, prefect_api_url, tmp_path):
    """The session's embedded vLLM server, killed (its whole process group, as an OOM kill would) and
    restarted mid-run; it is healthy again when the test ends, for the tests after it. (A second server of
    its own would cost the test one more start, ~2 min here.)"""
    from embed_factory.llm_server import EmbeddedLLMServer
    from ground.settings import load_settings

    env = {
        "EMBED_FACTORY_LLM__MAX_IN_FLIGHT": "8",
        "PREFECT_API_URL": prefect_api_url,
        "EMBED_FACTORY_STORAGE__DATA_DIR": str(tmp_path / "data"),
        "EMBED_FACTORY_GENERATION__SHARD_SIZE": "2",
        "EMBED_FACTORY_GENERATION__SHARDS_IN_FLIGHT": "1",
        # the openai client's backoff tops out at 8 s: 20 retries span ~100-135 s, about one restart
        "EMBED_FACTORY_LLM__MAX_RETRIES": "20",
        "EMBED_FACTORY_GENERATION__MAX_TOPUP_ROUNDS": "3",
    }
    server = EmbeddedLLMServer(load_settings().embedded_llm, say=lambda m: print(f"[llm] {m}", flush=True))
    assert server.status().healthy, llm_base_url
    store = RunStore(tmp_path / "data", "restart")
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embed_factory.cli",
            "run",
            "--run-id",
            "restart",
            "-n",
            "12",
            "-t",
            "sts",
            "-t",
            "bitext",
            "--seed",
            "5",
            "--no-clean",
        ],
        env={**os.environ, **env},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 600
        while not any(k.startswith("examples/") for k in store.manifest()):
            assert run.poll() is None, f"the run ended before the kill:\n{run.stdout.read()}"
            assert time.monotonic() < deadline, "no example shard within 10 minutes"
            time.sleep(0.2)
        committed = {k for k in store.manifest() if k.startswith("examples/")}
        pid = server.status().pid
        os.killpg(pid, signal.SIGKILL)  # the API server and its engine process, as an OOM kill would
        killed_at = time.monotonic()
        while server.status().running:
            time.sleep(0.2)
        server.start()  # respawn and wait until healthy
        down_s = time.monotonic() - killed_at
        restarted_at = time.time()
        out, _ = run.communicate(timeout=900)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        server.start()  # a no-op when healthy; otherwise the later tests need it back
    assert run.returncode == 0, out

    targets = split_targets(12, ["sts", "bitext"])
    planned = planned_ids("restart", store, targets, 5, 2, 3)
    n_examples, n_rejects = assert_every_request_once(store, planned)
    after = [
        p
        for p in (store.root / "examples").glob("*.parquet")
        if p.stat().st_mtime >= restarted_at and f"examples/{p.stem}" not in committed
    ]
    assert after, "shards were committed by the restarted server"
    latencies = store.read_kind("examples")["latency_s"].to_pylist()
    survived = [x for x in latencies if x >= down_s * 0.5]
    print(
        f"[faults] vllm restart: down {down_s:.0f}s, {len(planned)} planned, {n_examples} examples, {n_rejects} "
        f"rejects, {len(after)} shards after the restart, {len(survived)} requests retried across the outage; "
        f"max latency {max(latencies):.0f}s"
    )
    assert re.search(r"LLM: \d+ calls, \d+ HTTP attempts, \d+ transport failures", " ".join(out.split())), out


# --------------------------------------------------------------------------- a whole run through the faults
REASONS = (
    "invalid output",
    "http 429",
    "http 500",
    "timeout after retries",
    "connection error after retries",
    "invalid response body",
)


def test_generation_through_faults_completes_accounts_and_reports(stub, prefect_api_url, tmp_path):
    from ground.settings import load_settings

    stub.invalid_every = 9  # the model itself also fails its schema now and then
    max_retries, schema_retries, seed, n, shard_size, topups = 1, 1, 3, 60, 10, 2
    types = ["retrieval", "sts", "bitext"]
    data = tmp_path / "data"
    with FaultProxy(stub.base_url, rate=0.4, seed=11, slow_s=6.0, retry_after_s=1) as proxy:
        env = {
            "PREFECT_API_URL": prefect_api_url,
            "EMBED_FACTORY_STORAGE__DATA_DIR": str(data),
            "EMBED_FACTORY_LLM__BASE_URL": proxy.base_url,
            "EMBED_FACTORY_LLM__MODEL": stub.model,
            "EMBED_FACTORY_LLM__REQUEST_TIMEOUT_S": "4",
            "EMBED_FACTORY_LLM__MAX_RETRIES": str(max_retries),
            "EMBED_FACTORY_LLM__SCHEMA_RETRIES": str(schema_retries),
            "EMBED_FACTORY_LLM__MAX_IN_FLIGHT": "16",
            "EMBED_FACTORY_GENERATION__SHARD_SIZE": str(shard_size),
            "EMBED_FACTORY_GENERATION__MAX_TOPUP_ROUNDS": str(topups),
        }
        started = time.monotonic()
        result = run_cli(
            [
                "run",
                "--run-id",
                "faults",
                "-n",
                str(n),
                "--seed",
                str(seed),
                "--no-clean",
                *[a for t in types for a in ("-t", t)],
            ],
            env,
            tmp_path,
        )
        took = time.monotonic() - started
        hits = proxy.chat_hits()
        faults = proxy.faults()
    out = result.stdout + result.stderr
    assert result.returncode == 0, out

    # 1. every planned request ended exactly once in the examples or the rejects, with a known reason
    store = RunStore(data, "faults")
    planned = planned_ids("faults", store, split_targets(n, types), seed, shard_size, topups)
    n_examples, n_rejects = assert_every_request_once(store, planned)
    reasons = Counter(r["reason"].split(":")[0].split(" (")[0] for r in store.read_kind("rejects").to_pylist())
    assert set(reasons) <= {r.split(":")[0] for r in REASONS}, reasons

    # 2. all five faults were injected, and no request was retried more often than the settings allow
    assert set(faults) == set(FAULT_KINDS), faults
    assert max(h.retry_count for h in hits) <= max_retries
    overrides = load_settings().generation.placeholder_overrides
    plans = [
        r
        for round_idx in range(topups + 1)
        for shard in plan_examples(
            "faults", round_idx, split_targets(n, types), store.read_instructions(), seed, shard_size, overrides
        )
        for r in shard.requests
    ]
    per_prompt = Counter(
        prompt_sha(render_example(get_task_type(r.task_type), r.instruction, dict(r.placeholders)).messages)
        for r in plans
    )
    calls = Counter(h.prompt_sha for h in hits if h.retry_count == 0)
    example_calls = {sha: k for sha, k in calls.items() if sha in per_prompt}
    assert example_calls, "the proxy saw the planned example prompts"
    over = {sha: k for sha, k in example_calls.items() if k > per_prompt[sha] * (schema_retries + 1)}
    assert not over, f"prompts asked more often than (schema_retries + 1) x planned: {over}"
    for hit in (h for h in hits if h.fault == "429"):  # Retry-After was honoured
        retry = [
            h.at for h in hits if h.body_sha == hit.body_sha and h.retry_count == hit.retry_count + 1 and h.at > hit.at
        ]
        if retry:
            assert min(retry) - hit.at >= 0.9, "a 429 was retried before its Retry-After"

    # 3. the CLI reports what the proxy saw: attempts, transport failures, retries, and warns
    flat = " ".join(out.split())  # rich wraps long lines at the terminal width
    line = re.search(r"LLM: .*? schema retries", flat).group(0)
    numbers = dict(
        (k, int(v))
        for v, k in re.findall(
            r"(\d+) (calls|HTTP attempts|transport failures|"
            r"transport retries|schema retries)",
            line,
        )
    )
    assert numbers["HTTP attempts"] == len(hits)
    assert numbers["transport failures"] == sum(faults.values())  # the stub never fails by itself
    assert numbers["transport retries"] == sum(1 for h in hits if h.retry_count)
    assert numbers["calls"] == sum(1 for h in hits if h.retry_count == 0)
    assert f"rejects: {store.read_kind('rejects').num_rows} " in flat
    assert re.search(r"warning: \d+ of \d+ HTTP attempts to the LLM server failed", flat), out
    print(
        f"[faults] proxy run: {len(planned)} planned requests, {n_examples} examples, {n_rejects} rejects "
        f"{dict(reasons)}; {len(hits)} HTTP attempts, faults {dict(faults)}, {numbers['transport retries']} "
        f"transport retries, {numbers['schema retries']} schema retries; max retry count "
        f"{max(h.retry_count for h in hits)} (limit {max_retries}); {took:.0f}s"
    )
