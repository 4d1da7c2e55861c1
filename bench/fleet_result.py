"""The fleet benchmark's measurements (``bench/fleet.py``): its configuration, the samples taken while it
runs, the result with the figures derived from them (steady window, sustained rate, CPU per request,
factory-bound shares), and the printed report. Pure data and arithmetic: no processes, no network."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from typing import Any

from fleet_stub import LatencyModel

# The README's capacity plan at 10× KaLM (section "Capacity"): 5.5M samples, ~1.2 attempts per sample,
# generation on 4 nodes of 8 GPUs for ~26 h.
SAMPLES_10X = 5_500_000
ATTEMPTS_PER_SAMPLE = 1.2
GENERATION_S_10X = 26 * 3600
GOAL_FACTOR = 10  # the issue: one factory process should drive 10× that plan's request rate
FED = 0.9  # the endpoints count as fed while they hold at least this share of the in-flight target
BUSY = 0.9  # the factory's main thread counts as CPU-bound above this share of wall time


def plan_rate() -> float:
    return SAMPLES_10X * ATTEMPTS_PER_SAMPLE / GENERATION_S_10X


@dataclass(frozen=True)
class FleetConfig:
    endpoints: int = 32
    per_endpoint: int = 8  # max_num_seqs
    in_flight: int | None = None  # None: endpoints × per_endpoint
    requests: int = 4000
    shard_size: int = 500
    latency: LatencyModel = LatencyModel(time_scale=0.05)
    http_connections: int | None = None  # None: the client's own HTTP pool (the product path)
    sample_s: float = 0.25
    max_seconds: float = 600.0
    seed: int = 0
    request_timeout_s: float = 600.0  # llm.request_timeout_s of the client
    hang_after_s: float | None = None  # the last endpoint hangs this long after the first request (None: never)
    hang_for_s: float | None = None  # ... for this long (None: for good)
    client: str = "lean"  # llm.client: the request path ("lean" or "openai")

    @property
    def target(self) -> int:
        return self.in_flight or self.endpoints * self.per_endpoint


@dataclass
class Sample:
    t: float
    issued: int  # requests past the client's in-flight gate
    done: int  # requests finished (answered or failed)
    cpu_s: float  # this process, all threads
    busy_s: float  # main thread: running + waiting for a CPU (/proc schedstat)
    lag_s: float  # how late the sampler's sleep woke up
    stub_open: int  # requests inside the endpoints (queued + decoding)
    stub_active: int


@dataclass
class FleetResult:
    config: FleetConfig
    samples: list[Sample]
    total: int
    succeeded: int
    failed: int
    http_attempts: int
    rows_written: int
    shards_written: int
    per_endpoint: list[int]
    stub: dict[str, Any]
    elapsed_s: float
    cpu_s: float
    rss_start_mib: float
    peak_rss_mib: float
    mean_latency_s: float  # request latency seen by the client (its own queueing included)
    window: tuple[int, int] = (0, 0)  # sample indices of the steady window
    timed_out: bool = False
    notes: list[str] = field(default_factory=list)
    example_ids: list[str] = field(default_factory=list)  # of the rows written, as read back from the shards
    endpoint_rows: list[dict[str, Any]] = field(default_factory=list)  # the router's per-endpoint summary
    client_stats: dict[str, Any] = field(default_factory=dict)  # hedges, requests moved off a silent endpoint …
    started_at: float = 0.0  # time.monotonic() at sample t = 0 (one clock for every process on the machine)

    @property
    def mean_service_s(self) -> float:
        """The stubs' mean slot-holding time (the latency model, as drawn)."""
        return self.stub["service_s"] / max(1, self.stub["served"])

    @property
    def capacity_rps(self) -> float:
        slots = min(self.config.target, self.config.endpoints * self.config.per_endpoint)
        return slots / self.mean_service_s

    def span(self) -> tuple[Sample, Sample]:
        return self.samples[self.window[0]], self.samples[self.window[1]]

    @property
    def sustained_rps(self) -> float:
        a, b = self.span()
        return (b.done - a.done) / max(1e-9, b.t - a.t)

    @property
    def cpu_per_request_s(self) -> float:
        a, b = self.span()
        return (b.cpu_s - a.cpu_s) / max(1, b.done - a.done)

    @property
    def cpu_share(self) -> float:
        a, b = self.span()
        return (b.cpu_s - a.cpu_s) / max(1e-9, b.t - a.t)

    def window_samples(self) -> list[tuple[Sample, Sample]]:
        lo, hi = self.window
        return list(zip(self.samples[lo:hi], self.samples[lo + 1 : hi + 1], strict=True))

    def bound_shares(self) -> tuple[float, float]:
        """(share of the window the endpoints were starved, share they were starved while the factory was busy)."""
        fed_at = FED * min(self.config.target, self.config.endpoints * self.config.per_endpoint)
        pairs = self.window_samples()
        starved = [(a, b) for a, b in pairs if b.stub_open < fed_at]
        busy = [(a, b) for a, b in starved if (b.busy_s - a.busy_s) >= BUSY * (b.t - a.t)]
        return len(starved) / max(1, len(pairs)), len(busy) / max(1, len(pairs))


