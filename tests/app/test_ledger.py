"""The cost ledger: its arithmetic checked by hand on a small stored run, the catalog's ``ledger`` view,
the report section and the markdown for the Prefect artifacts. No LLM: the run's rows are written here."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ground.costs import clean_rows, generation_rows, ledger_markdown, with_training
from ground.settings import CostSettings
from prompts.task_types import get_task_type
from storage.catalog import Catalog
from storage.corpus import CleanStore
from storage.ledger import read_ledger, write_ledger
from storage.schemas import EXAMPLE_SCHEMA, REJECT_SCHEMA
from storage.shards import RunStore
from tasks.generation.usage import usage_by_type

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _example(run_id: str, i: int, task_type: str, attempts: int, prompt: int, completion: int) -> dict:
    row = dict.fromkeys(EXAMPLE_SCHEMA.names)
    row.update(
        example_id=f"{run_id}:{task_type}-{i}",
        run_id=run_id,
        shard_id="g00-00000",
        task_type=task_type,
        prompt_version=get_task_type(task_type).prompt_version,
        model="SmolLM2-135M-Instruct",
        attempts=attempts,
        prompt_tokens=prompt,
        completion_tokens=completion,
        query="q",
        positive="p",
        created_at=NOW,
    )
    return row


def _reject(run_id: str, task_type: str, stage: str, attempts: int) -> dict:
    row = dict.fromkeys(REJECT_SCHEMA.names)
    row.update(
        example_id=f"{run_id}:{stage}-{task_type}",
        run_id=run_id,
        shard_id="g00-00000" if stage == "generate" else "b000-00000",
        stage=stage,
        task_type=task_type,
        prompt_version="v",
        model="SmolLM2-135M-Instruct",
        attempts=attempts,
        reason="invalid output",
        created_at=NOW,
    )
    return row


def _brainstorm(run_id: str, persona: str, instruction: str, prompt: int, completion: int, latency: float) -> dict:
    return {
        "run_id": run_id,
        "shard_id": "b000-00000",
        "task_type": "retrieval",
        "instruction": instruction,
        "persona_id": persona,
        "persona": "a persona",
        "prompt_version": "v",
        "model": "SmolLM2-135M-Instruct",
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "latency_s": latency,
        "created_at": NOW,
    }


@pytest.fixture
def small_run(tmp_path) -> RunStore:
    """A run of 2 task types: retrieval (2 brainstorm requests giving 3 instructions, 2 examples, 1 reject)
    and sts (2 examples)."""
    store = RunStore(tmp_path / "data", "run-small")
    store.write_shard(
        "brainstorm",
        "b000-00000",
        [
            # request 1: two instructions, its tokens on both rows; request 2: one instruction
            _brainstorm("run-small", "p1", "find recipes", 50, 30, 1.5),
            _brainstorm("run-small", "p1", "find papers", 50, 30, 1.5),
            _brainstorm("run-small", "p2", "find laws", 40, 20, 1.25),
        ],
        [_reject("run-small", "retrieval", "brainstorm", 3)],
    )
    store.write_shard(
        "examples",
        "g00-00000",
        [
            _example("run-small", 0, "retrieval", 1, 60, 40),
            _example("run-small", 1, "retrieval", 2, 120, 80),
            _example("run-small", 0, "sts", 1, 30, 20),
            _example("run-small", 1, "sts", 1, 30, 20),
        ],
        [_reject("run-small", "retrieval", "generate", 3)],
    )
    return store


COST = CostSettings(gpu_hour_usd=3.0, cpu_hour_usd=0.5, llm_gpus_per_endpoint=4, embedding_gpus=0, training_gpus=1)


def test_generation_ledger_by_hand(small_run):
    usage = usage_by_type(
        small_run.read_kind("examples"), small_run.read_kind("rejects"), small_run.read_kind("brainstorm")
    )
    by_type = {u.task_type: u for u in usage}
    # retrieval: 2 examples + 1 example reject + 2 brainstorm requests + 1 brainstorm reject = 6 requests;
    # calls 1 + 2 + 3 + 1 + 1 + 3 = 11; prompt 60 + 120 + 50 + 40 = 270; completion 40 + 80 + 30 + 20 = 170
    r = by_type["retrieval"]
    assert (r.requests, r.llm_calls, r.prompt_tokens, r.completion_tokens, r.examples) == (6, 11, 270, 170, 2)
    s = by_type["sts"]
    assert (s.requests, s.llm_calls, s.prompt_tokens, s.completion_tokens, s.examples) == (2, 2, 60, 40, 2)

    # 54 s of wall on 2 endpoints: tokens 440 vs 100, so retrieval gets 54 * 440/540 = 44 s, sts 10 s;
    # GPU-seconds = 4 GPUs x 2 endpoints x that: 352 and 80; USD = GPU-s / 3600 x 3
    rows = {r["task_type"]: r for r in generation_rows("run-small", "m", usage, 54.0, 2, COST)}
    assert rows["retrieval"]["generation_wall_s"] == pytest.approx(44.0)
    assert rows["sts"]["generation_wall_s"] == pytest.approx(10.0)
    assert rows["retrieval"]["generation_gpu_s"] == pytest.approx(352.0)
    assert rows["sts"]["generation_gpu_s"] == pytest.approx(80.0)
    assert rows["retrieval"]["cost_usd"] == pytest.approx(352 / 3600 * 3.0)
    assert rows["sts"]["gpu_hours"] == pytest.approx(80 / 3600)
    assert rows["sts"]["cpu_s"] == 0 and rows["sts"].get("accepted") is None  # accepted: the clean run's

    # on the CPU (0 GPUs): the endpoints' wall seconds are priced at the CPU-hour price
    cpu = CostSettings(gpu_hour_usd=3.0, cpu_hour_usd=0.5, llm_gpus_per_endpoint=0)
    cpu_rows = {r["task_type"]: r for r in generation_rows("run-small", "m", usage, 54.0, 2, cpu)}
    assert cpu_rows["retrieval"]["generation_gpu_s"] == 0
    assert cpu_rows["retrieval"]["cost_usd"] == pytest.approx(2 * 44 / 3600 * 0.5)


def test_clean_and_training_ledger_by_hand_and_the_catalog_view(small_run, tmp_path):
    usage = usage_by_type(
        small_run.read_kind("examples"), small_run.read_kind("rejects"), small_run.read_kind("brainstorm")
    )
    write_ledger(small_run.ledger_path, generation_rows("run-small", "m", usage, 54.0, 2, COST))
    generation = read_ledger(small_run.ledger_path)
    # embedding 6 s and search 3 s shared by rows embedded (retrieval 2, sts 1): 4 + 2 and 2 + 1; on the CPU
    counts = {("retrieval", "SmolLM2-135M-Instruct"): 2, ("sts", "SmolLM2-135M-Instruct"): 1}  # (type, generator)
    rows = clean_rows("clean-small", generation, counts, counts, 6.0, 3.0, COST)
    by_type = {r["task_type"]: r for r in rows}
    assert by_type["retrieval"]["embed_s"] == pytest.approx(4.0) and by_type["retrieval"]["search_s"] == 2.0
    assert by_type["retrieval"]["clean_gpu_s"] == 0 and by_type["retrieval"]["cpu_s"] == pytest.approx(6.0)
    # training 30 s on 1 GPU, shared by accepted rows 2 : 1
    rows = {r["task_type"]: r for r in with_training(rows, 30.0, COST)}
    retrieval = rows["retrieval"]
    assert retrieval["train_gpu_s"] == pytest.approx(20.0)
    gpu_s = 352 + 20  # generation + training (clean ran on the CPU)
    usd = gpu_s / 3600 * 3.0 + 6 / 3600 * 0.5
    assert retrieval["cost_usd"] == pytest.approx(usd)
    assert retrieval["cost_per_1k_accepted"] == pytest.approx(usd / 2 * 1000)
    # a second fine-tune replaces the first one's seconds instead of adding to them
    again = {r["task_type"]: r for r in with_training(rows.values(), 30.0, COST)}
    assert again["retrieval"]["cost_usd"] == pytest.approx(usd)

    clean = CleanStore(tmp_path / "data", "clean-small")
    write_ledger(clean.ledger_path, rows.values())
    view = Catalog(tmp_path / "data").query(
        "SELECT scope, coalesce(run_id, clean_id) AS id, task_type, cost_usd, accepted FROM ledger ORDER BY ALL"
    )
    got = {(r["scope"], r["task_type"]): r for r in view.to_pylist()}
    assert set(got) == {("clean", "retrieval"), ("clean", "sts"), ("generate", "retrieval"), ("generate", "sts")}
    assert got[("clean", "retrieval")]["cost_usd"] == pytest.approx(usd)
    assert got[("clean", "sts")]["accepted"] == 1 and got[("generate", "sts")]["accepted"] is None

    markdown = ledger_markdown(rows.values())
    assert "| clean | clean-small | retrieval |" in markdown and f"{usd / 2 * 1000:,.4f}" in markdown


def test_empty_catalog_has_an_empty_ledger_view(tmp_path):
    view = Catalog(tmp_path / "fresh").query("SELECT count(*) AS n, count(cost_usd) AS c FROM ledger")
    assert view.to_pylist() == [{"n": 0, "c": 0}]


def test_report_shows_the_ledger_and_plan_vs_actual(small_run, tmp_path):
    from ground.cost_plan import Plan, TypePlan
    from tasks.cleaning.report import render_report

    usage = usage_by_type(
        small_run.read_kind("examples"), small_run.read_kind("rejects"), small_run.read_kind("brainstorm")
    )
    plan = Plan("history: run-old", "m", 2, [TypePlan("sts", 2, 2, 50, 50, 10.0, 0.03, 0.05)])
    rows = generation_rows("run-small", "m", usage, 54.0, 2, COST, plan.predicted_columns())
    write_ledger(small_run.ledger_path, rows)
    html = render_report(Catalog(tmp_path / "data"))
    assert 'id="costs"' in html and "history: run-old" in html
    sts_cost = [r for r in rows if r["task_type"] == "sts"][0]["cost_usd"]
    assert f"{(0.05 - sts_cost) / sts_cost:+.1%}" in html  # the plan's cost error
