"""A small functional run of ``bench/fleet.py``: the factory's generation path against a stub fleet.

Three endpoints with 4 slots each and 24 requests in flight, so the endpoints must queue; latencies
scaled by 0.1 (one request ≈ 1.2 s) so the factory, even on a loaded machine, keeps them fed. Checks
that the real path commits every example (schema validation passes), that routing spreads the load,
that the stubs honour ``max_num_seqs`` and the latency model, that the measured rate cannot beat the
stubs' capacity, and that the stub process stops when the bench lets go of it. ``--processes``: two client
processes share the fleet; several processes' figures are summed over their common steady window.
"""

from __future__ import annotations

import dataclasses
import math
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fleet import run_fleet, stub_fleet  # bench/ is on pytest's pythonpath (pyproject.toml)
from fleet_result import (
    Figures,
    FleetConfig,
    FleetResult,
    Sample,
    figures,
    fleet_demand_rps,
    plan_rate,
    report,
    scale_report,
)
from fleet_scale import run_processes
from fleet_stub import LatencyModel

LATENCY = LatencyModel(ttft_s=0.5, decode_tokens_per_s=30.0, tokens=350, tokens_spread=0.3, time_scale=0.1)
CONFIG = FleetConfig(
    endpoints=3,
    per_endpoint=4,
    in_flight=24,
    requests=120,
    shard_size=40,
    latency=LATENCY,
    sample_s=0.2,
    max_seconds=50.0,
)


@pytest.fixture(scope="module")
def result():
    return run_fleet(CONFIG)


def test_every_request_is_answered_validated_and_committed(result):
    assert not result.timed_out
    assert result.total == CONFIG.requests
    assert (result.succeeded, result.failed) == (CONFIG.requests, 0)  # the stub's JSON passed the client's schema check
    assert result.http_attempts == result.stub["served"] == CONFIG.requests
    assert result.rows_written == CONFIG.requests
    assert result.shards_written == CONFIG.requests // CONFIG.shard_size


def test_requests_are_spread_over_every_endpoint(result):
    assert sum(result.per_endpoint) == CONFIG.requests
    assert result.per_endpoint == result.stub["per_endpoint"]  # the client's routing and the stubs agree
    assert min(result.per_endpoint) >= CONFIG.requests // CONFIG.endpoints // 2


def test_stubs_keep_max_num_seqs_and_queue_beyond_it(result):
    assert result.stub["peak_active_per_endpoint"] == CONFIG.per_endpoint
    assert result.stub["queued_total"] > 0  # 24 in flight for 12 slots
    assert result.stub["peak_open"] > CONFIG.endpoints * CONFIG.per_endpoint


def test_latency_model_and_time_scale(result):
    expected = LATENCY.ttft_s + LATENCY.tokens / LATENCY.decode_tokens_per_s  # seconds, unscaled
    assert result.mean_service_s / LATENCY.time_scale == pytest.approx(expected, rel=0.05)
    assert result.stub["completion_tokens"] / CONFIG.requests == pytest.approx(LATENCY.tokens, rel=0.05)


def test_measured_rate_is_bounded_by_the_stubs_capacity(result):
    assert result.window[1] - result.window[0] >= 4  # a steady window was found
    assert 0 < result.sustained_rps <= result.capacity_rps * 1.15
    assert result.cpu_per_request_s > 0
    assert result.peak_rss_mib >= result.rss_start_mib > 0
    text = report(result)
    assert "requests/s sustained" in text and f"{10 * plan_rate():.0f} req/s" in text


def test_the_readme_states_the_goal_the_bench_computes():
    """The plan's rate and the goal in README's Capacity section are the bench's (one of them drifting fails)."""
    import re

    text = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8").split())
    plan = re.search(r"about 5\.5M × 1\.2 requests in ~26 h ≈ (\d+) requests/s", text)
    goal = re.search(r"≈ (\d+) requests/s on these 2 cores", text)
    assert plan and goal, "README's Capacity section no longer states the plan and the goal"
    assert int(plan.group(1)) == round(plan_rate()) and int(goal.group(1)) == round(10 * plan_rate())