def steady_window(result: FleetResult) -> tuple[int, int]:
    """From the in-flight target first reached + one mean latency, to the last request issued."""
    s, filled_at = result.samples, min(result.config.target, result.total)
    filled = next((i for i, x in enumerate(s) if x.issued >= filled_at), len(s) - 1)
    lo = next((i for i in range(filled, len(s)) if s[i].t >= s[filled].t + result.mean_service_s), len(s) - 1)
    hi = next((i for i in range(lo, len(s)) if s[i].issued >= result.total), len(s) - 1)
    if hi - lo < 4:  # too short to call steady: the whole run
        result.notes.append("no steady window (too few requests beyond the in-flight target): rate over the whole run")
        return 0, len(s) - 1
    return lo, hi


# --- report ------------------------------------------------------------------------------------------
def report(r: FleetResult) -> str:
    c, m = r.config, r.config.latency
    a, b = r.span()
    starved, cpu_bound = r.bound_shares()
    lags = sorted(x.lag_s for x in r.samples[r.window[0] : r.window[1] + 1]) or [0.0]
    window_open = [x.stub_open for x in r.samples[r.window[0] : r.window[1] + 1]] or [0]
    stub_cpu = r.stub["cpu_s"] / max(1e-9, r.elapsed_s)
    need, goal = plan_rate(), GOAL_FACTOR * plan_rate()
    lines = [
        f"fleet: {c.endpoints} endpoints × max_num_seqs {c.per_endpoint}, client in-flight {c.target}, "
        f"{r.total} requests in shards of ≤ {c.shard_size}",
        f"latency model: TTFT {m.ttft_s}s + {m.tokens}±{m.tokens_spread:.0%} tokens / {m.decode_tokens_per_s} tok/s, "
        f"× time scale {m.time_scale} ⇒ mean {r.mean_service_s:.3f}s per request "
        f"(unscaled {r.mean_service_s / m.time_scale:.1f}s)",
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} / {os.getloadavg()[1]:.1f} "
        f"(1 / 5 min) at the end",
        f"outcome: {r.succeeded} ok, {r.failed} failed, {r.http_attempts} HTTP attempts, {r.rows_written} rows in "
        f"{r.shards_written} Parquet shards; {r.elapsed_s:.1f}s wall; endpoints served "
        f"{min(r.per_endpoint)}–{max(r.per_endpoint)} each",
        f"steady window {a.t:.1f}s–{b.t:.1f}s ({b.done - a.done} completions):",
        f"  requests/s sustained        {r.sustained_rps:9.1f}",
        f"  stubs' capacity             {r.capacity_rps:9.1f} req/s  (min(in-flight, slots) / mean latency); "
        f"achieved {r.sustained_rps / r.capacity_rps:.0%}",
        f"  requests inside the stubs   median {statistics.median(window_open):.0f} of target "
        f"{min(c.target, c.endpoints * c.per_endpoint)} (peak {r.stub['peak_open']}); "
        f"client-side mean latency {r.mean_latency_s:.3f}s, stub queue wait "
        f"{r.stub['queue_wait_s'] / max(1, r.stub['served']):.3f}s",
        f"  client CPU per request      {r.cpu_per_request_s * 1000:9.2f} ms  (factory process CPU / completions)",
        f"  factory CPU                 {r.cpu_share:9.0%} of one core; stub process {stub_cpu:.0%} of one core",
        f"  event-loop lag              p50 {lags[len(lags) // 2] * 1000:.0f} ms, p99 "
        f"{lags[min(len(lags) - 1, int(len(lags) * 0.99))] * 1000:.0f} ms, max {lags[-1] * 1000:.0f} ms",
        f"  factory-bound share         {starved:9.0%} of the window the stubs held < {FED:.0%} of the target; "
        f"{cpu_bound:.0%} with the factory's main thread busy ≥ {BUSY:.0%} (CPU-bound), "
        f"{starved - cpu_bound:.0%} not (a limit inside the factory)",
        f"  peak RSS                    {r.peak_rss_mib:9.0f} MiB (after imports {r.rss_start_mib:.0f} MiB)",
        f"goal: README 10× plan {SAMPLES_10X:,} samples × {ATTEMPTS_PER_SAMPLE} attempts / {GENERATION_S_10X:,}s = "
        f"{need:.1f} req/s; issue goal {GOAL_FACTOR}× = {goal:.0f} req/s; sustained here "
        f"{r.sustained_rps / goal:.2f}× the goal",
    ]
    return "\n".join(lines + [f"note: {n}" for n in r.notes])


