"""Benchmark: what one shard commit costs when the run already holds 10 vs 1,000 shards.

A commit writes the shard's rejects and data files and its manifest entry (``RunStore.write_shard``).
With one ``manifest.json`` (before manifest.d) every commit read and rewrote the whole file, so its cost
grew with the run (quadratic over a run); with one entry file per shard it should not.

It uses only ``RunStore(...).write_shard`` (and ``claim`` where the store has it), so the same script
measures an older checkout: run it with that checkout first on ``PYTHONPATH``. Each size is measured on a
fresh run: ``size`` one-row shards committed first, then ``--commits`` more timed one by one (median and
mean per commit, milliseconds), alternating sizes ``--repeats`` times in one process.

    PYTHONPATH=$PWD python bench/shard_commit.py --sizes 10 1000
    PYTHONPATH=/tmp/old-checkout python bench/shard_commit.py --sizes 10 1000   # the same, before
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from storage.shards import RunStore


def _row(shard: str, i: int) -> dict:
    return {
        "example_id": f"bench:{shard}-{i}",
        "run_id": "bench",
        "shard_id": shard,
        "task_type": "retrieval",
        "instruction": "Retrieve a passage.",
        "instruction_id": "retrieval-000001",
        "persona_id": "p",
        "persona": "A person.",
        "placeholders": "{}",
        "prompt_version": "v1",
        "model": "m",
        "sampling": "{}",
        "attempts": 1,
        "prompt_tokens": 10,
        "completion_tokens": 10,
        "latency_s": 0.1,
        "finish_reason": "stop",
        "query": f"query {shard} {i}",
        "positive": "a positive passage",
        "negative": None,
        "parsed": "{}",
        "raw_text": "{}",
        "created_at": datetime.now(UTC),
    }


def _commit(store: RunStore, shard: str) -> None:
    claim = getattr(store, "claim", None)
    with claim("examples", shard) if claim else contextlib.nullcontext():
        store.write_shard("examples", shard, [_row(shard, 0)], [])


def measure(size: int, commits: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(Path(tmp), "bench")
        for k in range(size):
            _commit(store, f"g00-{k:05d}")
        times = []
        for k in range(size, size + commits):
            started = time.perf_counter()
            _commit(store, f"g00-{k:05d}")
            times.append(time.perf_counter() - started)
        return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--commits", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results: dict[int, list[float]] = {n: [] for n in args.sizes}
    for _ in range(args.repeats):
        for n in args.sizes:
            results[n] += measure(n, args.commits)
    checkout = Path(__import__("storage").__path__[0]).parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=checkout).stdout
    head = head.strip()
    layout = "manifest.d entries" if hasattr(RunStore, "has_manifest") else "single manifest.json"
    print(f"shard commit cost ({layout}; {checkout} at {head})")
    for n, times in results.items():
        ms = [t * 1000 for t in times]
        print(f"  run holds {n:>5} shards: median {statistics.median(ms):7.2f} ms, mean {statistics.mean(ms):7.2f} ms")
    print(json.dumps({str(n): round(statistics.median(t) * 1000, 3) for n, t in results.items()}))


if __name__ == "__main__":
    main()
