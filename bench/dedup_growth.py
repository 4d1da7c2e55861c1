"""Benchmark how dedup (exact + near, as the ``clean`` flow's Dedup step runs it) grows with its input:
today's ``tasks.cleaning.dedup`` against the near dedup it replaced, side by side in one run.

For each size, ``bench/clean_growth.py``'s synthetic rows (generated-looking English rows with 2 % exact
and 2 % near duplicates) are written to a Parquet file by a child process; then each implementation runs
in a fresh child of its own (alternating which goes first), so peak RSS (``ru_maxrss``) is per run.
A run is what the flow's Dedup step does with a sequential runner: ``exact_dedup``, then
``split_by_task_type`` and one near pass per task type, merged. The table of rows is in memory in both,
so the RSS growth above the loaded table is printed too. The dropped rows of both are compared:
``same drops`` says whether the two sets of (example_id, reason, detail) are equal.

"old" is the near dedup of commit 271e9b7 (one ``RMinHash`` object per text, ``RMinHashLSH``, every
candidate pair verified in a Python loop over a union-find), kept below only to be measured against;
exact dedup is the same code in both.

    python bench/dedup_growth.py                       # 25k, 50k, 100k, 200k rows
    python bench/dedup_growth.py --sizes 50000 --only new
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ground.settings import CleanSettings  # noqa: E402
from storage.corpus import Drops, StageResult  # noqa: E402
from tasks.cleaning import dedup  # noqa: E402

IMPLS = ("old", "new")


# --- the replaced near dedup (271e9b7), only to compare with --------------------------------------
class OldUnionFind:
    """Union-find whose root is always the smallest member (members are positions in sorted order)."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb


def old_near_clusters(texts: list[str], cfg: CleanSettings) -> list[int]:
    from rensa import RMinHash, RMinHashLSH

    from tasks.cleaning.dedup_minhash import MINHASH_SEED
    from tasks.cleaning.dedup_near import lsh_bands

    n = len(texts)
    if n < 2:
        return list(range(n))
    sketches, k = [], cfg.shingle_size
    for start in range(0, n, 2048):
        batch = [
            [t[i : i + k] for i in range(len(t) - k + 1)] if len(t) > k else [t] for t in texts[start : start + 2048]
        ]
        sketches.extend(RMinHash.from_token_sets(batch, num_perm=cfg.minhash_num_perm, seed=MINHASH_SEED))
    lsh = RMinHashLSH(
        cfg.near_dup_threshold, cfg.minhash_num_perm, lsh_bands(cfg.minhash_num_perm, cfg.near_dup_threshold)
    )
    lsh.insert_many(sketches)
    uf = OldUnionFind(n)
    find, threshold = uf.find, cfg.near_dup_threshold
    for i, candidates in enumerate(lsh.query_all(sketches)):
        if len(candidates) < 2:
            continue
        sketch = sketches[i]
        for j in candidates:
            if j > i and find(i) != find(j) and sketch.jaccard(sketches[j]) >= threshold:
                uf.union(i, j)
    return [find(i) for i in range(n)]


def _old_sort_order(example_ids: list) -> np.ndarray:
    keyed = [("\U0010ffff" * 2 if e is None else e, i) for i, e in enumerate(example_ids)]
    return np.array([i for _, i in sorted(keyed)], dtype=np.int64)


def _old_near_pass(example_ids, task_types, texts, candidates, cfg) -> dict[int, int]:
    dropped: dict[int, int] = {}
    by_type: dict[str, list[int]] = {}
    for i in candidates:
        by_type.setdefault(task_types[i], []).append(int(i))
    for task_type in sorted(by_type, key=str):
        rows = by_type[task_type]
        rows = [rows[j] for j in _old_sort_order([example_ids[i] for i in rows])]
        for pos, rep in enumerate(old_near_clusters([texts[i] for i in rows], cfg)):
            if rep != pos:
                dropped[rows[pos]] = rows[rep]
    return dropped


def old_near_dedup(table: pa.Table, cfg: CleanSettings) -> StageResult:
    """``tasks.cleaning.dedup.near_dedup`` as of 271e9b7."""
    n = table.num_rows
    example_ids = table.column("example_id").to_pylist()
    task_types = table.column("task_type").to_pylist()
    qn, pn = dedup.dedup_keys(table.column("query")), dedup.dedup_keys(table.column("positive"))
    q_len = pc.fill_null(pc.utf8_length(qn), 0).to_numpy(zero_copy_only=False)
    p_len = pc.fill_null(pc.utf8_length(pn), 0).to_numpy(zero_copy_only=False)
    q_dropped = _old_near_pass(
        example_ids, task_types, qn.to_pylist(), np.flatnonzero(q_len >= dedup.NEAR_MIN_CHARS), cfg
    )
    alive = np.ones(n, dtype=bool)
    alive[list(q_dropped)] = False
    is_doc = pc.is_in(table.column("task_type"), value_set=pa.array(dedup.NEAR_POSITIVE_TYPES))
    is_doc = is_doc.to_numpy(zero_copy_only=False)
    p_candidates = np.flatnonzero(alive & is_doc & (p_len >= dedup.NEAR_MIN_CHARS))
    p_dropped = _old_near_pass(example_ids, task_types, pn.to_pylist(), p_candidates, cfg)
    rows, reasons, details = [], [], []
    for dropped, reason, field in (
        (q_dropped, "near_duplicate_query", "query"),
        (p_dropped, "near_duplicate_positive", "positive"),
    ):
        for row, rep in dropped.items():
            rows.append(row)
            reasons.append(reason)
            details.append(f"{field} near-duplicate of {example_ids[rep]} (Jaccard >= {cfg.near_dup_threshold:g})")
    return StageResult.split(table, dedup.STAGE_NEAR, Drops(np.array(rows, dtype=np.int64), reasons, details))