def hang_report(clean: FleetResult, hung: FleetResult) -> str:
    """The hung-endpoint scenario beside the fault-free run of the same invocation: time ratio, rows, endpoints."""
    c = hung.config
    ratio = hung.elapsed_s / max(1e-9, clean.elapsed_s)
    doubled = len(hung.example_ids) - len(set(hung.example_ids))
    same = sorted(hung.example_ids) == sorted(clean.example_ids)
    s = hung.client_stats
    lines = [
        f"hung endpoint: 1 of {c.endpoints} endpoints accepts connections and never answers from "
        f"{c.hang_after_s:g}s after the first request"
        + (f" for {c.hang_for_s:g}s" if c.hang_for_s is not None else " on")
        + f"; llm.request_timeout_s {c.request_timeout_s:g}",
        f"  generation time: fault-free {clean.elapsed_s:.1f}s, hung {hung.elapsed_s:.1f}s: ratio {ratio:.2f}x",
        f"  rows: fault-free {len(clean.example_ids)}, hung {len(hung.example_ids)}; doubled {doubled}; "
        f"same example ids: {'yes' if same else 'NO'}; failed requests {hung.failed}",
        f"  client: {s.get('hedges', 0)} hedges ({s.get('hedges_won', 0)} won, "
        f"{s.get('hedges', 0) / max(1, s.get('requests', 1)):.1%} of requests), {s.get('moved_off_silent', 0)} "
        f"requests moved off a silent endpoint; stub: {hung.stub.get('hung', 0)} requests swallowed by the hung one",
        "  endpoint                          requests failures median_s  p99_s  out_s  taken_out  last reason",
    ]
    for row in hung.endpoint_rows:
        lines.append(
            f"  {row['endpoint']:<33} {row['requests']:8} {row['failures']:8} {row['median_latency_s'] or 0:8.3f} "
            f"{row['p99_latency_s'] or 0:6.3f} {row['out_of_rotation_s']:6.1f} {row['taken_out']:10}  "
            f"{row['last_reason']}"
        )
    return "\n".join(lines)


# --- several runs: request paths side by side, client processes ------------------------------------
# A 32-replica fleet as the README's Capacity section assumes it: ~3,000 output tokens/s per replica (an
# assumption from public vLLM reports, not measured here); requests of the latency model's mean token count.
FLEET_REPLICAS = 32
REPLICA_TOKENS_PER_S = 3000.0


@dataclass(frozen=True)
class Figures:
    """Steady-state figures of one run: one client process, or several over their common steady window."""

    client: str
    processes: int
    rps: float
    cpu_per_request_s: float  # all client processes' CPU / their completions
    cpu_share: float  # of one core, all client processes together
    completions: int
    window_s: float
    note: str = ""


