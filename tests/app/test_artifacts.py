"""The flows' Prefect artifacts, read back from a real Prefect server and checked against the runs' own tables.

* one ``clean`` flow run on hand-made shards (module fixture), shared by the funnel, drop-reason,
  sample and link checks; every expected number is counted here from the stage Parquet files;
* one ``generate`` flow run against the deterministic stub LLM server of ``tests/support/stub_llm.py``
  (the numbers under test come from the run's own tables, not from the model, so no vLLM is needed);
* one ``finetune`` flow run on a 40-row export (1 step, STS on 20 English pairs), checked against its eval.json;
* the pure halves (pipeline markdown, the progress tracker) and the helpers outside a flow run.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.artifacts import (
    KEYS,
    GenerateProgress,
    pipeline_markdown,
    publish_clean,
    publish_link,
    publish_table,
)
from ground.settings import CleanSettings
from storage.corpus import CleanStore
from storage.schemas import count_by_type
from storage.shards import RunStore, ShardRecord
from storage.stages import enabled_stages
from storage.summaries import FinetuneSummary
from support.artifacts import artifacts_of, table_of
from support.rows import TOPICS, example, make_export, write_run
from support.stub_llm import StubLLM

CLEAN_ENV = {  # a corpus of 7 texts: shrink the rank windows to fit it
    "EMBED_FACTORY_CLEAN__NEGATIVES_PER_QUERY": "2",
    "EMBED_FACTORY_CLEAN__NEGATIVE_RANK_MIN": "1",
    "EMBED_FACTORY_CLEAN__NEGATIVE_RANK_MAX": "10",
    "EMBED_FACTORY_CLEAN__RANK_TOP_K": "3",
}


# --- clean: one run, several checks ------------------------------------------------------------------
@pytest.fixture(scope="module")
def clean_run(prefect_api_url, tmp_path_factory):
    from flows.clean import clean

    data_dir = tmp_path_factory.mktemp("artifacts") / "data"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBED_FACTORY_STORAGE__DATA_DIR", str(data_dir))
        for key, value in CLEAN_ENV.items():
            mp.setenv(key, value)
        rows = [example("run-a", i, q, p, negative=TOPICS[(i + 1) % len(TOPICS)][1]) for i, (q, p) in enumerate(TOPICS)]
        rows.append(example("run-a", 90, "", "An empty query must be dropped by validation."))
        rows.append(example("run-a", 91, TOPICS[0][0], TOPICS[0][0], TOPICS[3][1]))
        # short-short rows: a second task type in the funnel; one repeats a retrieval query (exact duplicate)
        rows += [
            example("run-a", 100 + i, q, p, negative=TOPICS[(i + 2) % len(TOPICS)][1], task_type="short_short")
            for i, (q, p) in enumerate(TOPICS[:3])
        ]
        write_run(data_dir, "run-a", rows)
        write_run(data_dir, "run-b", [example("run-b", 0, TOPICS[1][0].upper(), TOPICS[1][1] + " ", TOPICS[2][1])])
        state = clean(clean_id="c-art", return_state=True)
        summary = state.result()
    return {
        "data_dir": data_dir,
        "summary": summary,
        "store": CleanStore(data_dir, "c-art"),
        "artifacts": artifacts_of(state.state_details.flow_run_id),
    }


def test_clean_publishes_its_artifacts_under_stable_keys(clean_run):
    keys = {"clean_funnel", "clean_drop_reasons", "clean_samples", "clean_report", "clean_export"}
    assert set(clean_run["artifacts"]) == {KEYS[k] for k in keys}
    assert all("c-art" in a.description for a in clean_run["artifacts"].values())


def test_clean_funnel_matches_the_stage_tables(clean_run):
    data_dir, store, summary = clean_run["data_dir"], clean_run["store"], clean_run["summary"]
    raw = pa.concat_tables([RunStore(data_dir, r).read_kind("examples") for r in ("run-a", "run-b")])
    expected = {"generated": count_by_type(raw)}
    for stage in enabled_stages(CleanSettings()):
        expected[stage.table] = count_by_type(store.read_stage(stage.table))
    rows = {r["task type"]: r for r in table_of(clean_run["artifacts"][KEYS["clean_funnel"]])}
    assert set(rows) == {"retrieval", "short_short", "total"}
    for task_type in ("retrieval", "short_short"):
        for stage, counts in expected.items():
            assert rows[task_type][stage] == counts.get(task_type, 0), (task_type, stage)
    total = rows["total"]
    assert total["generated"] == summary.counts["raw"] == raw.num_rows
    assert list(rows["total"])[1:-1] == list(expected)  # every stage table, in flow order
    for stage in list(expected)[1:]:
        assert total[stage] == summary.counts[stage]
    assert total["kept %"] == pytest.approx(100 * total["mined"] / total["generated"], abs=0.05)


def test_clean_drop_reasons_match_the_dropped_tables(clean_run):
    store = clean_run["store"]
    details: dict[tuple[str, str], set] = defaultdict(set)
    for path in (store.root / "dropped").glob("*.parquet"):
        for row in pq.read_table(path).to_pylist():
            details[(row["stage"], row["reason"])].add(row["detail"])
    counts = Counter()
    for path in (store.root / "dropped").glob("*.parquet"):
        counts.update((r["stage"], r["reason"]) for r in pq.read_table(path, columns=["stage", "reason"]).to_pylist())
    rows = table_of(clean_run["artifacts"][KEYS["clean_drop_reasons"]])
    assert {(r["stage"], r["reason"]): r["rows"] for r in rows} == dict(counts)
    assert ("validate", "empty_query") in counts and "dedup_exact" in {stage for stage, _ in counts}
    for r in rows:  # one real detail of that stage and reason (texts are cut to 160 characters)
        if r["example detail"] is not None:
            assert any(d and d.startswith(r["example detail"].rstrip("…")) for d in details[(r["stage"], r["reason"])])
    assert [r["rows"] for r in rows] == sorted((r["rows"] for r in rows), reverse=True)


def test_clean_samples_are_mined_rows(clean_run):
    mined = clean_run["store"].read_stage("mined").to_pylist()
    by_query = {(r["task_type"], r["query"]): r for r in mined}
    rows = table_of(clean_run["artifacts"][KEYS["clean_samples"]])
    per_type_rows = Counter(r["task type"] for r in rows)
    mined_per_type = Counter(r["task_type"] for r in mined)
    assert per_type_rows == {t: min(3, n) for t, n in mined_per_type.items()}
    for r in rows:
        source = by_query[(r["task type"], r["query"])]  # the test's queries are under 160 characters: shown whole
        assert r["positive rank"] == source["positive_rank"]
        assert r["first hard negative"].rstrip("…") in source["hard_negatives"][0]


def test_clean_links_point_at_the_report_and_the_export(clean_run):
    summary, artifacts = clean_run["summary"], clean_run["artifacts"]
    report, export = artifacts[KEYS["clean_report"]], artifacts[KEYS["clean_export"]]
    assert report.type == export.type == "markdown"  # a link artifact is stored as markdown: [text](url)
    assert f"({Path(summary.report).resolve().as_uri()})" in report.data
    assert f"({Path(summary.export_dir).resolve().as_uri()})" in export.data
    assert Path(summary.report).exists() and (Path(summary.export_dir) / "train.jsonl").exists()


def test_outside_a_flow_run_the_helpers_do_nothing(clean_run):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        before = len(client.read_artifacts())
    from storage.catalog import Catalog

    assert publish_table("clean_funnel", [{"a": 1}], "x") is None
    assert publish_link("clean_report", "/tmp/report.html", "report", "x") is None
    assert publish_clean(Catalog(clean_run["data_dir"]), clean_run["summary"]) is None
    tracker = GenerateProgress("run-x", target=10, committed=4)
    tracker.start()
    tracker.shard_committed(ShardRecord("brainstorm", "b000-00000", 5, 0, 1, "h"))
    tracker.shard_committed(ShardRecord("examples", "g00-00000", 3, 1, 1, "h"))
    assert tracker.artifact_id is None and tracker.percent == 70.0
    assert "7 of 10 parsed examples, 1 rejects" in tracker.description
    tracker.shard_committed(ShardRecord("examples", "g00-00001", 9, 0, 1, "h"))
    assert tracker.percent == 100.0  # capped at the target
    with get_client(sync_client=True) as client:
        assert len(client.read_artifacts()) == before


# --- generate: against the stub LLM ------------------------------------------------------------------
def test_generate_artifacts_match_the_run_tables(prefect_api_url, data_dir, monkeypatch):
    from flows.generate import generate

    with StubLLM(delay_s=0.002, invalid_every=5) as llm:  # every 5th request fails: rejects with a reason
        for key, value in {
            "LLM__BASE_URL": llm.base_url,
            "LLM__MODEL": llm.model,
            "LLM__MAX_RETRIES": "0",
            "LLM__SCHEMA_RETRIES": "0",
            "GENERATION__SHARD_SIZE": "3",
            "PERSONAS__LIMIT": "20",
        }.items():
            monkeypatch.setenv(f"EMBED_FACTORY_{key}", value)

        async def run():
            return await generate(run_id="run-art", examples=8, task_types=["retrieval", "sts"], return_state=True)

        state = asyncio.run(run())
    summary = state.result()
    artifacts = artifacts_of(state.state_details.flow_run_id)
    assert set(artifacts) == {KEYS["generate_progress"], KEYS["generate_task_types"]}

    store = RunStore(data_dir, "run-art")
    examples = store.read_kind("examples").to_pylist()
    rejects = [r for r in store.read_kind("rejects").to_pylist() if r["stage"] == "generate"]
    assert rejects, "the stub's invalid answers end in rejects"
    rows = {r["task type"]: r for r in table_of(artifacts[KEYS["generate_task_types"]])}
    assert set(rows) == {"retrieval", "sts", "total"}
    for name, row in rows.items():
        ex = [r for r in examples if name in ("total", r["task_type"])]
        rj = [r for r in rejects if name in ("total", r["task_type"])]
        assert row["examples"] == len(ex) and row["rejects"] == len(rj) and row["requests"] == len(ex) + len(rj)
        assert row["attempts"] == sum(r["attempts"] for r in ex + rj)
        assert row["prompt tokens"] == sum(r["prompt_tokens"] for r in ex)
        assert row["completion tokens"] == sum(r["completion_tokens"] for r in ex)
        latencies = sorted(r["latency_s"] for r in ex)
        assert latencies[0] - 1e-3 <= row["latency p50 s"] <= row["latency p95 s"] <= latencies[-1] + 1e-3
        reasons = Counter(r["reason"] for r in rj)
        for reason, n in reasons.items():
            assert f"{reason} ×{n}" in row["rejects by reason"]
    assert rows["total"]["examples"] == summary.examples_by_type["retrieval"] + summary.examples_by_type["sts"]

    progress = artifacts[KEYS["generate_progress"]]
    assert progress.type == "progress"
    assert float(progress.data) == pytest.approx(100 * min(len(examples), 8) / 8)
    assert f"{len(examples)} of 8 parsed examples" in progress.description
    assert progress.updated > progress.created, "updated as shards committed"


# --- finetune: a 40-row export, one step ---------------------------------------------------------------
def test_finetune_artifacts_match_eval_json(prefect_api_url, tiny_finetune, monkeypatch):
    from flows.finetune import finetune

    data_dir = tiny_finetune
    monkeypatch.setenv("EMBED_FACTORY_FINETUNE__STS_MAX_PAIRS", "20")
    make_export(data_dir, "c-ft")
    state = finetune(clean_id="c-ft", max_steps=1, return_state=True)
    summary = state.result()
    artifacts = artifacts_of(state.state_details.flow_run_id)
    keys = ("finetune_dims", "finetune_languages", "finetune_training", "finetune_model")
    assert set(artifacts) == {KEYS[k] for k in keys}

    saved = json.loads(Path(summary.eval_path).read_text())
    before, after, delta = saved["before"], saved["after"], saved["delta"]
    dims = table_of(artifacts[KEYS["finetune_dims"]])
    assert [r["dim"] for r in dims] == [384, 256, 64]
    for r in dims:
        d = str(r["dim"])
        assert r["sts spearman before"] == pytest.approx(before["sts"]["spearman"]["mean"][d], abs=1e-4)
        assert r["sts spearman after"] == pytest.approx(after["sts"]["spearman"]["mean"][d], abs=1e-4)
        assert r["sts delta"] == pytest.approx(delta["sts"]["mean"][d], abs=1e-4)
        assert r["ndcg@10 after"] == pytest.approx(after["retrieval"]["metrics"][d]["ndcg@10"], abs=1e-4)
        assert r["recall@10 delta"] == pytest.approx(delta["retrieval"][d]["recall@10"], abs=1e-4)
    languages = table_of(artifacts[KEYS["finetune_languages"]])
    assert {(r["language"], r["dim"]) for r in languages} == {
        (lang, dim) for lang in ("en", "mean") for dim in (384, 256, 64)
    }
    for r in languages:
        assert r["delta"] == pytest.approx(delta["sts"][r["language"]][str(r["dim"])], abs=1e-4)
    training = artifacts[KEYS["finetune_training"]].data
    assert f"| steps | {summary.train.steps} |" in training and f"| {summary.clean_id} |" in training
    assert f"({Path(summary.model_dir).resolve().as_uri()})" in artifacts[KEYS["finetune_model"]].data


# --- pipeline: the markdown summary ------------------------------------------------------------------
def test_pipeline_markdown_sums_up_the_three_stages_and_appends_the_ledger():
    from flows.clean import CleanSummary
    from flows.generate import GenerateSummary

    generated = GenerateSummary(
        run_id="run-1",
        run_dir="/d/runs/run-1",
        examples_by_type={"retrieval": 7, "sts": 5},
        rejects=2,
        requests=14,
        failure_rate=2 / 14,
        completion_tokens=900,
        tokens_per_s=30.0,
        elapsed_s=30.0,
        unique_instructions={"retrieval": 3},
        personas=4,
        shards_written=2,
        shards_skipped=0,
    )
    cleaned = CleanSummary(
        "clean-1", ["run-1"], {"raw": 12, "mined": 9}, {"validate": 3}, "/d/export", "/d/report.html"
    )
    evaluation = {"model": "mini", "precision": "fp32"}
    tuned = FinetuneSummary.of(
        {
            **dict.fromkeys(("clean_id", "base_model", "train_path", "heldout_path", "eval_path"), "x"),
            "model_dir": "/d/model",
            "train": {"steps": 1, "samples": 8},
            "key_deltas": {"sts_spearman_mean": {"384": 0.01, "64": 0.02}},
            **{"before": evaluation, "after": evaluation, "delta": {}},
        }
    )
    text = pipeline_markdown(generated, cleaned, tuned, ledger_markdown="| cost per 1k | $0.42 |")
    assert "12 examples from 14 requests (2 rejects)" in text
    assert "| retrieval | 7 |" in text and "| mined | 9 |" in text and "validate 3" in text
    assert "| sts_spearman_mean | 0.01 | 0.02 |" in text and "Model: /d/model" in text
    assert text.rstrip().endswith("| cost per 1k | $0.42 |")
    assert "Cost" not in pipeline_markdown(generated, cleaned, None)
    assert "Not fine-tuned" in pipeline_markdown(generated, cleaned, None)
