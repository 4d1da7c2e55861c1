"""Benchmark ``embed-factory import``: rows/s of the import body (read, map, shard, lineage, commit) for the
same rows as KaLM JSONL and as sentence-transformers Parquet, alternating trials.

The rows are synthetic KaLM records (a query, one positive passage of ~60 words, two negatives), written
once to a JSONL file and a Parquet file (anchor/positive/negative); each trial imports one of them into a
fresh data folder with ``flows.importing.import_run`` (no Prefect server: the flow's body), default shard
size. Rows/s is rows over the wall time of the import; the median and range over the trials are printed
per format, and the peak RSS of the process.

    python bench/import_rows.py --rows 200000 --trials 2
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.importing import import_run  # noqa: E402
from ground.settings import load_settings  # noqa: E402
from tasks.importing.shards import ImportOptions  # noqa: E402

WORDS = (
    "the house heat pump winter cold air water energy family garden kitchen window roof wall insulation cost "
    "price neighbour city village engineer summer morning evening system pipe floor door power bill month year "
    "repair service noise comfort temperature river bridge school market library train station museum forest"
).split()


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def write_inputs(folder: Path, rows: int, seed: int = 7) -> tuple[Path, Path]:
    """The same records as KaLM JSONL and as s-t Parquet (anchor, positive, negative)."""
    rng = random.Random(seed)
    jsonl, parquet = folder / "rows.jsonl", folder / "rows.parquet"
    columns: dict[str, list[str]] = {"anchor": [], "positive": [], "negative": []}
    with jsonl.open("w") as fh:
        for i in range(rows):
            query, positive = f"{text(rng, 8)} ({i})", text(rng, 60)
            negatives = [text(rng, 60), text(rng, 60)]
            fh.write(json.dumps({"query": query, "pos": [positive], "neg": negatives, "task_name": "retrieval"}) + "\n")
            for name, value in zip(columns, (query, positive, negatives[0]), strict=True):
                columns[name].append(value)
    pq.write_table(pa.table(columns), parquet, row_group_size=50_000)
    return jsonl, parquet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--trials", type=int, default=2, help="trials per format (alternating)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        jsonl, parquet = write_inputs(folder, args.rows)
        rates: dict[str, list[float]] = {"jsonl": [], "parquet": []}
        for trial in range(args.trials):
            for name, path in (("jsonl", jsonl), ("parquet", parquet)):
                settings = load_settings(storage={"data_dir": folder / f"data-{name}-{trial}"})
                started = time.perf_counter()
                summary = import_run(settings, "bench", [str(path)], ImportOptions())
                elapsed = time.perf_counter() - started
                assert summary.rows == args.rows, summary
                rates[name].append(args.rows / elapsed)
                print(f"trial {trial + 1} {name:7s} {args.rows / elapsed:10,.0f} rows/s ({elapsed:.1f} s)", flush=True)
    print(f"\nimport of {args.rows:,} rows (median over {args.trials} trial(s), range):")
    for name, values in rates.items():
        print(f"  {name:7s} {statistics.median(values):10,.0f} rows/s  ({min(values):,.0f} .. {max(values):,.0f})")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


if __name__ == "__main__":
    main()
