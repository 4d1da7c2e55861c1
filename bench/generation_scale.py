"""Benchmark the generation side at the mission's size: ``embed-factory run --no-clean`` against a stub fleet.

The factory runs as a user runs it: the CLI (``python -m embed_factory.cli run --no-clean --profile
production``) with ``--instructions`` unique brainstormed instructions (intents: the semantic dedup with the
real all-MiniLM-L6-v2) and ``--examples`` examples over all six task types, in the production profile's
shards (500 rows, 8 in flight) and request budgets; then ``embed-factory query`` over the result (the
catalog refreshes its views from every shard). Only the LLM is a double: ``bench/fleet_stub.py``'s endpoints
(slots per endpoint, TTFT + tokens / decode rate, times ``--time-scale``), answering with
``tests/support/prod_stub_llm.py``'s production-length, schema-valid JSON (1 % not JSON, 4 % duplicates),
its brainstorms about topics of random English words (:func:`diverse_brainstorm`: the stub's own run out of
distinct intents after a few thousand).
Personas are the bundled seed set (the production profile's Hub set needs the network).

Printed at the end: wall time of the run (brainstorm and examples phases from the shards' commit times),
peak RSS of the CLI's process tree, requests and rows, the manifest's size, ``query``'s wall time and RSS,
and the per-shard commit cost at the start vs the end: ``RunStore.write_shard`` of a 500-row and a 1-row
shard timed into an empty run and into the finished run (a commit writes one manifest.d entry; a cost that
grew with the shards would show as the 1-row shard's cost at the end over the start).

    python bench/generation_scale.py --instructions 2000 --examples 20000      # minutes
    python bench/generation_scale.py                                            # 40k / 550k: hours
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE), str(ROOT / "tests")]

from clean_growth import GIB, guarded, prefect_api  # noqa: E402

RUN_ID = "scale"
QUERY = "SELECT task_type, count(*) AS examples FROM raw GROUP BY 1 ORDER BY 1"
PROBES = 5  # shards per commit-cost probe


def serve_fleet(argv: list[str]) -> None:
    """The stub fleet process: ``fleet_stub`` endpoints whose answers are the production-length stub's."""
    import asyncio

    import fleet_stub

    from support import prod_stub_llm

    prod_stub_llm.brainstorm = diverse_brainstorm
    prod = prod_stub_llm.ProdStubLLM(seed=0)
    fleet_stub.answer = lambda request, **_: prod.reply(request)[0]
    fleet_stub.raise_open_files_limit()
    asyncio.run(fleet_stub.serve(fleet_stub.parser().parse_args(argv)))


def diverse_brainstorm(prompt: str, rng, schema: dict) -> dict[str, list[str]]:
    """Brainstormed tasks about topics of three random English words (as many as the schema's maxItems).

    The production-length stub's tasks draw their topic from a few hundred phrases, so at the intent threshold
    (cosine 0.85, MiniLM) they run out of distinct intents after a few thousand; a 72B model's do not."""
    from growth_rows import english_vocabulary

    global VOCABULARY
    VOCABULARY = VOCABULARY or english_vocabulary()
    rng = DRAWS  # not the stub's per-prompt rng: a prompt asked again (same persona, same type) must get new tasks,
    # as a sampled 72B answer does, or the run asks the same few thousand prompts round after round
    n = schema["properties"]["tasks"].get("maxItems", 6)
    kind = prompt.split("useful ")[-1].split(" tasks")[0] if "useful " in prompt else "matching"
    tasks: list[str] = []
    while len(tasks) < n:
        a, b, c = (rng.choice(VOCABULARY) for _ in range(3))
        task = f"Given a question about {a} and {b} in {c}, find {kind} texts that answer it."
        if task not in tasks:
            tasks.append(task)
    return {"tasks": tasks}


VOCABULARY: list[str] = []
DRAWS = random.Random(0)


@contextmanager
def stub_fleet(args: argparse.Namespace) -> Iterator[dict]:
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-fleet", "--endpoints", str(args.endpoints)]
    command += ["--per-endpoint", str(args.per_endpoint), "--time-scale", str(args.time_scale)]
    command += ["--max-seconds", str(args.time_limit + 600)]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=120)
        if not ready or not ready[0].strip():
            raise SystemExit(f"error: the stub fleet did not start (exit code {proc.poll()})")
        yield json.loads(ready[0])
    finally:
        proc.stdin.close()  # the stub's signal to stop
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cli_env(data: Path, fleet: dict, api_url: str, args: argparse.Namespace) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "EMBED_FACTORY_STORAGE__DATA_DIR": str(data),
        "EMBED_FACTORY_LLM__BASE_URLS": json.dumps(fleet["urls"]),
        "EMBED_FACTORY_LLM__MODEL": fleet["model"],
        "EMBED_FACTORY_LLM__MAX_IN_FLIGHT": str(args.endpoints * args.per_endpoint),
        "EMBED_FACTORY_PERSONAS__SOURCE": "seed",
        "EMBED_FACTORY_PREFECT__API_URL": api_url,
        "PREFECT_API_URL": api_url,
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "TQDM_DISABLE": "1",
        "NO_COLOR": "1",
    }
    if args.intent_threshold is not None:
        env["EMBED_FACTORY_GENERATION__INTENT_THRESHOLD"] = args.intent_threshold
    return env