def test_stub_process_stops_when_released():
    small = FleetConfig(endpoints=2, per_endpoint=1, requests=1, latency=LATENCY, max_seconds=20.0)
    with stub_fleet(small) as fleet:
        address = urlsplit(fleet["urls"][1])
        socket.create_connection((address.hostname, address.port), timeout=5).close()
    with pytest.raises(OSError):
        socket.create_connection((address.hostname, address.port), timeout=5).close()


# --- --processes N: the lean client over several processes, figures merged over their common window ---------
def synthetic(started_at: float, rate: float, cpu_per_request: float, client: str = "lean") -> FleetResult:
    """A run that completes ``rate`` requests/s at ``cpu_per_request`` from 2 s to 12 s after ``started_at``."""
    samples = [
        Sample(
            t,
            issued=100 + round(rate * t),
            done=round(rate * t),
            cpu_s=rate * t * cpu_per_request,
            busy_s=0.0,
            lag_s=0.0,
            stub_open=0,
            stub_active=0,
        )
        for t in [k * 0.5 for k in range(29)]
    ]
    config = dataclasses.replace(CONFIG, client=client)
    result = FleetResult(config, samples, 0, 0, 0, 0, 0, 0, [], {}, 14.0, 0.0, 0.0, 0.0, 0.0, started_at=started_at)
    result.window = (4, 24)  # 2 s … 12 s
    return result


def test_several_processes_are_summed_over_their_common_window():
    one = figures([synthetic(100.0, 200.0, 0.001)])
    assert one.rps == pytest.approx(200.0) and one.cpu_per_request_s == pytest.approx(0.001)
    # the second process started 3 s later: the common window is 5 s … 12 s of the first one's clock
    two = figures([synthetic(100.0, 200.0, 0.001), synthetic(103.0, 100.0, 0.003)])
    assert two.processes == 2 and two.window_s == pytest.approx(7.0) and not two.note
    assert two.rps == pytest.approx(300.0, rel=0.02)
    assert two.cpu_per_request_s == pytest.approx((200 * 0.001 + 100 * 0.003) / 300, rel=0.02)
    apart = figures([synthetic(100.0, 200.0, 0.001), synthetic(120.0, 100.0, 0.003)])  # never steady together
    assert apart.note and apart.rps == pytest.approx(300.0, rel=0.02)


def test_scale_report_compares_the_paths_and_sizes_the_fleet():
    runs = [
        Figures("openai", 1, 100.0, 0.002, 0.2, 1000, 10.0),
        Figures("lean", 1, 250.0, 0.0005, 0.12, 2500, 10.0),
        Figures("lean", 2, 400.0, 0.0006, 0.24, 4000, 10.0),
    ]
    text = scale_report(runs, 2, tokens_per_request=350)
    assert "openai SDK path 2.00 ms, lean path 0.50 ms: 4.0× lower" in text
    assert "1 process 250.0, 2 processes 400.0" in text and "scaling 1.60×" in text
    demand = fleet_demand_rps(350)
    assert f"≈ {demand:.0f} req/s: {math.ceil(demand / 250.0)} lean client process(es)" in text


def test_two_client_processes_share_the_fleet():
    config = dataclasses.replace(CONFIG, endpoints=4, per_endpoint=4, in_flight=16, requests=80, shard_size=20)
    results = run_processes(config, 2)
    assert sorted(r.config.endpoints for r in results) == [2, 2]
    assert sum(r.total for r in results) == sum(r.succeeded for r in results) == config.requests
    assert sum(r.rows_written for r in results) == config.requests
    assert {r.config.client for r in results} == {"lean"}
    # the stub's fleet-wide count, as the process that finished last read it
    assert sum(sum(r.per_endpoint) for r in results) == max(r.stub["served"] for r in results) == config.requests
    merged = figures(results)
    assert merged.processes == 2 and merged.rps > 0 and merged.cpu_per_request_s > 0
