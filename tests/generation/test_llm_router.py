"""Several LLM endpoints: least-in-flight routing, take-out / cool-down / return, failover, all-down error.

Unit tests of ``EndpointRouter`` run on a fake clock; the client tests use an in-process mock transport;
the integration test (marker ``llm``) runs the ``generate`` flow over two real endpoints — the embedded
vLLM server and a reverse proxy in front of it (``tests/support/http_proxy.py``) — and kills the proxy mid-run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest

from llm.client import LLMClient, RequestFailed, Sampling
from llm.router import EndpointRouter
from prompts.render import RenderedPrompt
from prompts.schemas import object_schema, string_field

A, B, C = "http://a.test/v1", "http://b.test/v1", "http://c.test/v1"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def router(urls=(A, B), **kwargs) -> tuple[EndpointRouter, Clock]:
    clock = Clock()
    return EndpointRouter(
        list(urls),
        cooldown_s=kwargs.pop("cooldown_s", 2.0),
        max_cooldown_s=kwargs.pop("max_cooldown_s", 10.0),
        clock=clock,
        **kwargs,
    ), clock


# --- the router on its own ----------------------------------------------------------------------
def test_least_in_flight_wins_and_ties_alternate():
    r, _ = router((A, B, C))
    leases = [r.acquire() for _ in range(3)]
    assert sorted(lease.url for lease in leases) == [A, B, C]  # one each
    r.answered(leases[1])  # that endpoint now has the fewest in flight
    assert r.acquire().url == leases[1].url
    # sequential requests (nothing in flight) alternate instead of always hitting the first endpoint
    r2, _ = router((A, B))
    seen = []
    for _ in range(6):
        lease = r2.acquire()
        seen.append(lease.url)
        r2.answered(lease)
    assert seen.count(A) == seen.count(B) == 3


def test_failed_endpoint_cools_down_is_probed_once_and_returns(caplog):
    r, clock = router((A, B), cooldown_s=2.0, max_cooldown_s=5.0)
    caplog.set_level(logging.INFO, logger="llm.router")
    a = next(lease for lease in (r.acquire(), r.acquire()) if lease.url == A)
    r.failed(a, "connection refused")
    assert "out of rotation for 2.0s after: connection refused" in caplog.text
    for _ in range(5):  # while it cools down, everything goes to B
        assert r.acquire().url == B
    assert r.retry_in() == pytest.approx(2.0)

    clock.now += 2.0  # cool-down over: exactly one probe goes through, the rest still goes to B
    probe = r.acquire()
    assert probe.url == A and probe.probe
    assert r.acquire().url == B
    r.failed(probe, "connection refused")  # probe failed: out again for twice as long
    assert r.endpoints[0].down_until == pytest.approx(clock.now + 4.0)
    clock.now += 4.0
    r.failed(r.acquire(), "connection refused")  # and again: doubling stops at max_cooldown_s
    assert r.endpoints[0].down_until == pytest.approx(clock.now + 5.0)

    clock.now += 5.0
    probe = r.acquire()
    r.answered(probe)
    assert r.endpoints[0].in_rotation and r.endpoints[0].failures_in_row == 0
    assert "back in rotation" in caplog.text
    assert r.snapshot()[A]["taken_out"] == 3
    # a success resets the cool-down to the first one
    lease = r.acquire()
    assert lease.url == A  # nothing in flight there, B still has six
    r.failed(lease, "http 503")
    assert r.endpoints[0].down_until == pytest.approx(clock.now + 2.0)


def test_requests_already_in_flight_do_not_extend_an_outage():
    r, clock = router((A, B))
    on_a = [lease for lease in (r.acquire() for _ in range(4)) if lease.url == A]
    assert len(on_a) == 2
    r.failed(on_a[0], "connection reset")
    until = r.endpoints[0].down_until
    clock.now += 1.0
    r.failed(on_a[1], "connection reset")  # same outage
    assert r.endpoints[0].down_until == until and r.endpoints[0].taken_out == 1
    assert r.endpoints[0].in_flight == 0


def test_all_down_says_so_and_a_lone_endpoint_is_never_taken_out():
    r, clock = router((A, B))
    r.failed(r.acquire(), "connection refused")
    r.failed(r.acquire(), "http 502")
    assert r.acquire() is None
    message = r.down_message()
    assert message.startswith("all 2 LLM endpoints are out of rotation")
    assert f"{A} (connection refused" in message and f"{B} (http 502" in message
    clock.now += 2.0
    assert r.acquire() is not None  # a probe after the cool-down

    lone, _ = router((A,))
    lone.failed(lone.acquire(), "connection refused")
    assert lone.endpoints[0].in_rotation and lone.acquire() is not None


def test_a_silent_endpoint_is_found_and_returns_only_by_probe(caplog):
    r, clock = router((A, B, C), readmit_by_probe=True)
    leases = [r.acquire() for _ in range(6)]
    for lease in leases[:2]:  # one answer each from A and B, 0.5 s after the start
        clock.now += 0.5
        r.answered(lease)
    assert r.quantile(0.99, min_answers=3) is None and r.quantile(0.99, min_answers=2) == 1.0
    clock.now += 2.0  # A and B answer again; C has answered nothing for 3 s with 2 requests in flight
    r.answered(leases[3])
    assert r.silent(after_s=5.0) == []  # not yet silent long enough
    assert [e.url for e in r.silent(after_s=2.5)] == [C]
    r.answered(leases[4])
    clock.now += 3.0  # now no endpoint has answered for 3 s: the work is slow, not one endpoint
    assert r.silent(after_s=2.5) == []
    clock.now -= 3.0
    with caplog.at_level(logging.WARNING):
        r.take_out(r.endpoints[2], "silent for 2.5s with 2 requests in flight")
    assert "out of rotation" in caplog.text and C in caplog.text
    assert all(r.acquire().url != C for _ in range(10)), "a live request went to an endpoint out of rotation"
    clock.now += 2.0
    assert [e.url for e in r.due_for_probe()] == [C] and r.due_for_probe() == []  # one probe at a time
    r.probe_failed(r.endpoints[2], "ReadTimeout")  # the cool-down doubles: 4 s
    clock.now += 3.9
    assert r.due_for_probe() == []
    clock.now += 0.2
    assert r.due_for_probe() == [r.endpoints[2]]
    r.readmit(r.endpoints[2])
    row = next(row for row in r.report_rows() if row["endpoint"] == C)
    assert row["in_rotation"] and row["taken_out"] == 1 and row["out_of_rotation_s"] == pytest.approx(6.1)
    assert row["requests"] == 2 and row["median_latency_s"] is None  # its requests never answered
    a = next(row for row in r.report_rows() if row["endpoint"] == A)
    assert a["median_latency_s"] == pytest.approx(1.75) and a["out_of_rotation_s"] == 0


def test_bad_endpoint_lists_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        EndpointRouter([])
    with pytest.raises(ValueError, match="twice"):
        EndpointRouter([A, A])


def test_settings_accept_an_endpoint_list():
    from ground.settings import load_settings

    s = load_settings(llm={"base_urls": [A, B]})
    assert s.llm_base_urls == [A, B] and s.llm_base_url == A and not s.uses_embedded_llm
    single = load_settings(llm={"base_url": C})
    assert single.llm_base_urls == [C]
    assert load_settings().llm_base_urls == [load_settings().embedded_llm.base_url]
    with pytest.raises(ValueError, match="more than once"):
        load_settings(llm={"base_urls": [A, A]})
    with pytest.raises(ValueError, match="below endpoint_cooldown_s"):
        load_settings(llm={"endpoint_cooldown_s": 5, "endpoint_max_cooldown_s": 1})


# --- the client over a mock transport -----------------------------------------------------------
PROMPT = RenderedPrompt(
    messages=[{"role": "user", "content": "hi"}],
    schema=object_schema({"answer": string_field(1, 50)}),
    schema_name="t",
    prompt_version="v",
)
SAMPLING = Sampling(temperature=0.5, top_p=1.0, max_tokens=20)
OK = {
    "id": "x",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": '{"answer": "ok"}'}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
}


@pytest.fixture(params=("lean", "openai"))
def path(request) -> str:
    """The client tests run on both request paths (``llm.client``)."""
    return request.param


def mock_client(behaviour: dict[str, str], **kwargs) -> tuple[LLMClient, dict[str, int]]:
    """Hosts answer per ``behaviour``: "ok", "refuse" (connection refused) or "503"."""
    hits = {host: 0 for host in behaviour}

    async def handler(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        hits[host] += 1
        await asyncio.sleep(0.005)
        if behaviour[host] == "refuse":
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if behaviour[host] == "503":
            return httpx.Response(503, json={"error": "overloaded"})
        return httpx.Response(200, json=OK)

    urls = [f"http://{host}/v1" for host in behaviour]
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    kwargs = {"endpoint_cooldown_s": 0.05, "endpoint_max_cooldown_s": 0.2, "max_retries": 3, **kwargs}
    return LLMClient(urls, "m", http_client=http, **kwargs), hits


def test_failed_endpoint_requests_go_elsewhere_and_none_is_lost(path):
    async def main():
        behaviour = {"a.test": "refuse", "b.test": "ok", "c.test": "503"}
        client, hits = mock_client(behaviour, max_in_flight=4, client=path)
        results = await asyncio.gather(*(client.complete_json(PROMPT, SAMPLING, seed=i) for i in range(30)))
        await client.close()
        return client, hits, results

    client, hits, results = asyncio.run(main())
    assert len(results) == 30 and all(r.parsed == {"answer": "ok"} for r in results)
    snap = client.router.snapshot()
    assert snap["http://b.test/v1"]["answered"] == 30
    assert snap["http://a.test/v1"]["taken_out"] >= 1 and snap["http://c.test/v1"]["taken_out"] >= 1
    assert client.stats.failovers == hits["a.test"] + hits["c.test"] >= 2
    assert client.stats.succeeded == 30 and client.stats.failed == 0


def test_all_endpoints_down_fails_the_request_with_one_clear_line(path):
    client, hits = mock_client({"a.test": "refuse", "b.test": "503"}, max_retries=2, client=path)
    started = time.monotonic()
    with pytest.raises(RequestFailed) as failure:
        asyncio.run(client.complete_json(PROMPT, SAMPLING, seed=1))
    assert failure.value.reason.startswith("all 2 LLM endpoints are out of rotation:")
    assert "http://a.test/v1 (" in failure.value.reason and "http://b.test/v1 (http 503" in failure.value.reason
    # one live try each; the third try waited (one longest cool-down) for a probe to re-admit one: live
    # requests never test an endpoint out of rotation (the probes bypass the mock transport and fail)
    assert sum(hits.values()) == 2
    assert time.monotonic() - started < 5
    assert client.stats.failed == 1


# --- two real endpoints, one killed mid-run -----------------------------------------------------
@pytest.mark.llm
def test_endpoint_killed_mid_run_loses_no_request(llm_base_url, prefect_api_url, data_dir, monkeypatch):
    import flows.generate as generate_flow
    from storage.shards import RunStore
    from support.http_proxy import start_proxy
    from tasks.generation.generate import plan_examples, split_targets

    upstream = "{0.scheme}://{0.netloc}".format(urlsplit(llm_base_url))
    proxy = start_proxy(upstream)
    examples, types, shard_size = 16, ["sts", "bitext"], 6
    for key, value in {
        "LLM__BASE_URLS": json.dumps([llm_base_url, proxy.url]),
        "LLM__MAX_IN_FLIGHT": "8",
        "LLM__ENDPOINT_COOLDOWN_S": "0.5",
        "LLM__ENDPOINT_MAX_COOLDOWN_S": "2",
        "GENERATION__SHARD_SIZE": str(shard_size),
        "GENERATION__MAX_TOPUP_ROUNDS": "0",
    }.items():
        monkeypatch.setenv(f"EMBED_FACTORY_{key}", value)

    clients: list[LLMClient] = []
    make_client = generate_flow.make_client

    def keep_client(settings):
        clients.append(make_client(settings))
        return clients[-1]

    monkeypatch.setattr(generate_flow, "make_client", keep_client)
    at_kill: dict = {}

    def kill_when_both_served() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            snap = clients[0].router.snapshot() if clients else {}
            if snap and all(v["answered"] >= 2 for v in snap.values()):
                proxy.kill()
                time.sleep(0.5)  # answers already received before the kill are counted by now
                at_kill.update(clients[0].router.snapshot())
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_both_served, daemon=True)
    killer.start()
    try:
        summary = asyncio.run(generate_flow.generate(run_id="it-two-endpoints", examples=examples, task_types=types))
    finally:
        proxy.kill()
    killer.join(5)

    assert at_kill, "the proxy was never killed: the run ended before both endpoints had answered twice"
    final = clients[0].router.snapshot()
    print(f"at the kill: {at_kill}\nat the end: {final}\nfailovers: {clients[0].stats.failovers}")
    live, dead = final[llm_base_url], final[proxy.url]
    # before the kill both endpoints got traffic; after it only the live one answered
    assert at_kill[llm_base_url]["answered"] >= 2 and at_kill[proxy.url]["answered"] >= 2
    assert dead["answered"] == at_kill[proxy.url]["answered"]
    assert live["answered"] > at_kill[llm_base_url]["answered"]
    assert dead["taken_out"] >= 1 and not dead["in_rotation"] and live["in_rotation"]
    assert dead["failed"] == dead["requests"] - dead["answered"], "everything sent to it after the kill failed"

    # every planned request ends in examples or rejects exactly once
    store = RunStore(data_dir, "it-two-endpoints")
    planned = {
        r.example_id
        for s in plan_examples(
            "it-two-endpoints", 0, split_targets(examples, types), store.read_instructions(), 42, shard_size
        )
        for r in s.requests
    }
    done = store.read_kind("examples")["example_id"].to_pylist() + store.read_kind("rejects")["example_id"].to_pylist()
    assert len(planned) == examples
    assert sorted(done) == sorted(planned), "a request was lost or written twice"
    assert sum(summary.examples_by_type.values()) > 0