def phase_spans(run: Path) -> dict[str, tuple[float, float, int]]:
    """Per shard kind: (first commit, last commit, shards) from the data files' modification times."""
    spans = {}
    for kind in ("brainstorm", "examples"):
        times = sorted(p.stat().st_mtime for p in (run / kind).glob("*.parquet"))
        if times:
            spans[kind] = (times[0], times[-1], len(times))
    return spans


def commit_cost(data: Path, run_id: str, rows: list[dict], label: str) -> dict[str, float]:
    """Median seconds of ``write_shard`` of ``rows`` and of one row, ``PROBES`` times each, into run ``run_id``."""
    from storage.shards import RunStore

    store = RunStore(data, run_id)
    out = {}
    for name, shard in (("500 rows", rows), ("1 row", rows[:1])):
        seconds = []
        for k in range(PROBES):
            shard_id = f"probe-{label}-{len(shard)}-{k}"
            started = time.perf_counter()
            store.write_shard("examples", shard_id, shard, [])
            seconds.append(time.perf_counter() - started)
        out[name] = statistics.median(seconds)
    return out


def manifest_bytes(run: Path) -> tuple[int, int]:
    """(bytes, files) of the run's manifest: its manifest.d entries (and a legacy manifest.json)."""
    files = [p for p in run.rglob("*") if p.is_file() and (p.name == "manifest.json" or "manifest.d" in p.parts)]
    return sum(p.stat().st_size for p in files), len(files)


def main() -> None:
    if sys.argv[1:2] == ["--serve-fleet"]:
        serve_fleet(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instructions", type=int, default=40_000, help="unique brainstormed instructions (intents)")
    p.add_argument("--examples", type=int, default=550_000, help="examples over all six task types")
    p.add_argument("--endpoints", type=int, default=16)
    p.add_argument("--per-endpoint", type=int, default=16, help="max_num_seqs per stub endpoint")
    p.add_argument("--time-scale", type=float, default=0.01, help="multiplies the stub's latencies")
    p.add_argument("--intent-threshold", default=None, help="override generation.intent_threshold ('null': off)")
    p.add_argument("--max-rss-gib", type=float, default=8.0, help="stop the run if its RSS passes this")
    p.add_argument("--time-limit", type=float, default=6 * 3600.0, help="stop the run after this many seconds")
    p.add_argument("--work", type=Path, default=None, help="folder for the data (default: a temp folder)")
    args = p.parse_args()
    if min(args.instructions, args.examples, args.endpoints, args.per_endpoint) < 1 or args.time_scale <= 0:
        p.error("counts must be >= 1 and --time-scale > 0")
    print(
        f"generation at scale: {args.instructions:,} instructions, {args.examples:,} examples; stub fleet "
        f"{args.endpoints} x {args.per_endpoint} slots, time scale {args.time_scale:g}; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work, prefix="generation-scale-") as tmp, prefect_api() as api_url:
        data, run = Path(tmp) / "data", Path(tmp) / "data" / "runs" / RUN_ID
        with stub_fleet(args) as fleet:
            env = cli_env(data, fleet, api_url, args)
            cli = [sys.executable, "-m", "embed_factory.cli"]
            command = [*cli, "run", "--no-clean", "--profile", "production", "--run-id", RUN_ID]
            command += ["--instructions", str(args.instructions), "--examples", str(args.examples), "--seed", "0"]
            started = time.time()
            code, output, stopped, peak = guarded(command, env, ROOT, args.max_rss_gib * GIB, args.time_limit, None)
            wall = time.time() - started
        if stopped or code != 0:
            sys.exit(f"error: the run {'stopped ' + stopped if stopped else f'failed (exit {code})'}:\n{output}")
        query_started = time.time()
        q_code, q_output, q_stopped, q_peak = guarded(
            [*cli, "query", QUERY], env, ROOT, args.max_rss_gib * GIB, 3600, None
        )
        query_s = time.time() - query_started
        if q_stopped or q_code != 0:
            sys.exit(f"error: query failed ({q_stopped or q_code}):\n{q_output}")
        size, files = manifest_bytes(run)
        spans = phase_spans(run)
        import pyarrow.parquet as pq

        first_shard = sorted((run / "examples").glob("*.parquet"))[0]
        rows = pq.read_table(first_shard).slice(0, 500).to_pylist()
        end_cost = commit_cost(data, RUN_ID, rows, "end")
        start_cost = commit_cost(Path(tmp) / "fresh", "fresh", rows, "start")
    print(output[-1500:])
    print(q_output[-1200:])
    print(f"run: wall {wall:.0f} s, peak RSS {peak / GIB:.2f} GiB (CLI process tree)")
    for kind, (first, last, shards) in spans.items():
        print(f"  {kind}: {shards} shards, committed from {first - started:.0f} s to {last - started:.0f} s")
    print(f"manifest: {size / 1024:.0f} KiB in {files} file(s)")
    print(f"query (catalog refresh + SQL): {query_s:.1f} s, peak RSS {q_peak / GIB:.2f} GiB")
    print("per-shard commit (write_shard, median of 5): into an empty run vs into the finished run")
    for name in start_cost:
        print(
            f"  {name:>8}: start {start_cost[name] * 1000:8.1f} ms   end {end_cost[name] * 1000:8.1f} ms   "
            f"x{end_cost[name] / start_cost[name]:.1f}"
        )
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
