"""Crash safety of a grounded run: ``kill -9`` the real ``embed-factory run --corpus`` process mid-run, re-run
it, get the uninterrupted run's files (passages, examples, rejects, lineage, manifest), each passage once.

The machinery of ``test_crashes.py``: the fork server runs the CLI, the stub LLM kills the process when its
n-th chat request arrives (config and query requests in flight), the fault hook kills it inside a shard's
commit (lineage written, data file not; data file written, manifest not) or in the passages table's write.
The corpus is six pages of the shipped one (26 passages), and every chain starts with the reference's
embedding cache, so no process loads the encoder again (~1 min for the five chains).
"""

from __future__ import annotations

import random
import shutil
import signal

import pyarrow.parquet as pq
import pytest

from conftest import check_run_invariants, diff, run_snapshot, temp_files
from tasks.generation.passages import shipped_corpus_path

RUN_ID = "grounded-crash"
PAGES = ("assert.txt", "calls.txt", "function.txt", "raise.txt", "try.txt", "with.txt")  # 26 passages
#: (fault-hook spec, stub request number) of the kills, one chain each; requests: 2 per passage
KILLS = [
    (None, 7),  # requests in flight in the first shards
    ("shard.rejects:2", None),  # the second shard's lineage and rejects written, its data file not
    ("shard.data:3", None),  # the third shard's data file written, its manifest entry not
    ("parquet.tmp:1", None),  # the passages table's temp file written, not renamed
    (None, 30),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus") / "pages"
    folder.mkdir()
    for page in PAGES:
        shutil.copy(shipped_corpus_path() / page, folder / page)
    return folder


def _args() -> list[str]:
    return ["run", "--run-id", RUN_ID, "--no-clean"]


def _env(fault_env, data, corpus, kill_at=None):
    return fault_env(data, kill_at=kill_at, generation__corpus=str(corpus), generation__examples="16")


def test_a_grounded_run_killed_mid_run_and_rerun_equals_an_uninterrupted_one(
    forks, fault_env, stub_llm, corpus, tmp_path, fault_summary
):
    reference = tmp_path / "reference" / "data"
    child = forks.spawn(_args(), _env(fault_env, reference, corpus), reference.parent, reference.parent / "logs", "ref")
    assert child.wait() == 0, child.output[-5000:]
    want = run_snapshot(reference, RUN_ID)
    examples = pq.read_table(reference / "runs" / RUN_ID / "examples").num_rows
    assert examples >= 10 and any(k.startswith("lineage/") for k in want) and "passages.parquet" in want

    rng = random.Random(27)
    landed = 0
    for chain, (spec, nth_request) in enumerate(KILLS):
        data = tmp_path / f"chain{chain}" / "data"
        # the reference's embedding cache: no chain pays for loading the encoder again (the vectors are the same)
        shutil.copytree(reference / "embeddings", data / "embeddings")
        child = forks.spawn(_args(), _env(fault_env, data, corpus, spec), data.parent, data.parent / "logs", "kill")
        if nth_request:
            stub_llm.arm_kill(child.pid, nth_request + rng.randint(0, 2))
        rc = child.wait()
        stub_llm.disarm()
        assert rc in (0, -signal.SIGKILL), child.output[-4000:]
        if rc == -signal.SIGKILL:
            landed += 1
            check_run_invariants(data, RUN_ID)
        rerun = forks.spawn(_args(), _env(fault_env, data, corpus), data.parent, data.parent / "logs", "rerun")
        assert rerun.wait() == 0, rerun.output[-4000:]
        got = run_snapshot(data, RUN_ID)
        assert got == want, f"chain {chain} (kill {spec or nth_request}): {diff(got, want)}"
        assert not temp_files(data)
        ids = pq.read_table(data / "runs" / RUN_ID / "lineage", columns=["passage_id"])["passage_id"].to_pylist()
        assert len(ids) == len(set(ids)) == examples, "each passage generated once"
    assert landed >= 4, f"only {landed} of {len(KILLS)} kills landed"
    fault_summary["kills"]["grounded"] += landed