def figures(results: list[FleetResult]) -> Figures:
    """One run's figures; for several processes, summed over the window in which all of them were steady."""
    own = [(r.started_at + r.span()[0].t, r.started_at + r.span()[1].t) for r in results]
    lo, hi = max(a for a, _ in own), min(b for _, b in own)
    common = hi - lo >= 1.0
    windows = [(lo, hi)] * len(results) if common else own
    done = sum(_at(r, b, "done") - _at(r, a, "done") for r, (a, b) in zip(results, windows, strict=True))
    cpu = sum(_at(r, b, "cpu_s") - _at(r, a, "cpu_s") for r, (a, b) in zip(results, windows, strict=True))
    if common:
        span, rps, share, note = hi - lo, done / (hi - lo), cpu / (hi - lo), ""
    else:  # each process over its own steady window, summed
        span = statistics.fmean(b - a for a, b in own)
        rps, share = sum(r.sustained_rps for r in results), sum(r.cpu_share for r in results)
        note = "the processes' steady windows barely overlap: each counted over its own"
    client = results[0].config.client
    return Figures(client, len(results), rps, cpu / max(1.0, done), share, round(done), span, note)


def _at(r: FleetResult, when: float, name: str) -> float:
    """A sample counter at absolute time ``when``, interpolated linearly between the samples around it."""
    points = [(r.started_at + s.t, getattr(s, name)) for s in r.samples]
    for (t0, v0), (t1, v1) in zip(points, points[1:], strict=False):
        if t0 <= when <= t1:
            return v0 + (v1 - v0) * (when - t0) / max(1e-9, t1 - t0)
    return points[0][1] if when < points[0][0] else points[-1][1]


def fleet_demand_rps(tokens_per_request: float) -> float:
    """Requests/s a ``FLEET_REPLICAS``-replica fleet answers at ``REPLICA_TOKENS_PER_S`` each."""
    return FLEET_REPLICAS * REPLICA_TOKENS_PER_S / tokens_per_request


def scale_report(runs: list[Figures], processes: int, tokens_per_request: float) -> str:
    """Every run of a ``--processes`` invocation, then the comparisons drawn from them (sums over rounds)."""
    lines = ["run  client  processes   req/s sustained   client CPU/request   client CPU (cores)   window"]
    for k, f in enumerate(runs, 1):
        lines.append(
            f"{k:3}  {f.client:<7} {f.processes:9} {f.rps:17.1f} {f.cpu_per_request_s * 1000:17.2f} ms "
            f"{f.cpu_share:18.2f} {f.window_s:7.1f}s" + (f"  ({f.note})" if f.note else "")
        )

    def pooled(client: str, n: int) -> tuple[float, float]:
        picked = [f for f in runs if f.client == client and f.processes == n]
        done = sum(f.completions for f in picked)
        rps = sum(f.rps * f.window_s for f in picked) / max(1e-9, sum(f.window_s for f in picked))
        return rps, sum(f.cpu_per_request_s * f.completions for f in picked) / max(1, done)

    (old_rps, old_cpu), (one_rps, lean_cpu) = pooled("openai", 1), pooled("lean", 1)
    many_rps, many_cpu = pooled("lean", processes)
    demand = fleet_demand_rps(tokens_per_request)
    lines += [
        f"client CPU per request, 1 process, same invocation (alternating): openai SDK path {old_cpu * 1000:.2f} ms, "
        f"lean path {lean_cpu * 1000:.2f} ms: {old_cpu / max(1e-9, lean_cpu):.1f}× lower "
        f"(req/s {old_rps:.1f} → {one_rps:.1f})",
        f"lean client, sustained req/s: 1 process {one_rps:.1f}, {processes} processes {many_rps:.1f} "
        f"(CPU/request {many_cpu * 1000:.2f} ms): scaling {many_rps / max(1e-9, one_rps):.2f}× for {processes}×",
        f"goal {GOAL_FACTOR * plan_rate():.0f} req/s (10× the 10× plan): {processes} processes sustained "
        f"{many_rps / (GOAL_FACTOR * plan_rate()):.2f}× the goal; machine {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the end",
        f"a {FLEET_REPLICAS}-replica fleet at ~{REPLICA_TOKENS_PER_S:,.0f} output tokens/s per replica and "
        f"{tokens_per_request:.0f} tokens per request answers ≈ {demand:.0f} req/s: "
        f"{-(-demand // max(1e-9, one_rps)):.0f} lean client process(es) at this run's 1-process rate "
        f"({one_rps:.1f} req/s; the openai SDK path: {-(-demand // max(1e-9, old_rps)):.0f} at {old_rps:.1f}); "
        f"a lean process with a core of its own is CPU-bound near {1 / max(1e-9, lean_cpu):.0f} req/s "
        "(1 / its CPU per request)",
    ]
    return "\n".join(lines)
