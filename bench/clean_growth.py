"""Benchmark how the real ``clean`` flow grows with its input: time and peak RSS per stage, and the exponent.

For each size, synthetic generation shards (``storage.shards.RunStore``, ``EXAMPLE_SCHEMA``) are written
to a fresh data folder, then the ``clean`` flow (``flows.clean``) runs on them in a fresh subprocess, so
peak RSS is per size. The rows read like generated data: English sentences about a few domains, a
product name shared by a query and its positive, 1 % invalid rows, 2 % exact and 2 % near duplicates,
and 15 % vague queries whose positive ranks low, so every stage has real work.

Stages are timed from outside the flow: the stage functions it calls (``validate_examples``,
``exact_dedup``, ``encode_cached``, ``rank_filter``, ``mine_hard_negatives``, ``export_corpus``,
``Catalog.refresh``, ``write_report``, ...) are wrapped wherever ``flows``/``tasks`` modules bind them,
and each stage runs from its first function's start to the next stage's, so a stage includes its
table writes (the ``filtered`` table is written after mining and counts there); ``setup`` is the flow's
start before validation, ``finish`` its summary after the report. A thread samples RSS every 20 ms and
keeps the maximum per stage. The flow's own ``stage_seconds`` is printed alongside as a cross-check.
A stage whose functions were never called is reported as missing (its time then sits in the stage
before it).

Model time is excluded: the embedder is replaced (``make_embedder``, the injection point) by a
deterministic bag-of-words hashing embedder (384 dims), and loading the real model is made to fail.
all-MiniLM-L6-v2's throughput is measured by ``bench/cleaning.py``.

    python bench/clean_growth.py --quick                     # 5k, 10k, 20k, 40k rows
    python bench/clean_growth.py                             # 25k, 50k, 100k, 200k rows (exact search: ~n^2)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("validate", "dedup", "embed", "filter", "mine", "export", "report")
#: (module, function) -> stage: the functions whose first call starts a stage
HOOKS = {
    ("tasks.cleaning.validate", "validate_examples"): "validate",
    ("tasks.cleaning.dedup", "exact_dedup"): "dedup",
    ("tasks.cleaning.dedup", "near_dedup_part"): "dedup",
    ("tasks.cleaning.dedup", "near_dedup"): "dedup",
    ("tasks.cleaning.embed", "encode_cached"): "embed",
    ("tasks.cleaning.search", "build_index"): "filter",
    ("tasks.cleaning.rank_filter", "rank_filter"): "filter",
    ("tasks.cleaning.negatives", "mine_hard_negatives"): "mine",
    ("tasks.cleaning.export", "export_corpus"): "export",
    ("tasks.cleaning.report", "write_report"): "report",
}
EMBED_DIM = 384

# --- synthetic generation shards --------------------------------------------------------------
DOMAINS = {
    "garden": "fern compost soil pot root seedling hedge lawn mulch trowel greenhouse tomato aphid pruning",
    "bike": "brake chain derailleur tyre saddle rotor spoke crank pedal cassette frame fork caliper gear",
    "kitchen": "oven blender kettle dough starter knife skillet pantry yeast flour sauce grill freezer",
    "laptop": "fan battery keyboard screen charger driver firmware trackpad hinge speaker webcam port",
    "travel": "passport visa ticket luggage hostel ferry airport border consulate itinerary railway",
    "music": "piano scale chord metronome violin string tuning pedal rhythm melody lesson practice",
    "money": "budget invoice pension mortgage savings account transfer receipt loan interest payment",
    "health": "sleep posture stretch knee ankle vitamin hydration fever headache muscle routine",
}
ADJECTIVES = (
    "new old small heavy cheap noisy loose bent worn quiet bright cold wet dusty stiff cracked "
    "second-hand reliable sticky slow"
).split()
VERBS = (
    "stops working|makes a grinding noise|keeps slipping|gets too hot|will not start|leaks|drains quickly|"
    "feels loose|smells burnt|breaks after a week|shows an error|rattles"
).split("|")
SENTENCES = (
    "The {brand} {code} {noun} {verb} when the {noun2} is {adj}.",
    "Most owners fix this by checking the {noun2} first and replacing the {adj} {noun} if needed.",
    "According to the manual of the {brand} {code}, the {noun} should be cleaned every few weeks.",
    "If the {noun} still {verb}, remove the {noun2} and try again with a {adj} one.",
    "Many people report that a {adj} {noun2} is the usual cause, not the {noun} itself.",
    "A cheap spare {noun2} costs little and takes about ten minutes to fit.",
    "Keep the {noun} away from damp places, because a {adj} {noun2} wears out much faster.",
    "The {brand} support page also suggests resetting the {noun} before calling a technician.",
)
QUESTIONS = (
    "Why does my {brand} {code} {noun} {verb}?",
    "How do I repair the {noun} on a {brand} {code} when it {verb}?",
    "What should I check when the {noun2} of my {brand} {code} is {adj}?",
)
VAGUE_QUESTIONS = ("Why does my {noun} {verb}?", "Any tips for a {adj} {noun2}?")
INSTRUCTION = "Given a question about a product, retrieve a passage that answers it."
SYLLABLES = "kor van tel mi ra zen dor lu ska bri nox pel ta vo quin gar sol fe".split()


def brand_name(i: int) -> str:
    a, b = divmod(i, len(SYLLABLES))
    return (SYLLABLES[a % len(SYLLABLES)] + SYLLABLES[b] + "ex").capitalize()


def synthetic_rows(n: int, run_id: str, seed: int) -> list[dict]:
    """Example rows (EXAMPLE_SCHEMA fields) that look generated; see the module docstring for the mix."""
    from storage.shards import now_utc

    rng = random.Random(seed)
    domains = [d.split() for d in DOMAINS.values()]
    pick = rng.choice

    def document(slots: dict) -> str:
        nouns = domains[slots["domain"]]
        chosen = rng.sample(SENTENCES, rng.randint(3, 6))
        return " ".join(line.format(**{**slots, "noun2": pick(nouns), "adj": pick(ADJECTIVES)}) for line in chosen)

    def slots() -> dict:
        domain = rng.randrange(len(domains))
        code = f"{pick('KXRTMV')}-{rng.randrange(100, 10000)}"
        return {
            "domain": domain,
            "brand": brand_name(rng.randrange(300)),
            "code": code,
            "noun": pick(domains[domain]),
            "noun2": pick(domains[domain]),
            "verb": pick(VERBS),
            "adj": pick(ADJECTIVES),
        }

    created = now_utc()
    rows = []
    for i in range(n):
        s = slots()
        task_type = "retrieval" if rng.random() < 0.7 else "long_long"
        positive = document(s)
        query = (pick(VAGUE_QUESTIONS) if rng.random() < 0.15 else pick(QUESTIONS)).format(**s)
        if task_type == "long_long":  # queries of this type are documents about the same product
            query = document(s)
        negative = document({**slots(), "domain": s["domain"]}) if task_type == "retrieval" else None
        rows.append(
            {
                "example_id": f"{run_id}:r00-{task_type}-{i:07d}",
                "run_id": run_id,
                "shard_id": f"g00-{i // 5000:05d}",
                "task_type": task_type,
                "instruction": INSTRUCTION,
                "instruction_id": f"{task_type}-000001",
                "persona_id": "p_bench",
                "persona": "A hands-on owner.",
                "placeholders": json.dumps({"language": "English"}),
                "prompt_version": "v1",
                "model": "bench",
                "sampling": "{}",
                "attempts": 1,
                "prompt_tokens": 120,
                "completion_tokens": 200,
                "latency_s": 1.0,
                "finish_reason": "stop",
                "query": query,
                "positive": positive,
                "negative": negative,
                "parsed": "{}",
                "raw_text": "{}",
                "created_at": created,
            }
        )
    for i in rng.sample(range(n), n // 100):  # invalid: empty query
        rows[i]["query"] = ""
    dup = rng.sample(range(n), n // 25)
    for d in dup[: len(dup) // 2]:  # exact duplicates of another row (case and spacing differ)
        src = rows[rng.randrange(n)]
        rows[d].update(
            query=src["query"].upper(),
            positive=src["positive"] + "  ",
            negative=src["negative"],
            task_type=src["task_type"],
        )
    for d in dup[len(dup) // 2 :]:  # near duplicates: one word of the positive changed
        src = rows[rng.randrange(n)]
        words = src["positive"].split()
        words[len(words) // 2] = "however"
        rows[d].update(
            query=src["query"], positive=" ".join(words), negative=src["negative"], task_type=src["task_type"]
        )
    return rows


def write_shards(data_dir: Path, n: int, seed: int, shard_rows: int) -> None:
    from storage.shards import RunStore

    store = RunStore(data_dir, "bench-run")
    rows = synthetic_rows(n, "bench-run", seed)
    for k, start in enumerate(range(0, n, shard_rows)):
        store.write_shard("examples", f"g00-{k:05d}", rows[start : start + shard_rows], [])


# --- the child: one clean run, instrumented ---------------------------------------------------
class HashBagEmbedder:
    """Deterministic stand-in for a model: sum of seeded per-word vectors (stop words down-weighted), unit length."""

    model_key = f"bench-hash-bow-{EMBED_DIM}"
    STOP = set("a an the of to is and or on in if it its be by for with when not my do i how why what".split())

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.vectors: list[np.ndarray] = []

    def _word_id(self, word: str) -> int:
        if word not in self.vocab:
            seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
            weight = 0.2 if word in self.STOP else 1.0
            self.vectors.append(weight * np.random.default_rng(seed).standard_normal(EMBED_DIM, dtype=np.float32))
            self.vocab[word] = len(self.vocab)
        return self.vocab[word]

    def encode(self, texts: list[str]) -> np.ndarray:
        from scipy.sparse import csr_matrix

        vocab, word_id, find = self.vocab, self._word_id, re.compile(r"[a-z0-9]+").findall
        token_ids = [[vocab[w] if w in vocab else word_id(w) for w in find(t.lower())] or [word_id("")] for t in texts]
        indptr = np.cumsum([0] + [len(t) for t in token_ids])
        indices = np.fromiter((i for t in token_ids for i in t), dtype=np.int64, count=int(indptr[-1]))
        bag = csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(len(texts), len(self.vocab)))
        out = np.asarray(bag @ np.stack(self.vectors), dtype=np.float32)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


class StageClock:
    """Sticky stage labels (a stage lasts until the next one starts) with time and peak RSS per label."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.label = "setup"
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.peak: dict[str, int] = {}
        self.lock = threading.Lock()
        self.done = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self.done.wait(0.02):
            rss = self.process.memory_info().rss
            with self.lock:
                self.peak[self.label] = max(self.peak.get(self.label, 0), rss)

    def enter(self, label: str) -> None:
        with self.lock:
            if label == self.label:
                return
            now = time.perf_counter()
            self.seconds[self.label] = self.seconds.get(self.label, 0.0) + now - self.started
            self.peak[self.label] = max(self.peak.get(self.label, 0), self.process.memory_info().rss)
            self.label, self.started = label, now

    def reset(self) -> None:
        with self.lock:
            self.label, self.started, self.seconds, self.peak = "setup", time.perf_counter(), {}, {}

    def stop(self) -> None:
        self.enter("finish")
        self.enter("stopped")  # closes the last segment
        self.done.set()


