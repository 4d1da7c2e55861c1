"""Benchmark how the real ``clean`` flow grows with its input: time and peak RSS per stage, and the exponent.

For each size, generation shards of production-shaped rows (``bench/growth_rows.py``: ``raw_text`` and
``parsed`` as generation writes them, documents of hundreds of words) are written to a fresh data folder
by one subprocess, then the ``clean`` flow (``flows.clean``) runs on them in another, so peak RSS is per
size. ``--before REV`` runs the same sizes, on the same rows, on the code at git revision ``REV`` too
(``git archive`` into a temp folder, no network): before and after alternate per size (before first on
even sizes, after first on odd ones) so machine noise hits both, and the tables show them side by side.
The rows and the bench's instruments are this file's on both sides; only the product code differs.

Stages are timed from outside the flow: the functions named in :data:`HOOKS` are wrapped wherever a
project module binds them, and each stage runs from its first function's start to the next stage's, so
a stage includes its table writes; ``setup`` is the flow's start before validation, ``finish`` its
summary after the report. A hook whose module or function is gone (code being renamed) is skipped: its
stage is then reported as not seen, its time inside the stage before it. A thread samples RSS every
20 ms and keeps the maximum per stage. The flow's own ``stage_seconds`` is printed as a cross-check.

Guards: a side whose process tree's RSS passes ``--max-rss-gib`` or which runs past ``--time-limit`` is
killed and reported as ``> X GiB at <stage>`` / ``> T s at <stage>``; the other side and sizes go on.
Model time is excluded: the embedder is replaced (``make_embedder``, the injection point) by a
deterministic bag-of-words hashing embedder (384 dims), and loading the real model is made to fail;
all-MiniLM-L6-v2's throughput is measured by ``bench/cleaning.py``.

    python bench/clean_growth.py --quick                                 # 5k, 10k, 20k, 40k rows
    python bench/clean_growth.py --sizes 50000 200000 550000 1100000     # exact search: ~n^2
    python bench/clean_growth.py --sizes 50000 100000 --before 271e9b7   # today's code vs REV, same rows
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: the product code this process runs: this checkout, or the ``--before`` revision's (set by the parent)
CODE = Path(os.environ.get("CLEAN_GROWTH_CODE") or ROOT)
sys.path[:0] = [str(CODE), str(Path(__file__).resolve().parent)]

from growth_rows import FUNCTION_WORDS, RowMaker  # noqa: E402
from growth_table import report  # noqa: E402

STAGES = ("validate", "dedup", "decontaminate", "embed", "filter", "mine", "export", "report")
#: "module:function" (or "module:Class.method") -> the stage its first call starts. Adjust freely when code
#: moves: a name that is not there is skipped (its stage then shows as not seen).
HOOKS = {
    "tasks.cleaning.validate:validate_examples": "validate",
    "tasks.cleaning.dedup:exact_dedup": "dedup",
    "tasks.cleaning.dedup:near_dedup_part": "dedup",
    "tasks.cleaning.dedup:near_dedup": "dedup",
    "flows.clean:dedup_facts_task.fn": "dedup",  # per batch: ids, digests, signatures (a Prefect task)
    "tasks.cleaning.decontaminate:Decontaminate.drops": "decontaminate",  # the streamed stage, per batch
    "tasks.cleaning.decontaminate:decontaminate": "decontaminate",
    "tasks.cleaning.embed:encode_cached": "embed",
    "flows.clean:embed.fn": "embed",  # embed_for_ranking as the flow's task
    "storage.embedding_cache:encode_cached": "embed",
    "tasks.cleaning.search:build_index": "filter",
    "tasks.cleaning.rank_filter:rank_filter": "filter",
    "tasks.cleaning.negatives:mine_hard_negatives": "mine",
    "tasks.cleaning.export:export_corpus": "export",
    "storage.catalog:Catalog.refresh": "report",  # the report reads the refreshed catalog
    "tasks.cleaning.report:write_report": "report",
}
#: stages that own everything called inside them (decontamination embeds eval texts and rows: not "embed")
HELD = {"decontaminate"}
#: after these, the flow only sums up
LAST_HOOKS = ("tasks.cleaning.report:write_report",)
#: where the embedder is built and the real model class (the bench swaps the one and forbids the other)
EMBEDDER_FACTORY = "llm.embedder:make_embedder"
MODEL_CLASS = "llm.embedder:SentenceTransformerEmbedder"
PROJECT_PACKAGES = ("flows", "tasks", "storage", "llm", "ground", "personas", "prompts")
EMBED_DIM = 384
GIB = 2**30


# --- the child: one clean run, instrumented ---------------------------------------------------
class HashBagEmbedder:
    """Deterministic stand-in for a model: sum of seeded per-word vectors (stop words down-weighted), unit length."""

    model_key = f"bench-hash-bow-{EMBED_DIM}"
    STOP = set("a an the of to is and or on in if it its be by for with when not my do i how why what".split()) | set(
        FUNCTION_WORDS
    )

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

    def __init__(self, status: Path | None = None):
        import psutil

        self.status = status  # the current label, for the parent's guard to name
        self.process = psutil.Process()
        self.label = "setup"
        self.held = 0  # > 0 inside a HELD stage: later stages' functions do not change the label
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.peak: dict[str, int] = {}
        self.anon: dict[str, int] = {}  # peak anonymous RSS: RSS less file-backed pages (mapped vectors)
        self.lock = threading.Lock()
        self.done = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self.done.wait(0.02):
            with self.lock:
                self._record()

    def _record(self) -> None:
        """Fold the current RSS and anonymous RSS into the current label's peaks (called under the lock)."""
        info = self.process.memory_info()  # rss, and shared = file-backed resident pages (Linux)
        rss, anon = info.rss, info.rss - getattr(info, "shared", 0)
        self.peak[self.label] = max(self.peak.get(self.label, 0), rss)
        self.anon[self.label] = max(self.anon.get(self.label, 0), anon)

    def enter(self, label: str) -> None:
        with self.lock:
            if label == self.label or (self.held and label != "stopped"):
                return
            now = time.perf_counter()
            self.seconds[self.label] = self.seconds.get(self.label, 0.0) + now - self.started
            self._record()
            self.label, self.started = label, now
            if self.status:
                self.status.write_text(label)

    def reset(self) -> None:
        with self.lock:
            self.label, self.started, self.seconds, self.peak, self.anon = "setup", time.perf_counter(), {}, {}, {}

    def stop(self) -> None:
        self.enter("finish")
        self.enter("stopped")  # closes the last segment
        self.done.set()


