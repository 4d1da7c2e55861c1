"""Benchmark: can one factory process drive a fleet of 72B vLLM replicas? Requests/s, CPU and memory per request.

The fleet is ``bench/fleet_stub.py``: N OpenAI-compatible endpoints in a separate process, each holding a
request for TTFT + completion tokens / per-sequence decode rate, with ``max_num_seqs`` slots per endpoint
(later requests queue inside the endpoint). The factory side is the real generation path without Prefect:
``LLMClient.from_settings`` (one client, ``llm.base_urls`` = the N endpoints, least-in-flight routing,
``llm.max_in_flight`` = the in-flight target), ``plan_examples`` shards, and ``run_example_shard`` run
through ``run_shards``, so prompt rendering, the HTTP round trip, JSON parsing, schema validation and
the Parquet shard commits (``storage.shards.RunStore``) are all in the measured process. Prefect's task
wrapper is left out (one task run per shard of hundreds of requests; ``bench/generation.py`` measures it).

What it prints:

* requests/s sustained: completions per second between warm-up (the in-flight target first reached, plus
  one mean request latency) and the moment the last request was issued (after it, in-flight drains);
* client CPU seconds per request (the factory process's CPU time over that window / its completions) and
  the factory's CPU use as a share of one core; peak RSS of the factory process;
* the stubs' capacity (min(in-flight, N × max_num_seqs) / mean request latency) and the achieved share of it;
  the factory-bound share of the window: samples in which the endpoints held < 90 % of the in-flight
  target (the factory was not keeping them fed), split into "main thread busy ≥ 90 %" (running or waiting
  for a CPU: CPU-bound) and the rest (a limit inside the factory, e.g. its HTTP connection pool);
  event-loop lag (how late a 0.25 s sleep wakes up);
* the goal: the README's 10× plan needs ``SAMPLES_10X × ATTEMPTS_PER_SAMPLE / GENERATION_S_10X`` requests/s;
  the issue asks for 10× that.

``--time-scale s`` multiplies every latency by s: the endpoints' capacity grows by 1/s while the number of
requests in flight (sockets, coroutines, memory) stays, so the factory must do the same work per request
at 1/s the rate. A scaled-down run therefore finds the factory's ceiling; at s = 1 the rate is
min(that ceiling, the stubs' capacity). CPU per request is comparable across scales; RSS is too.

    python bench/fleet.py                                    # 32 endpoints × 8, scaled 0.05, ~1 minute
    python bench/fleet.py --endpoints 32 --per-endpoint 256 --requests 40000 --time-scale 0.05
    python bench/fleet.py ... --http-connections 8192        # what-if: a client HTTP pool that large
    python bench/fleet.py ... --profile /tmp/fleet.prof      # cProfile the factory side, print the top
    python bench/fleet.py ... --client openai                # the openai SDK request path (llm.client)

``--processes N`` (N > 1): the request paths side by side and the lean client over 1 and N processes, in one
invocation, alternating over ``--rounds`` (``bench/fleet_scale.py``): sustained requests/s of each run, client
CPU per request of the openai SDK path against the lean path, the lean rate for 1 and N processes and their
ratio, the goal, and how many client processes a 32-replica fleet needs.

    python bench/fleet.py --endpoints 32 --per-endpoint 8 --requests 12000 --time-scale 0.02 --processes 2

``--hang-after T``: the hung-endpoint scenario. The same generation runs twice in this invocation, fault-free
and with the last endpoint hanging T seconds after the first request (it accepts connections and never
answers), both at the production profile's ``llm`` timeouts; the report gives both times, their ratio,
whether the hung run wrote exactly the fault-free run's example ids (none lost, none doubled), and each
endpoint's requests, failures, latencies and time out of rotation.

    python bench/fleet.py --endpoints 8 --per-endpoint 32 --requests 10000 --time-scale 0.2 --hang-after 20 --rounds 2

Only 127.0.0.1; the stub process stops when this one closes its stdin or dies, or after --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
import pyarrow.parquet as pq

try:  # the HTTP library the installed openai client is built on (httpx2 in openai 3.x, httpx before)
    import httpx2 as openai_http
except ImportError:  # pragma: no cover
    import httpx as openai_http

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from fleet_result import FleetConfig, FleetResult, Sample, hang_report, report, steady_window  # noqa: E402
from fleet_stub import LatencyModel, raise_open_files_limit  # noqa: E402
from generation import bench_plan  # noqa: E402  (the existing bench's instructions and plan)

from ground.settings import LLMSettings, load_settings  # noqa: E402
from llm.client import LLMClient, Sampling  # noqa: E402
from storage.shards import RunStore  # noqa: E402
from tasks.generation.generate import run_example_shard  # noqa: E402
from tasks.generation.rounds import run_shards  # noqa: E402


# --- the stub process ---------------------------------------------------------------------------
@contextmanager
def stub_fleet(config: FleetConfig) -> Iterator[dict[str, Any]]:
    m = config.latency
    command = [
        sys.executable,
        str(HERE / "fleet_stub.py"),
        "--endpoints",
        str(config.endpoints),
        "--per-endpoint",
        str(config.per_endpoint),
        "--ttft",
        str(m.ttft_s),
        "--decode-rate",
        str(m.decode_tokens_per_s),
        "--tokens",
        str(m.tokens),
        "--tokens-spread",
        str(m.tokens_spread),
        "--time-scale",
        str(m.time_scale),
        "--seed",
        str(config.seed),
        "--max-seconds",
        str(config.max_seconds + 300),
    ]  # it stops when we close its stdin
    if config.hang_after_s is not None:
        command += ["--hang-after", str(config.hang_after_s)]
        if config.hang_for_s is not None:
            command += ["--hang-for", str(config.hang_for_s)]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=60)
        if not ready or not ready[0].strip():
            raise RuntimeError(f"the stub fleet did not start (exit code {proc.poll()})")
        yield json.loads(ready[0])
    finally:
        proc.stdin.close()  # the stub's signal to stop
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


async def stub_stats(url: str) -> dict[str, Any]:
    """``GET /stats`` on its own connection (not through the client under test)."""
    address = urlsplit(url)
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    try:
        writer.write(f"GET {address.path} HTTP/1.1\r\nHost: {address.hostname}\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


# --- the factory side ------------------------------------------------------------------------------
def _main_thread_busy_s() -> float:
    """Seconds the calling thread ran or waited for a CPU (Linux schedstat; 0 elsewhere)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
            run_ns, wait_ns, _ = f.read().split()
        return (int(run_ns) + int(wait_ns)) / 1e9
    except (OSError, ValueError):
        return 0.0


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fleet_client(config: FleetConfig, urls: list[str], model: str) -> tuple[LLMClient, list[str]]:
    """The client as generation builds it: ``LLMClient.from_settings`` on settings naming the fleet."""
    notes = []
    cap = next(m.le for m in LLMSettings.model_fields["max_in_flight"].metadata if hasattr(m, "le"))
    settings = load_settings(
        llm={
            "base_urls": urls,
            "model": model,
            "max_in_flight": min(config.target, cap),
            "max_tokens": 2 * config.latency.tokens,
            "request_timeout_s": config.request_timeout_s,
            "client": config.client,
        }
    )
    overrides: dict[str, Any] = {}
    if config.target > cap:
        overrides["max_in_flight"] = config.target
        notes.append(
            f"llm.max_in_flight is capped at {cap} by ground/settings.py; the bench passes "
            f"{config.target} to from_settings as an override"
        )
    if config.http_connections and config.client == "openai":
        limits = openai_http.Limits(
            max_connections=config.http_connections, max_keepalive_connections=config.http_connections
        )
        overrides["http_client"] = openai.DefaultAsyncHttpxClient(limits=limits)
        notes.append(f"what-if: the client's HTTP pool raised to {config.http_connections} connections")
    elif config.client == "openai":
        from openai._constants import DEFAULT_CONNECTION_LIMITS as pool

        if pool.max_connections and pool.max_connections < config.target:
            notes.append(
                f"the openai client's default HTTP pool allows {pool.max_connections} connections "
                f"({pool.max_keepalive_connections} kept alive): at most that many requests on the wire "
                f"of the {config.target} in flight (try --http-connections)"
            )
    return LLMClient.from_settings(settings, **overrides), notes