def instrument(clock: StageClock) -> None:
    """Wrap the stage functions wherever flows/tasks modules bind them; swap in the hashing embedder."""
    import importlib

    import flows.clean  # noqa: F401 - loads every module the flow uses
    from tasks.cleaning import embed as embed_module

    def rebind(original, replacement) -> None:
        for name, module in list(sys.modules.items()):
            if name.split(".")[0] in ("flows", "tasks") and module is not None:
                for attr, value in list(vars(module).items()):
                    if value is original:
                        setattr(module, attr, replacement)

    def wrapped(fn, stage: str, then: str | None = None):
        def call(*args, **kwargs):
            clock.enter(stage)
            try:
                return fn(*args, **kwargs)
            finally:
                if then:
                    clock.enter(then)

        call.__wrapped__ = fn
        return call

    for (module_name, attr), stage in HOOKS.items():
        fn = getattr(importlib.import_module(module_name), attr, None)
        if fn is not None:
            rebind(fn, wrapped(fn, stage, "finish" if attr == "write_report" else None))
    from storage.catalog import Catalog

    Catalog.refresh = wrapped(Catalog.refresh, "report")  # the report reads the refreshed catalog
    embedder = HashBagEmbedder()
    original_make = embed_module.make_embedder

    def make_embedder(cfg):
        clock.enter("embed")
        return embedder

    rebind(original_make, make_embedder)

    def no_model(*_args, **_kwargs):
        raise RuntimeError("bench: the real embedding model was about to load; the make_embedder hook missed")

    embed_module.SentenceTransformerEmbedder.__init__ = no_model


