"""``bench/fleet.py --processes N``: the request paths side by side, and the lean client over N processes.

Each run starts a fresh stub fleet (``bench/fleet_stub.py``) and forks its client processes; every process
plans and builds its ``LLMClient`` before a barrier, then all drive the fleet at once (``fleet.drive``:
the real generation path, its own run store). With N processes each gets every N-th endpoint (a share of
``llm.base_urls``, as separate generation workers would), that share's slots as its in-flight target and
1/N of the requests. The figures of several processes are summed over the window in which every one of them
was steady (``fleet_result.figures``; one clock, ``time.monotonic``, for the whole machine).

One invocation runs, per round: the openai SDK path in 1 process, the lean path in 1 process, the lean path in
N processes, in alternating order (ABC, CBA, …), then prints each run and the comparisons
(``fleet_result.scale_report``): client CPU per request, old path against lean; the lean rate for 1 and N
processes and their ratio; the goal; how many client processes a 32-replica fleet needs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import queue
import sys
import tempfile

from fleet_result import FleetConfig, FleetResult, figures, scale_report
from fleet_stub import raise_open_files_limit

START_TIMEOUT_S = 300  # spawning and importing; a loaded machine is slow


def shares(config: FleetConfig, fleet: dict, n: int) -> list[tuple[FleetConfig, dict]]:
    """Process i's configuration and fleet: every n-th endpoint, its slots' share of the target and requests."""
    out = []
    for i in range(n):
        urls = fleet["urls"][i::n]
        target = max(1, round(config.target * len(urls) / config.endpoints))
        requests = config.requests // n + (i < config.requests % n)
        share = dataclasses.replace(
            config, endpoints=len(urls), in_flight=target, requests=requests, seed=config.seed + i
        )
        out.append((share, {**fleet, "urls": urls}))
    return out


def _child(config: FleetConfig, fleet: dict, barrier, results) -> None:
    """One client process: everything set up, wait for the others, drive, hand the result back."""
    from fleet import drive  # imported before the barrier (spawned children): import time is not measured

    raise_open_files_limit()
    try:
        barrier.wait(timeout=START_TIMEOUT_S)
        with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
            results.put(("ok", asyncio.run(drive(config, fleet, tmp))))
    except BaseException as exc:  # the parent reports it; a child's traceback alone would be lost in the noise
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def run_processes(config: FleetConfig, n: int) -> list[FleetResult]:
    """One run: a fresh stub fleet driven by ``n`` client processes at once; their results."""
    from fleet import stub_fleet

    # fork where there is one: the children start with this process's imports (seconds each, on a loaded machine)
    # and no event loop or client yet (each builds its own after the fork)
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with stub_fleet(config) as fleet:
        barrier, results = context.Barrier(n), context.Queue()
        children = [
            context.Process(target=_child, args=(share, share_fleet, barrier, results), name=f"fleet-client-{i}")
            for i, (share, share_fleet) in enumerate(shares(config, fleet, n))
        ]
        for child in children:
            child.start()
        try:
            outcomes = [results.get(timeout=START_TIMEOUT_S + config.max_seconds + 180) for _ in children]
        except queue.Empty:
            raise RuntimeError(f"a client process gave no result ({[c.exitcode for c in children]})") from None
        finally:
            for child in children:
                child.join(timeout=30)
                if child.is_alive():
                    child.kill()
    errors = [text for kind, text in outcomes if kind == "error"]
    if errors:
        raise RuntimeError("client process failed: " + "; ".join(errors))
    return [result for _, result in outcomes]


def run_scale(config: FleetConfig, processes: int, rounds: int) -> str:
    """``rounds`` × (openai 1 process, lean 1 process, lean ``processes``), alternating; the report."""
    plan = [("openai", 1), ("lean", 1), ("lean", processes)]
    runs = []
    for k in range(rounds):
        for client, n in plan if k % 2 == 0 else plan[::-1]:
            result = figures(run_processes(dataclasses.replace(config, client=client), n))
            runs.append(result)
            print(
                f"  {client} × {n} process(es): {result.rps:.1f} req/s, {result.cpu_per_request_s * 1000:.2f} ms "
                "client CPU per request",
                file=sys.stderr,
                flush=True,
            )
    return scale_report(runs, processes, config.latency.tokens)