def resolve(hook: str):
    """(owner, attribute name, function) of ``module:qualname``; None when the module or name is gone."""
    module_name, _, qualname = hook.partition(":")
    try:
        owner = importlib.import_module(module_name)
    except ImportError:
        return None
    *path, attr = qualname.split(".")
    for name in path:
        owner = getattr(owner, name, None)
    fn = getattr(owner, attr, None) if owner is not None else None
    return (owner, attr, fn) if fn is not None else None


def instrument(clock: StageClock) -> list[str]:
    """Wrap the hooked functions wherever project modules bind them; swap in the hashing embedder.
    Returns the hooks that were not found."""
    import flows.clean  # noqa: F401 - loads every module the flow uses

    def rebind(original, replacement) -> None:
        for name, module in list(sys.modules.items()):
            if name.split(".")[0] in PROJECT_PACKAGES and module is not None:
                for attr, value in list(vars(module).items()):
                    if value is original:
                        setattr(module, attr, replacement)

    def wrapped(fn, stage: str, then: str | None = None):
        def call(*args, **kwargs):
            clock.enter(stage)
            clock.held += stage in HELD
            try:
                return fn(*args, **kwargs)
            finally:
                clock.held -= stage in HELD
                if then:
                    clock.enter(then)

        call.__wrapped__ = fn
        return call

    missing = []
    for hook, stage in HOOKS.items():
        found = resolve(hook)
        if found is None:
            missing.append(hook)
            continue
        owner, attr, fn = found
        replacement = wrapped(fn, stage, "finish" if hook in LAST_HOOKS else None)
        if isinstance(owner, ModuleType):
            rebind(fn, replacement)
        else:  # a class or an object (a Prefect task): swap the attribute itself
            setattr(owner, attr, replacement)
    embedder = HashBagEmbedder()

    def make_embedder(*_args, **_kwargs):
        clock.enter("embed")
        return embedder

    factory, model_class = resolve(EMBEDDER_FACTORY), resolve(MODEL_CLASS)
    if factory is None or model_class is None:
        raise SystemExit(f"bench: {EMBEDDER_FACTORY} or {MODEL_CLASS} is gone; update the bench's names")
    rebind(factory[2], make_embedder)

    def no_model(*_args, **_kwargs):
        raise RuntimeError("bench: the real embedding model was about to load; the make_embedder hook missed")

    model_class[2].__init__ = no_model
    return missing