async def drive(config: FleetConfig, fleet: dict[str, Any], data_dir: str) -> FleetResult:
    client, notes = fleet_client(config, fleet["urls"], fleet["model"])
    settings_sampling = Sampling(0.9, 0.95, 2 * config.latency.tokens)
    shards = bench_plan(config.requests, config.shard_size, config.seed)
    total = sum(len(s.requests) for s in shards)
    store = RunStore(data_dir, "fleet")
    # enough shards in flight that the client's gate, not the shard gate, bounds the requests in flight
    shards_in_flight = -(-config.target // config.shard_size) * 2
    samples: list[Sample] = []
    rss_start = _rss_mib()
    start = time.monotonic()
    if config.http_connections and config.client != "openai":
        notes.append("--http-connections applies to the openai path only (the lean path pools per endpoint)")

    stub: dict[str, Any] = {}
    printed = [0.0]  # when the last progress line was printed

    async def take(lag: float) -> None:
        try:
            stub.update(await stub_stats(fleet["stats_url"]))
        except (TimeoutError, OSError, ValueError) as exc:  # keep the last counters
            notes.append(f"stub stats unreadable at {time.monotonic() - start:.0f}s: {exc!r}")
        s = client.stats
        samples.append(
            Sample(
                time.monotonic() - start,
                s.requests,
                s.succeeded + s.failed,
                time.process_time(),
                _main_thread_busy_s(),
                lag,
                stub["open"],
                stub["active"],
            )
        )
        if samples[-1].t >= printed[0] + 10:  # a line every ~10 s for long runs
            printed[0] = samples[-1].t
            print(
                f"  {samples[-1].t:6.0f}s: {s.succeeded + s.failed} done, {s.in_flight} in flight in the client, "
                f"{stub['open']} in the stubs, loop lag {lag:.2f}s",
                file=sys.stderr,
                flush=True,
            )

    async def sampler(stop: asyncio.Event) -> None:
        deadline = start + config.max_seconds + 30
        while not stop.is_set() and time.monotonic() < deadline:
            before = time.monotonic()
            await asyncio.sleep(config.sample_s)
            await take(time.monotonic() - before - config.sample_s)

    await take(0.0)
    stop = asyncio.Event()
    sampling_task = asyncio.create_task(sampler(stop))
    timed_out = False
    try:
        records = await asyncio.wait_for(
            run_shards(run_example_shard, store, shards, client, settings_sampling, shards_in_flight),
            timeout=config.max_seconds,
        )
    except TimeoutError:
        timed_out, records = True, []
        notes.append(f"stopped after --max-seconds {config.max_seconds}: figures cover what finished")
    stop.set()
    await sampling_task
    await take(0.0)
    elapsed = time.monotonic() - start
    await client.close()
    examples = [
        pq.read_table(str(p), columns=["example_id", "latency_s"]) for p in store.root.glob("examples/*.parquet")
    ]
    latencies = [x for t in examples for x in t["latency_s"].to_pylist()]
    result = FleetResult(
        config=config,
        samples=samples,
        total=total,
        succeeded=client.stats.succeeded,
        failed=client.stats.failed,
        http_attempts=client.stats.http_attempts,
        rows_written=len(latencies),
        shards_written=len(records),
        per_endpoint=[e["requests"] for e in client.router.snapshot().values()],
        stub=stub,
        elapsed_s=elapsed,
        cpu_s=time.process_time(),
        rss_start_mib=rss_start,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        mean_latency_s=statistics.fmean(latencies) if latencies else 0.0,
        timed_out=timed_out,
        notes=notes,
        example_ids=[x for t in examples for x in t["example_id"].to_pylist()],
        endpoint_rows=client.router.report_rows(),
        client_stats=dataclasses.asdict(client.stats),
        started_at=start,
    )
    result.window = steady_window(result)
    return result


def _watchdog(config: FleetConfig, done: threading.Event) -> None:
    """The hard time bound: a factory whose event loop is stuck in one long pass cannot honour its own timeout."""
    limit = config.max_seconds + 120
    if not done.wait(limit):
        print(
            f"fleet: no result {limit:.0f}s after the start (the factory's event loop did not come back); "
            "exiting (the stub process stops with us)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(3)


def run_fleet(config: FleetConfig, profile: str | None = None) -> FleetResult:
    raise_open_files_limit()
    done = threading.Event()
    threading.Thread(target=_watchdog, args=(config, done), name="fleet-watchdog", daemon=True).start()
    try:
        return _run_fleet(config, profile)
    finally:
        done.set()


def _run_fleet(config: FleetConfig, profile: str | None) -> FleetResult:
    with stub_fleet(config) as fleet, tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
        if not profile:
            return asyncio.run(drive(config, fleet, tmp))
        import cProfile

        profiler = cProfile.Profile()
        result = profiler.runcall(asyncio.run, drive(config, fleet, tmp))
        profiler.dump_stats(profile)
        return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoints", type=int, default=32)
    p.add_argument("--per-endpoint", type=int, default=8, help="max_num_seqs per endpoint")
    p.add_argument("--in-flight", type=int, default=None, help="client in-flight target (default: all slots)")
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--ttft", type=float, default=0.5)
    p.add_argument("--decode-rate", type=float, default=30.0, help="tokens/s per sequence")
    p.add_argument("--tokens", type=int, default=350)
    p.add_argument("--tokens-spread", type=float, default=0.3)
    p.add_argument("--time-scale", type=float, default=0.05, help="multiplies every latency (see the docstring)")
    p.add_argument("--http-connections", type=int, default=None, help="what-if: the client's HTTP pool size")
    p.add_argument("--max-seconds", type=float, default=600.0, help="stop the run after this long")
    p.add_argument("--profile", default=None, help="cProfile the factory side into this file; print the top")
    p.add_argument("--hang-after", type=float, default=None, help="hung-endpoint scenario (see the docstring)")
    p.add_argument("--hang-for", type=float, default=None, help="... the hang ends after this long")
    p.add_argument("--rounds", type=int, default=1, help="--hang-after / --processes: rounds of runs, alternating")
    p.add_argument("--client", choices=("lean", "openai"), default="lean", help="llm.client: the request path")
    p.add_argument("--processes", type=int, default=1, help="N > 1: both paths, and lean over 1 and N processes")
    args = p.parse_args()
    if min(args.endpoints, args.per_endpoint, args.requests, args.shard_size, args.processes) < 1:
        p.error("counts must be >= 1")
    if args.time_scale <= 0 or args.processes > args.endpoints:
        p.error("need --time-scale > 0 and --processes <= --endpoints (each process gets a share of them)")
    latency = LatencyModel(args.ttft, args.decode_rate, args.tokens, args.tokens_spread, args.time_scale)
    config = FleetConfig(
        args.endpoints,
        args.per_endpoint,
        args.in_flight,
        args.requests,
        args.shard_size,
        latency,
        args.http_connections,
        max_seconds=args.max_seconds,
        client=args.client,
    )
    if args.processes > 1:
        from fleet_scale import run_scale

        print(run_scale(config, args.processes, args.rounds), flush=True)
        return
    if args.hang_after is not None:
        production = load_settings(profile="production").llm.request_timeout_s
        clean = dataclasses.replace(config, request_timeout_s=production)
        hung = dataclasses.replace(clean, hang_after_s=args.hang_after, hang_for_s=args.hang_for)
        runs: dict[FleetConfig, list[FleetResult]] = {clean: [], hung: []}
        for k in range(args.rounds):  # alternating, ABBA: fault-free, hung, hung, fault-free, …
            for c in (clean, hung) if k % 2 == 0 else (hung, clean):
                runs[c].append(run_fleet(c))
                print(f"{'hung' if c is hung else 'fault-free'}: {runs[c][-1].elapsed_s:.1f}s", file=sys.stderr)
        print(report(runs[clean][0]), flush=True)
        for a, b in zip(runs[clean], runs[hung], strict=True):
            print(hang_report(a, b), flush=True)
        total = sum(r.elapsed_s for r in runs[hung]) / sum(r.elapsed_s for r in runs[clean])
        print(f"hung / fault-free over {args.rounds} round(s), alternating: {total:.2f}x", flush=True)
        return
    result = run_fleet(config, args.profile)
    print(report(result), flush=True)
    if args.profile:
        import pstats

        pstats.Stats(args.profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