def child(rows: int, out: Path) -> None:
    clock = StageClock()
    instrument(clock)
    from flows.clean import clean

    baseline = clock.process.memory_info().rss
    clock.reset()  # imports and instrumenting are not part of the flow
    started = time.perf_counter()
    summary = clean(clean_id=f"growth-{rows}")
    total = time.perf_counter() - started
    clock.stop()
    out.write_text(
        json.dumps(
            {
                "rows": rows,
                "total_s": total,
                "baseline_rss": baseline,
                "seconds": clock.seconds,
                "peak_rss": clock.peak,
                "flow_stage_seconds": summary.get("stage_seconds", {}),
                "counts": summary.get("counts", {}),
            }
        )
    )


# --- the parent: sizes, subprocesses, growth exponents --------------------------------------------
def run_size(rows: int, work: Path, seed: int, shard_rows: int, api_url: str) -> dict:
    data_dir = work / f"n{rows}"
    started = time.perf_counter()
    write_shards(data_dir, rows, seed, shard_rows)
    print(f"  {rows} rows: shards written in {time.perf_counter() - started:.0f} s; cleaning ...", flush=True)
    out = work / f"n{rows}.json"
    env = {
        **os.environ,
        "EMBED_FACTORY_STORAGE__DATA_DIR": str(data_dir),
        "PREFECT_API_URL": api_url,
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "TQDM_DISABLE": "1",
    }
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(rows), "--out", str(out)], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"clean of {rows} rows failed (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def growth_exponent(rows, seconds) -> float:
    """Least-squares slope of log(seconds) against log(rows): 1 is linear, 2 quadratic."""
    return float(np.polyfit(np.log(rows), np.log(seconds), 1)[0])


