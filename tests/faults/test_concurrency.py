"""Two processes on one store at once: the same id is refused with one clear line, different ids are isolated.

Two ``embed-factory`` processes are forked at the same moment. To make the overlap certain, the
stub LLM parks every chat request (``hold``) while both start, or the fault hook freezes the first
process with SIGSTOP at a point where it holds its lock (``EMBED_FACTORY_FAULT_STOP_AT``). Results
are compared with the uninterrupted reference runs, so interleaved shards would show.
"""

from __future__ import annotations

import shutil
import time

import pyarrow.parquet as pq

from conftest import RUN_ID, clean_args, clean_snapshot, diff, run_args, run_snapshot, temp_files

LOCKED_RUN = "is being written by another process"


def _one_clear_line(child, *needles: str) -> None:
    err = child.stderr
    assert "Traceback" not in child.output, child.output[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def _wait_first(children, timeout: float = 120):
    """The first child to end (its exit code), polling: the other may be parked or stopped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in children:
            if child.state() in ("", "Z"):
                return child, child.wait(10)
        time.sleep(0.02)
    raise AssertionError("neither process ended")


def test_same_run_id_started_twice_at_once(forks, fault_env, stub_llm, gen_reference, tmp_path, fault_summary):
    data = tmp_path / "data"
    stub_llm.hold()  # whoever takes the run lock first waits on the LLM while holding it
    try:
        a = forks.spawn(run_args(), fault_env(data), tmp_path, tmp_path / "logs", "a")
        b = forks.spawn(run_args(), fault_env(data), tmp_path, tmp_path / "logs", "b")
        loser, rc = _wait_first([a, b])
    finally:
        stub_llm.release()
    winner = b if loser is a else a
    assert rc == 1, loser.output[-3000:]
    _one_clear_line(loser, LOCKED_RUN, f"run '{RUN_ID}'", str(data / "runs" / RUN_ID))
    assert winner.wait() == 0, winner.output[-3000:]
    got = run_snapshot(data)
    assert got == gen_reference[1], diff(got, gen_reference[1])
    fault_summary["concurrent starts"]["same run id: second refused"] += 1


def test_different_run_ids_at_once_are_isolated(forks, fault_env, gen_reference, tmp_path, fault_summary):
    data = tmp_path / "data"
    a = forks.spawn(run_args(RUN_ID), fault_env(data), tmp_path, tmp_path / "logs", "a")
    b = forks.spawn(run_args("other"), fault_env(data), tmp_path, tmp_path / "logs", "b")
    assert a.wait() == 0, a.output[-3000:]
    assert b.wait() == 0, b.output[-3000:]
    got = run_snapshot(data, RUN_ID)
    assert got == gen_reference[1], diff(got, gen_reference[1])
    # the other run is the same plan under its own id, and holds only its own rows
    got = run_snapshot(data, "other", rename=RUN_ID)
    assert got == gen_reference[1], diff(got, gen_reference[1])
    for run_id in (RUN_ID, "other"):
        for path in (data / "runs" / run_id).rglob("*.parquet"):
            if "run_id" in pq.read_schema(path).names:
                assert set(pq.read_table(path, columns=["run_id"])["run_id"].to_pylist()) <= {run_id}, path
    fault_summary["concurrent starts"]["different run ids: isolated"] += 1


def test_same_clean_id_started_twice_at_once(forks, fault_env, gen_reference, clean_reference, tmp_path, fault_summary):
    data = tmp_path / "data"
    shutil.copytree(gen_reference[0] / "runs", data / "runs")
    # whichever takes the clean lock freezes (SIGSTOP) once it has written valid.parquet, still holding
    # it, so the other cannot start after it finished (a race that let both succeed); exactly one is refused
    a = forks.spawn(clean_args(RUN_ID), fault_env(data, stop_at="stage.table:1"), tmp_path, tmp_path / "logs", "a")
    b = forks.spawn(clean_args(RUN_ID), fault_env(data, stop_at="stage.table:1"), tmp_path, tmp_path / "logs", "b")
    loser, rc = _wait_first([a, b])
    winner = b if loser is a else a
    winner.wait_stopped()  # at its fault point (maybe only after the loser was refused): let it go on
    winner.cont()
    assert rc == 1, loser.output[-3000:]
    _one_clear_line(loser, "clean run", LOCKED_RUN, "--clean-id")
    assert winner.wait() == 0, winner.output[-3000:]
    got = clean_snapshot(data, RUN_ID)
    assert got == clean_reference[1], diff(got, clean_reference[1])
    fault_summary["concurrent starts"]["same clean id: second refused"] += 1


def test_different_clean_ids_at_once_are_isolated(
    forks, fault_env, gen_reference, clean_reference, tmp_path, fault_summary
):
    data = tmp_path / "data"
    shutil.copytree(gen_reference[0] / "runs", data / "runs")
    # both embed at once into the shared (empty) embedding cache and refresh one catalog
    a = forks.spawn(clean_args("clean-a"), fault_env(data), tmp_path, tmp_path / "logs", "a")
    b = forks.spawn(clean_args("clean-b"), fault_env(data), tmp_path, tmp_path / "logs", "b")
    assert a.wait() == 0, a.output[-3000:]
    assert b.wait() == 0, b.output[-3000:]
    for clean_id in ("clean-a", "clean-b"):
        got = clean_snapshot(data, clean_id)
        assert got == clean_reference[1], f"{clean_id}: {diff(got, clean_reference[1])}"
    assert not temp_files(data)
    fault_summary["concurrent starts"]["different clean ids: isolated"] += 1
