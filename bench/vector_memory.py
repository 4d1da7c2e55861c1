"""Peak memory of the vector steps of ``clean`` before and after issue 23: decontamination's embedding check
and ``embed_for_ranking``, on the same rows, each side in a fresh subprocess, alternating which goes first.

Rows: ``bench/clean_growth.py``'s synthetic rows (read from one Parquet file, so a child's baseline is small);
eval texts: the bundled STS-B test splits (as ``flows/eval_texts.py`` gathers them); embedder: its
deterministic ``HashBagEmbedder`` (384 dims). Every child starts with an empty embedding cache.

* ``before``: the code of 271e9b7 (``bench/vectors_before.py``): the cache as one in-memory matrix keyed by
  hex strings, ranking vectors as in-memory arrays and lists, two vectors copied per candidate pair.
* ``after``: ``storage/embedding_cache.py`` + ``tasks/cleaning``: vectors written block by block to
  memory-mapped files (decontamination through ``encode_to_file``); ``after-mem``: decontamination with
  ``encode_cached`` (an in-memory matrix of the distinct texts), as ``flows/clean.py`` calls it at this commit.

A thread samples ``/proc/self/status`` every 10 ms: peak ``VmRSS`` (all resident memory, mapped file pages
included) and peak ``RssAnon`` (process memory, what the machine cannot drop), minus the baseline taken
after reading the rows. A child over ``--max-gib`` of RSS stops itself (reported as ``over``). The sides'
results are compared (decisions; corpus, positive ids and vector bytes) and must be equal.

    python bench/vector_memory.py --sizes 50000 200000

Printed by runs at dd4e189..d65ddf5 on the shared 2-core machine (load ~16-20: seconds are noise; peaks over baseline,
GiB, anon / RSS): ranking 50k 0.79 / 0.80 before, 0.14 / 0.30 after; ranking 200k 3.10 / 3.11 before,
0.21 / 0.75 after; decontaminate 50k 1.58 before, 0.21 / 0.31 after (0.37 anon with encode_cached);
100k 3.05 before, 0.28 / 0.49 after; 200k before stopped over 6 GiB, 0.37 / 0.82 after.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

GIB = 1 << 30
SIDES = {"decontaminate": ("before", "after", "after-mem"), "ranking": ("before", "after")}


class Peak(threading.Thread):
    """Peak VmRSS and RssAnon (bytes) of this process, sampled every 10 ms; over ``limit`` it exits."""

    def __init__(self, limit: int):
        super().__init__(daemon=True)
        self.limit, self.rss, self.anon, self.stop = limit, 0, 0, False

    @staticmethod
    def now() -> tuple[int, int]:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["RssAnon"].split()[0]) * 1024

    def run(self) -> None:
        while not self.stop:
            rss, anon = self.now()
            self.rss, self.anon = max(self.rss, rss), max(self.anon, anon)
            if rss > self.limit:
                print(json.dumps({"over": rss}), flush=True)
                os._exit(3)
            time.sleep(0.01)


def digest(parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()[:16]


def child(part: str, side: str, rows_path: Path, work: Path, limit: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from clean_growth import HashBagEmbedder
    from decontaminate import sts_eval_texts
    from vectors_before import OldEmbeddingCache, old_embed_for_ranking, old_encode_cached, old_find_matches

    from ground.settings import CleanSettings
    from storage.corpus import CleanStore
    from storage.embedding_cache import EmbeddingCache, encode_cached, encode_to_file
    from tasks.cleaning.decontaminate import EvalIndex, find_matches
    from tasks.cleaning.embed import embed_for_ranking

    table = pq.read_table(rows_path)
    cfg, embedder = CleanSettings(), HashBagEmbedder()
    cache_dir = work / "embeddings"
    index = EvalIndex.build(sts_eval_texts(), cfg.decontaminate_ngram) if part == "decontaminate" else None
    gc.collect()
    base_rss, base_anon = Peak.now()
    peak = Peak(limit)
    peak.start()
    started = time.perf_counter()
    if part == "decontaminate":
        encode = {
            "before": lambda texts: old_encode_cached(texts, embedder, OldEmbeddingCache(cache_dir)),
            "after": lambda texts: encode_to_file(texts, embedder, EmbeddingCache(cache_dir), work / "decon.npy"),
            "after-mem": lambda texts: encode_cached(texts, embedder, EmbeddingCache(cache_dir)),
        }[side]
        found = (old_find_matches if side == "before" else find_matches)(table, index, cfg, encode)
    elif side == "before":
        queries, corpus, corpus_vecs, positive_idx = old_embed_for_ranking(
            table, embedder, OldEmbeddingCache(cache_dir)
        )
    else:
        vectors = embed_for_ranking(table, cfg, CleanStore(work, "bench"), embedder)
        queries, corpus_vecs, positive_idx = vectors.query_vecs, vectors.corpus_vecs, vectors.positive_idx
    seconds = time.perf_counter() - started
    peak.stop = True  # the peak of the step alone: the checks below copy what they hash
    peak.join()
    if part == "decontaminate":
        result = json.dumps(sorted((row, m.field, m.eval_id, m.how) for row, m in found.items())).encode()
        check, detail = digest([result]), f"{len(found)} rows matched"
    else:
        texts = vectors.corpus_texts if side != "before" else pa.array(corpus, pa.large_string())
        blocks = (texts.slice(i, 65536).to_pylist() for i in range(0, len(texts), 65536))
        parts = [json.dumps(block).encode() for block in blocks]
        detail = f"corpus {len(corpus_vecs)}"
        rows = (m[i : i + 65536].tobytes() for m in (queries, corpus_vecs) for i in range(0, len(m), 65536))
        check = digest([*parts, positive_idx.tobytes(), *rows])
    return {
        "seconds": seconds,
        "rss": peak.rss - base_rss,
        "anon": peak.anon - base_anon,
        "base": base_rss,
        "check": check,
        "detail": detail,
    }


def run_child(part: str, side: str, rows_path: Path, max_gib: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="vector-memory-") as work:
        args = [sys.executable, __file__, "--child", part, side, str(rows_path), work, str(int(max_gib * GIB))]
        done = subprocess.run(args, capture_output=True, text=True, check=False)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "{}"
    if done.returncode not in (0, 3):
        raise SystemExit(f"error: {part}/{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--parts", nargs="+", default=list(SIDES), choices=list(SIDES))
    parser.add_argument("--sides", nargs="+", default=["before", "after", "after-mem"])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-gib", type=float, default=6.0)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        part, side, rows_path, work, limit = args.child
        print(json.dumps(child(part, side, Path(rows_path), Path(work), int(limit))), flush=True)
        return

    import pyarrow as pa
    import pyarrow.parquet as pq
    from growth_rows import synthetic_rows

    print(f"{'rows':>8} {'part':<14} {'side':<10} {'seconds':>8} {'peak RSS':>9} {'peak anon':>10}  result")
    with tempfile.TemporaryDirectory(prefix="vector-memory-rows-") as folder:
        for k, n in enumerate(args.sizes):
            rows_path = Path(folder) / f"rows-{n}.parquet"
            rows = synthetic_rows(n, "bench-run", args.seed)
            pq.write_table(pa.Table.from_pylist(rows), rows_path)
            del rows
            gc.collect()
            for part in args.parts:
                chosen = [side for side in SIDES[part] if side in args.sides]
                sides = chosen if k % 2 == 0 else chosen[::-1]  # alternate which side runs first
                results = {side: run_child(part, side, rows_path, args.max_gib) for side in sides}
                for side in chosen:
                    r = results[side]
                    if "over" in r:
                        print(f"{n:>8} {part:<14} {side:<10} {'-':>8} {'>' + str(args.max_gib):>9} GiB (stopped)")
                        continue
                    print(
                        f"{n:>8} {part:<14} {side:<10} {r['seconds']:8.1f} {r['rss'] / GIB:8.2f}G "
                        f"{r['anon'] / GIB:9.2f}G  {r['detail']} [{r['check']}]",
                        flush=True,
                    )
                checks = {results[s]["check"] for s in chosen if "check" in results[s]}
                verdict = "same result on every side that finished" if len(checks) == 1 else "RESULTS DIFFER"
                print(f"{'':>8} {part:<14} {verdict}")


if __name__ == "__main__":
    main()
