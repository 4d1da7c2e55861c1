"""A hung LLM endpoint (accepts connections, never answers) costs seconds, not a request timeout.

Stub endpoints on 127.0.0.1 (``bench/fleet_stub.py``), the last of which hangs for a while after the first
request. In process, the client's watch must take it out as silent and move its requests elsewhere, send it
no live request while it is out, let failed probes grow its cool-down, and re-admit it only after its health
probe and canary succeed. Through the bench's generation path (``bench/fleet.py``), a run with the hang
writes exactly the fault-free run's example ids, and ends long before one request timeout. The
``generate`` flow over a healthy stub and a port that never answers names that port in its summary's
warnings and endpoint rows and in its Prefect artifact.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import threading
import time

from fleet import run_fleet  # bench/ (pytest's pythonpath)
from fleet_result import FleetConfig, hang_report
from fleet_stub import MODEL, Fleet, LatencyModel

from llm.client import LLMClient, Sampling  # noqa: E402
from prompts.render import RenderedPrompt  # noqa: E402
from prompts.schemas import object_schema, string_field  # noqa: E402
from support.stub_llm import StubLLM

LATENCY = LatencyModel(time_scale=0.02)  # ≈ 0.24 s a request
PROMPT = RenderedPrompt(
    messages=[{"role": "user", "content": "hi"}],
    schema=object_schema({"answer": string_field(1, 400)}),
    schema_name="t",
    prompt_version="v",
)
SAMPLING = Sampling(temperature=0.5, top_p=1.0, max_tokens=400)
HANG_AFTER_S, HANG_FOR_S = 0.5, 3.0


def test_hung_endpoint_is_found_silent_skipped_and_readmitted_by_probe():
    events: list[tuple[str, float, float]] = []  # (what, when, cool-down it set)

    async def main():
        fleet = Fleet(3, 4, LATENCY, hang_after_s=HANG_AFTER_S, hang_for_s=HANG_FOR_S)
        await fleet.start()
        client = LLMClient(
            fleet.urls,
            MODEL,
            max_in_flight=12,
            timeout_s=60,
            endpoint_cooldown_s=0.2,
            endpoint_max_cooldown_s=5,
            probe_timeout_s=0.2,
            canary_timeout_s=2,
        )
        router, hung_url = client.router, fleet.urls[-1]
        acquire, probe_failed, readmit = router.acquire, router.probe_failed, router.readmit
        leased_out_of_rotation = []

        def watched_acquire(*args, **kwargs):
            lease = acquire(*args, **kwargs)
            if lease is not None and not lease.endpoint.in_rotation:
                leased_out_of_rotation.append(lease.url)
            return lease

        def watched_probe_failed(e, reason):
            probe_failed(e, reason)
            events.append(("probe failed", time.monotonic(), e.down_until - time.monotonic()))

        def watched_readmit(e):
            events.append(("readmitted", time.monotonic(), 0.0))
            readmit(e)

        router.acquire, router.probe_failed, router.readmit = watched_acquire, watched_probe_failed, watched_readmit
        started = time.monotonic()
        results = await asyncio.gather(*(client.complete_json(PROMPT, SAMPLING, seed=i) for i in range(400)))
        elapsed = time.monotonic() - started
        hang_start = fleet.first_request + HANG_AFTER_S
        await client.close()
        fleet.close()
        await asyncio.sleep(0.05)  # the hung endpoint's handlers end
        return client, hung_url, results, elapsed, hang_start, leased_out_of_rotation

    client, hung_url, results, elapsed, hang_start, leased_out = asyncio.run(main())
    row = next(r for r in client.router.report_rows() if r["endpoint"] == hung_url)
    assert len(results) == 400 and client.stats.failed == 0
    assert elapsed < 30, "a request waited for its timeout (60 s) instead of leaving the silent endpoint"
    assert row["taken_out"] >= 1 and row["last_reason"].startswith("silent for"), row
    assert client.stats.moved_off_silent + client.stats.hedges_won >= 1
    assert leased_out == [], "a live request was sent to an endpoint out of rotation"
    failed = [(t, cooldown) for what, t, cooldown in events if what == "probe failed"]
    readmitted = [t for what, t, _ in events if what == "readmitted"]
    assert failed, "no probe ran while the endpoint hung"
    assert all(t < hang_start + HANG_FOR_S + 0.3 for t, _ in failed)  # the probes failed because it hung
    cooldowns = [c for _, c in failed]
    assert cooldowns == sorted(cooldowns) and cooldowns[-1] > 0.2  # the cool-down grows while probes fail
    assert len(readmitted) == 1 and readmitted[0] >= hang_start + HANG_FOR_S  # back only once it answers again
    assert row["in_rotation"] and row["out_of_rotation_s"] > 0


def test_generation_with_a_hung_endpoint_writes_the_fault_free_rows():
    clean = FleetConfig(
        endpoints=3,
        per_endpoint=4,
        in_flight=12,
        requests=300,
        shard_size=50,
        latency=LATENCY,
        sample_s=0.2,
        max_seconds=100.0,
        request_timeout_s=60.0,
    )
    hung = dataclasses.replace(clean, hang_after_s=HANG_AFTER_S)  # for good
    a, b = run_fleet(clean), run_fleet(hung)
    print(hang_report(a, b))
    assert not a.timed_out and not b.timed_out
    assert len(a.example_ids) == len(set(a.example_ids)) == clean.requests
    assert sorted(b.example_ids) == sorted(a.example_ids), "a row was lost or doubled"
    assert b.stub["hung"] >= 1, "the endpoint never hung: the scenario tested nothing"
    assert b.elapsed_s < clean.request_timeout_s / 2
    row = b.endpoint_rows[-1]
    assert row["taken_out"] >= 1 and row["last_reason"].startswith("silent for") and not row["in_rotation"]
    assert "ratio" in hang_report(a, b)


class HungServer:
    """A port that accepts connections and reads nothing, answers nothing: a wedged replica."""

    def __enter__(self) -> HungServer:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.connections.append(self.sock.accept()[0])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
        for c in self.connections:
            c.close()


def test_generate_summary_and_artifact_name_the_hung_endpoint(prefect_api_url, data_dir, monkeypatch):
    from flows.artifacts import KEYS
    from flows.generate import generate
    from support.artifacts import artifacts_of, table_of

    with StubLLM(delay_s=0.01, invalid_every=0) as llm, HungServer() as hung:
        for key, value in {
            "LLM__BASE_URLS": json.dumps([llm.base_url, hung.url]),
            "LLM__MODEL": llm.model,
            "LLM__REQUEST_TIMEOUT_S": "120",
            "GENERATION__SHARD_SIZE": "10",
            "PERSONAS__LIMIT": "20",
        }.items():
            monkeypatch.setenv(f"EMBED_FACTORY_{key}", value)

        async def run():
            return await generate(run_id="run-hung", examples=60, task_types=["retrieval", "sts"], return_state=True)

        started = time.monotonic()
        state = asyncio.run(run())
        elapsed = time.monotonic() - started
    summary = state.result()
    assert sum(summary.examples_by_type.values()) == 60
    assert elapsed < 60, "requests on the hung endpoint waited for their timeout"
    row = next(r for r in summary.endpoints if r["endpoint"] == hung.url)
    assert row["taken_out"] >= 1 and row["last_reason"].startswith("silent for") and row["out_of_rotation_s"] > 0
    assert any(hung.url in w and "out of rotation" in w for w in summary.warnings)
    table = table_of(artifacts_of(state.state_details.flow_run_id)[KEYS["generate_llm_endpoints"]])
    assert {r["endpoint"] for r in table} == {llm.base_url, hung.url}
    shown = next(r for r in table if r["endpoint"] == hung.url)
    assert shown["taken_out"] >= 1 and shown["failures"] >= 1