def report(results: list[dict]) -> None:
    gib = 2**30
    sizes = [r["rows"] for r in results]
    print("\ntime (s) per stage; model time excluded (hashing embedder; see bench/cleaning.py for the model)")
    print(f"  {'stage':<10}" + "".join(f"{n:>11,}" for n in sizes) + "   growth exponent")
    for stage in ("setup", *STAGES, "finish"):
        times = [r["seconds"].get(stage) for r in results]
        if all(t is None for t in times):
            print(f"  {stage:<10} not seen: its functions were never called (its time is in the stage before)")
            continue
        cells = "".join(f"{t:11.2f}" if t is not None else f"{'-':>11}" for t in times)
        known = [(n, t) for n, t in zip(sizes, times, strict=True) if t and t > 0]
        slope = growth_exponent(*zip(*known, strict=True)) if len(known) > 1 else None
        print(f"  {stage:<10}{cells}   {slope:5.2f}" if slope is not None else f"  {stage:<10}{cells}")
    totals = [r["total_s"] for r in results]
    slope = growth_exponent(sizes, totals) if len(sizes) > 1 else float("nan")
    print(f"  {'total':<10}" + "".join(f"{t:11.2f}" for t in totals) + f"   {slope:5.2f}")
    print("peak RSS (GiB) during each stage (whole process; baseline after imports first)")
    print(f"  {'baseline':<10}" + "".join(f"{r['baseline_rss'] / gib:11.2f}" for r in results))
    for stage in (*STAGES,):
        print(
            f"  {stage:<10}"
            + "".join(
                f"{r['peak_rss'][stage] / gib:11.2f}" if stage in r["peak_rss"] else f"{'-':>11}" for r in results
            )
        )
    print("the flow's own stage_seconds (includes table writes; filter and mine may be one entry):")
    for r in results:
        print(f"  {r['rows']:>9,}: {r['flow_stage_seconds']}  counts {r['counts']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="25000,50000,100000,200000", help="comma-separated row counts")
    parser.add_argument("--quick", action="store_true", help="sizes 5000,10000,20000,40000")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-rows", type=int, default=5000)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.out)
        return
    sizes = [5000, 10000, 20000, 40000] if args.quick else [int(s) for s in args.sizes.split(",")]

    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from ground.settings import load_settings

    print(
        f"clean flow growth over {sizes} rows, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
        "each size in a fresh process; model time excluded (hashing embedder)",
        flush=True,
    )
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry calls from the bench's API
    configured = load_settings().prefect.api_url or os.environ.get("PREFECT_API_URL")
    results = []
    with tempfile.TemporaryDirectory() as work:
        if configured:
            results = [run_size(n, Path(work), args.seed, args.shard_rows, configured) for n in sizes]
        else:
            with prefect_test_harness(600):  # a throw-away Prefect API for the bench's lifetime (slow when busy)
                api_url = PREFECT_API_URL.value()
                results = [run_size(n, Path(work), args.seed, args.shard_rows, api_url) for n in sizes]
    report(results)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