def write_child(rows: int, data_dir: Path, seed: int, shard_rows: int) -> None:
    """Write the synthetic shards with this side's storage code (its manifest format)."""
    from storage.shards import RunStore

    store = RunStore(data_dir, "bench-run")
    for shard_id, shard in RowMaker(rows, seed, "bench-run").shards(shard_rows):
        store.write_shard("examples", shard_id, shard, [])


def child(rows: int, out: Path, status: Path) -> None:
    clock = StageClock(status)
    missing = instrument(clock)
    from flows.clean import clean

    baseline = clock.process.memory_info().rss
    clock.reset()  # imports and instrumenting are not part of the flow
    started = time.perf_counter()
    summary = clean(clean_id=f"growth-{rows}")
    summary = summary if isinstance(summary, dict) else vars(summary)  # before 2026-12-07 the flow gave a dict
    total = time.perf_counter() - started
    clock.stop()
    result = {
        "rows": rows,
        "total_s": total,
        "baseline_rss": baseline,
        "seconds": clock.seconds,
        "peak_rss": clock.peak,
        "peak_anon": clock.anon,
        "missing_hooks": missing,
        "flow_stage_seconds": summary.get("stage_seconds", {}),
        "counts": summary.get("counts", {}),
    }
    out.write_text(json.dumps(result))


# --- the parent: sides, sizes, guards -----------------------------------------------------------
@dataclass
class Side:
    """One code base the bench runs: this checkout ("after") or a ``--before`` revision."""

    name: str
    code: Path
    results: dict[int, dict] = field(default_factory=dict)  # rows -> the child's result, or {"stopped": ...}


