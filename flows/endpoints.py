"""A generation run's LLM endpoints, for people: a summary warning naming each degraded endpoint, and a
Prefect table artifact with one row per endpoint (requests, failures, median and p99 latency, seconds out
of rotation; ``llm/router.py`` ``report_rows``), published when the run spread its requests over a fleet."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flows.artifacts import publish_table


def degraded_warnings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per endpoint that was taken out of rotation during the run."""
    return [
        f"LLM endpoint {r['endpoint']} was out of rotation for {r['out_of_rotation_s']:.0f}s "
        f"(taken out {r['taken_out']} time(s), last: {r['last_reason']}; {r['failures']} of {r['requests']} "
        f"requests failed{'' if r['in_rotation'] else '; still out at the end'})"
        for r in rows
        if r["taken_out"]
    ]


def publish_endpoints(run_id: str, rows: Sequence[dict[str, Any]]) -> Any:
    """The per-endpoint table in the UI (a lone endpoint has nothing to compare: no artifact)."""
    if len(rows) < 2:
        return None
    return publish_table("generate_llm_endpoints", list(rows), f"generation run {run_id}: LLM endpoints")
