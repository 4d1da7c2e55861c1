"""A small functional run of ``bench/fleet.py``: the factory's generation path against a stub fleet.

Three endpoints with 4 slots each and 24 requests in flight, so the endpoints must queue; latencies
scaled by 0.1 (one request ≈ 1.2 s) so the factory, even on a loaded machine, keeps them fed. Checks
that the real path commits every example (schema validation passes), that routing spreads the load,
that the stubs honour ``max_num_seqs`` and the latency model, that the measured rate cannot beat the
stubs' capacity, and that the stub process stops when the bench lets go of it.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fleet import run_fleet, stub_fleet  # bench/ is on pytest's pythonpath (pyproject.toml)
from fleet_result import FleetConfig, plan_rate, report
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