def checkout(rev: str, into: Path) -> Path:
    """The tree of ``rev`` of this repository, unpacked into ``into`` (``git archive``: no network, no worktree)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev], capture_output=True)
    if archive.returncode != 0:
        sys.exit(f"error: git archive {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def tree_rss(process) -> int:
    """RSS of a process and its descendants, bytes."""
    import psutil

    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def guarded(command: list[str], env: dict, cwd: Path, max_rss: float, time_limit: float, status: Path | None):
    """Run ``command``; kill its process group past ``max_rss`` bytes or ``time_limit`` s. (returncode, output,
    why it was stopped or None, peak RSS seen)."""
    import psutil

    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    handle, started, peak, stopped = psutil.Process(proc.pid), time.monotonic(), 0, None
    while proc.poll() is None:
        try:
            peak = max(peak, tree_rss(handle))
        except psutil.Error:
            pass
        over_time = time.monotonic() - started > time_limit
        if peak > max_rss or over_time:
            stage = status.read_text().strip() if status and status.exists() else "start"
            stopped = f"> {time_limit:g} s at {stage}" if over_time else f"> {max_rss / GIB:.3g} GiB at {stage}"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.1)
    log.seek(0)
    return proc.returncode, log.read()[-4000:], stopped, peak


def run_side(side: Side, rows: int, work: Path, args, api_url: str) -> None:
    data_dir, out, status = work / f"{side.name}-n{rows}", work / f"{side.name}-n{rows}.json", work / "status"
    status.unlink(missing_ok=True)
    env = {
        **os.environ,
        "CLEAN_GROWTH_CODE": str(side.code),
        "PYTHONPATH": os.pathsep.join([str(side.code), os.environ.get("PYTHONPATH", "")]),
        "EMBED_FACTORY_STORAGE__DATA_DIR": str(data_dir),
        "PREFECT_API_URL": api_url,
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "TQDM_DISABLE": "1",
    }
    limit = args.max_rss_gib * GIB
    me = [sys.executable, str(Path(__file__).resolve())]
    try:
        started = time.perf_counter()
        write = [*me, "--write", str(rows), "--data-dir", str(data_dir), "--seed", str(args.seed)]
        code, output, stopped, _ = guarded(
            [*write, "--shard-rows", str(args.shard_rows)], env, side.code, limit, args.time_limit, None
        )
        if code != 0 or stopped:
            sys.exit(f"error: writing {rows} rows for {side.name} failed ({stopped or code}):\n{output}")
        written = time.perf_counter() - started
        print(f"  {side.name:>6} {rows:>9,} rows: shards written in {written:.0f} s; cleaning ...", flush=True)
        command = [*me, "--child", str(rows), "--out", str(out), "--status", str(status)]
        code, output, stopped, peak = guarded(command, env, side.code, limit, args.time_limit, status)
        if stopped:
            side.results[rows] = {"stopped": stopped}
        elif code != 0:
            sys.exit(f"error: clean of {rows} rows on {side.name} failed (exit {code}):\n{output}")
        else:
            side.results[rows] = {**json.loads(out.read_text()), "write_s": written, "tree_peak_rss": peak}
        print(f"  {side.name:>6} {rows:>9,} rows: {describe(side.results[rows])}", flush=True)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def describe(result: dict) -> str:
    if "stopped" in result:
        return f"stopped {result['stopped']}"
    rss, anon = (max(result.get(key, {}).values(), default=0) / GIB for key in ("peak_rss", "peak_anon"))
    return f"clean {result['total_s']:.0f} s, peak RSS {rss:.2f} GiB (anonymous {anon:.2f} GiB)"


def parse_sizes(values: list[str]) -> list[int]:
    sizes = [int(v) for item in values for v in item.replace(",", " ").split()]
    if not sizes or min(sizes) < 100:
        raise ValueError("sizes must be whole numbers >= 100")
    return sorted(set(sizes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["25000", "50000", "100000", "200000"], help="row counts")
    parser.add_argument("--quick", action="store_true", help="sizes 5000 10000 20000 40000")
    parser.add_argument("--before", metavar="REV", help="also run the code at git revision REV, side by side")
    parser.add_argument("--max-rss-gib", type=float, default=12.0, help="stop a side whose RSS passes this")
    parser.add_argument("--time-limit", type=float, default=7200.0, help="stop a side's clean after this many s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-rows", type=int, default=5000)
    parser.add_argument("--work", type=Path, default=None, help="folder for the data (default: a temp folder)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--write", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--status", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        write_child(args.write, args.data_dir, args.seed, args.shard_rows)
        return
    if args.child:
        child(args.child, args.out, args.status)
        return
    try:
        sizes = [5000, 10000, 20000, 40000] if args.quick else parse_sizes(args.sizes)
    except ValueError as exc:
        parser.error(str(exc))
    with tempfile.TemporaryDirectory(dir=args.work, prefix="clean-growth-") as tmp:
        work = Path(tmp)
        sides = [Side("after", ROOT)]
        if args.before:
            sides.insert(0, Side("before", checkout(args.before, work / "before-code")))
        print(
            f"clean flow growth over {sizes} rows, sides {[s.name for s in sides]}"
            + (f" (before = {args.before})" if args.before else "")
            + f", {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; each side and size in a fresh "
            f"process; guard {args.max_rss_gib:g} GiB / {args.time_limit:.0f} s; model time excluded",
            flush=True,
        )
        with prefect_api() as api_url:
            for k, n in enumerate(sizes):
                for side in sides if k % 2 == 0 else sides[::-1]:  # alternate which side goes first
                    run_side(side, n, work, args, api_url)
                if n != sizes[-1]:  # the tables so far: a long run's early sizes are not lost to a stop
                    print(f"--- after {n:,} rows ---\n" + report(sides, sizes[: k + 1], ("setup", *STAGES, "finish")))
    print(report(sides, sizes, ("setup", *STAGES, "finish")))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


def prefect_api():
    """The configured Prefect API, else a throw-away one for the bench's lifetime."""
    from contextlib import contextmanager

    from ground.settings import load_settings

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry from the bench's API
    configured = load_settings().prefect.api_url or os.environ.get("PREFECT_API_URL")

    @contextmanager
    def api():
        if configured:
            yield configured
            return
        from prefect.settings import PREFECT_API_URL
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(600):  # slow to start when the machine is busy
            yield PREFECT_API_URL.value()

    return api()


if __name__ == "__main__":
    main()