def old_near_dedup_part(part: pa.Table, cfg: CleanSettings) -> StageResult:
    result = old_near_dedup(part, cfg)
    kept_rows = set(result.kept.column(dedup._ROW).to_pylist())
    dropped_rows = [r for r in part.column(dedup._ROW).to_pylist() if r not in kept_rows]
    return StageResult(
        kept=result.kept, dropped=result.dropped.append_column(dedup._ROW, pa.array(dropped_rows, pa.int64()))
    )


# --- one run ---------------------------------------------------------------------------------------
def run_dedup(table: pa.Table, cfg: CleanSettings, impl: str) -> tuple[StageResult, float, float]:
    """What the flow's Dedup step does (sequential runner): (result, exact seconds, near seconds)."""
    part_fn = old_near_dedup_part if impl == "old" else dedup.near_dedup_part
    started = time.perf_counter()
    exact = dedup.exact_dedup(table)
    exact_s = time.perf_counter() - started
    started = time.perf_counter()
    parts = dedup.split_by_task_type(exact.kept)
    near = dedup.merge_near_parts(exact.kept, [part_fn(p, cfg) for p in parts.values()])
    near_s = time.perf_counter() - started
    return StageResult(near.kept, pa.concat_tables([exact.dropped, near.dropped])), exact_s, near_s


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def child(impl: str, rows_file: Path, drops_file: Path) -> None:
    table = pq.read_table(rows_file)
    loaded = peak_rss_gib()
    result, exact_s, near_s = run_dedup(table, CleanSettings(), impl)
    pq.write_table(result.dropped.select(["example_id", "reason", "detail"]), drops_file)
    print(json.dumps({"exact_s": exact_s, "near_s": near_s, "rss_gib": peak_rss_gib(), "loaded_gib": loaded}))


def make_rows(n: int, seed: int, rows_file: Path) -> None:
    from growth_rows import synthetic_rows  # bench/ is on the path (this script's folder, or pytest's pythonpath)

    from storage.schemas import EXAMPLE_SCHEMA

    pq.write_table(pa.Table.from_pylist(synthetic_rows(n, "bench-run", seed), schema=EXAMPLE_SCHEMA), rows_file)


def drop_set(path: Path) -> set[tuple]:
    t = pq.read_table(path)
    return set(zip(*(t.column(c).to_pylist() for c in ("example_id", "reason", "detail")), strict=True))


def growth_exponent(rows: list[int], seconds: list[float]) -> float:
    if len(rows) < 2:
        return math.nan
    return float(np.polyfit(np.log(rows), np.log(seconds), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[25_000, 50_000, 100_000, 200_000])
    parser.add_argument("--only", choices=IMPLS, help="run one implementation")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "ROWS", "DROPS"), help=argparse.SUPPRESS)
    parser.add_argument("--make-rows", nargs=2, metavar=("N", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return
    if args.make_rows:
        make_rows(int(args.make_rows[0]), args.seed, Path(args.make_rows[1]))
        return
    impls = [args.only] if args.only else list(IMPLS)
    me = [sys.executable, str(Path(__file__).resolve())]
    results: dict[str, list[dict]] = {impl: [] for impl in impls}
    print(
        f"{'rows':>8} {'impl':>4} {'exact s':>8} {'near s':>8} {'total s':>8} {'peak GiB':>9} {'+table GiB':>10} drops"
    )
    with tempfile.TemporaryDirectory(prefix="dedup-growth-") as tmp:
        for k, n in enumerate(args.sizes):
            rows_file = Path(tmp) / f"rows-{n}.parquet"
            subprocess.run([*me, "--seed", str(args.seed), "--make-rows", str(n), str(rows_file)], check=True)
            drops = {}
            for impl in impls if k % 2 == 0 else impls[::-1]:
                drops[impl] = Path(tmp) / f"drops-{impl}-{n}.parquet"
                out = subprocess.run(
                    [*me, "--child", impl, str(rows_file), str(drops[impl])], check=True, capture_output=True, text=True
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r.update(rows=n, total_s=r["exact_s"] + r["near_s"], drops=len(drop_set(drops[impl])))
                results[impl].append(r)
                print(
                    f"{n:>8} {impl:>4} {r['exact_s']:>8.2f} {r['near_s']:>8.2f} {r['total_s']:>8.2f} "
                    f"{r['rss_gib']:>9.2f} {r['rss_gib'] - r['loaded_gib']:>10.2f} {r['drops']}",
                    flush=True,
                )
            if len(drops) == 2:
                old, new = drop_set(drops["old"]), drop_set(drops["new"])
                print(f"{n:>8} same drops: {old == new} (only old: {len(old - new)}, only new: {len(new - old)})")
    print("\ngrowth exponent (log-log fit over the sizes):")
    for impl, rs in results.items():
        ns = [r["rows"] for r in rs]
        print(
            f"  {impl}: near {growth_exponent(ns, [r['near_s'] for r in rs]):.2f}, "
            f"exact {growth_exponent(ns, [r['exact_s'] for r in rs]):.2f}, "
            f"total {growth_exponent(ns, [r['total_s'] for r in rs]):.2f}, "
            f"peak RSS {growth_exponent(ns, [r['rss_gib'] for r in rs]):.2f}"
        )


if __name__ == "__main__":
    main()
