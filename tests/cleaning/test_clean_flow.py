"""The ``clean`` flow end to end on hand-made shards: funnel, drop reasons, export, resume, bad input."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from storage.corpus import CleanStore
from storage.shards import RunStore
from support.cli_process import cli
from support.rows import TOPICS, example, write_run


@pytest.fixture
def fixture_runs(data_dir):
    rows = []
    for i, (query, positive) in enumerate(TOPICS):
        # the next topic's passage is a plausible generated negative
        rows.append(example("run-a", i, query, positive, negative=TOPICS[(i + 1) % len(TOPICS)][1]))
    rows.append(example("run-a", 90, "", "An empty query must be dropped by validation."))  # invalid
    rows.append(example("run-a", 91, TOPICS[0][0], TOPICS[0][0], TOPICS[3][1]))  # positive equals query
    write_run(data_dir, "run-a", rows)
    # a second run repeats a query: cross-run exact duplicate
    write_run(data_dir, "run-b", [example("run-b", 0, TOPICS[1][0].upper(), TOPICS[1][1] + " ", negative=TOPICS[2][1])])
    return data_dir


def run_clean(clean_id: str, **kwargs) -> dict:
    from flows.clean import clean

    return clean(clean_id=clean_id, **kwargs)


def test_clean_flow_funnel_and_export(prefect_api_url, fixture_runs, monkeypatch):
    monkeypatch.setenv("EMBED_FACTORY_CLEAN__NEGATIVES_PER_QUERY", "2")
    monkeypatch.setenv("EMBED_FACTORY_CLEAN__NEGATIVE_RANK_MIN", "1")
    monkeypatch.setenv("EMBED_FACTORY_CLEAN__NEGATIVE_RANK_MAX", "10")
    monkeypatch.setenv("EMBED_FACTORY_CLEAN__RANK_TOP_K", "3")
    summary = run_clean("c-test")
    counts = summary.counts
    assert counts["raw"] == 9
    assert counts["raw"] >= counts["valid"] >= counts["deduped"] >= counts["filtered"] >= counts["mined"] > 0

    store = CleanStore(fixture_runs, "c-test")
    dropped = {}
    for path in (store.root / "dropped").glob("*.parquet"):
        for row in pq.read_table(path).to_pylist():
            dropped[row["example_id"]] = (row["stage"], row["reason"])
    assert dropped["run-a:r00-retrieval-000090"] == ("validate", "empty_query")
    assert dropped["run-a:r00-retrieval-000091"] == ("validate", "positive_equals_query")
    # the duplicate with the larger example_id goes, the first one stays
    assert dropped["run-b:r00-retrieval-000000"][0] == "dedup_exact"
    # every raw row is either in the mined table or dropped exactly once
    mined_ids = set(store.read_stage("mined")["example_id"].to_pylist())
    assert len(mined_ids) + len(dropped) == counts["raw"]
    assert not mined_ids & set(dropped)

    train = [json.loads(line) for line in (store.export_dir / "train.jsonl").read_text().splitlines()]
    heldout = [json.loads(line) for line in (store.export_dir / "heldout.jsonl").read_text().splitlines()]
    assert len(train) + len(heldout) == counts["mined"]
    for record in train + heldout:
        assert record["query"].startswith("Instruct: ") and "\nQuery: " in record["query"]
        assert record["pos"] and record["pos"][0] not in record["neg"]
        assert not any(n.startswith("Instruct:") for n in record["pos"] + record["neg"])
    assert (store.export_dir / "README.md").exists()
    assert store.report_path.exists() and "<html" in store.report_path.read_text().lower()


def test_clean_resumes_without_redoing_finished_stages(prefect_api_url, fixture_runs):
    first = run_clean("c-resume")
    assert list(first.stage_seconds) == ["validate", "dedup", "decontaminate", "embed", "filter_and_mine", "export"]
    store = CleanStore(fixture_runs, "c-resume")
    committed = ("valid", "deduped", "decontaminated")
    mtimes = {stage: store.stage_path(stage).stat().st_mtime_ns for stage in committed}
    mined = store.read_stage("mined")
    store.stage_path("mined").unlink()  # as if it crashed before mining finished
    store.stage_path("filtered").unlink()
    summary = run_clean("c-resume")
    # only the steps whose table was missing ran again (and the export, which every run rewrites)
    assert list(summary.stage_seconds) == ["embed", "filter_and_mine", "export"]
    assert {stage: store.stage_path(stage).stat().st_mtime_ns for stage in committed} == mtimes
    assert store.read_stage("mined").equals(mined)
    assert summary.counts["mined"] == pq.read_metadata(store.stage_path("mined")).num_rows

    again = run_clean("c-resume")  # everything committed: only the export is rewritten
    assert list(again.stage_seconds) == ["export"] and again.counts == summary.counts


def test_corrupt_shard_stops_with_its_name(prefect_api_url, fixture_runs):
    bad = RunStore(fixture_runs, "run-a").shard_path("examples", "g00-00000")
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(Exception) as failure:
        run_clean("c-bad")
    assert str(bad) in str(failure.value)
    assert not CleanStore(fixture_runs, "c-bad").stage_path("valid").exists(), "no partial stage output"


def test_resume_with_changed_settings_or_inputs_is_one_error_line(prefect_api_url, fixture_runs, monkeypatch):
    from storage.fingerprint import CleanConfigMismatch

    monkeypatch.setenv("EMBED_FACTORY_CLEAN__RANK_TOP_K", "3")
    run_clean("c-fp")
    store = CleanStore(fixture_runs, "c-fp")
    mtimes = {p: p.stat().st_mtime_ns for p in store.root.glob("*.parquet")}

    # another rank_top_k, through the CLI: one error line naming the setting, exit 1, no traceback
    env = {"EMBED_FACTORY_CLEAN__RANK_TOP_K": "4", "PREFECT_API_URL": prefect_api_url}
    done = cli("clean", "--clean-id", "c-fp", env=env)
    output = done.stdout + done.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]  # besides Prefect's run log
    assert done.returncode == 1 and len(errors) == 1 and "clean.rank_top_k: 3 -> 4" in errors[0], output
    assert "Traceback" not in output, output

    # a generation run that appeared since (the default: every run) is named too
    write_run(fixture_runs, "run-c", [example("run-c", 0, TOPICS[2][0], TOPICS[2][1], negative=TOPICS[3][1])])
    with pytest.raises(CleanConfigMismatch, match="runs.run-c: added"):
        run_clean("c-fp")
    assert {p: p.stat().st_mtime_ns for p in store.root.glob("*.parquet")} == mtimes, "no table rewritten"
    assert run_clean("c-fp", runs=["run-a", "run-b"]).stage_seconds.keys() == {"export"}  # same inputs resume
