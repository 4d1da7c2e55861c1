"""A mix of generator models (``llm.endpoints``, ``llm.mix``, ``llm.mix_by_task_type``): bad settings are one
line; the router sends a request only to its model's endpoints; a run over two stub servers, each answering only
as its own model, writes each model's rows in the configured ratio; the report's per-generator table and the
ledger's split match counts made here with DuckDB over the stage tables."""

from __future__ import annotations

import asyncio
import json

import duckdb
import pytest
import typer

from ground.generators import LLMEndpoint, assign, quotas
from llm.router import EndpointRouter
from storage.shards import RunStore
from support.stub_llm import StubLLM

A, B = "gen-a", "gen-b"


# --- settings -----------------------------------------------------------------------------------
def _settings_error(tmp_path, monkeypatch, capsys, toml: str) -> str:
    from embed_factory.cli.frame import load_cli_settings

    config = tmp_path / "embed-factory.toml"
    config.write_text(toml)
    monkeypatch.setenv("EMBED_FACTORY_CONFIG", str(config))  # load_cli_settings sets it: restored after the test
    with pytest.raises(typer.Exit):
        load_cli_settings(config)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: invalid settings:"), lines
    return lines[0]


TWO = f'[[llm.endpoints]]\nurl = "http://a:8000/v1"\nmodel = "{A}"\n[[llm.endpoints]]\nurl = "http://b:8000/v1"\n'


@pytest.mark.parametrize(
    "toml, words",
    [
        (TWO + f'model = "{B}"\n[llm.mix]\n"{A}" = -0.5\n"{B}" = 1\n', "weights must be 0 or more, not gen-a = -0.5"),
        (TWO, "llm.endpoints.1.model: Field required"),
        (TWO + f'model = "{B}"\n[llm.mix_by_task_type.retreival]\n"{A}" = 1\n', "unknown task type(s) retreival"),
        (TWO + f'model = "{B}"\n[llm.mix]\n"gen-c" = 1\n', "llm.mix names gen-c, which no endpoint serves"),
        (TWO + f'model = "{B}"\n[llm.mix]\n"{A}" = 0\n', "the weights add up to 0"),
        (f'[llm.mix]\n"{A}" = 1\n', "llm.mix and llm.mix_by_task_type need llm.endpoints"),
    ],
    ids=["negative", "no-model", "unknown-type", "unserved", "all-zero", "no-endpoints"],
)
def test_bad_mix_settings_are_one_error_line(tmp_path, monkeypatch, capsys, toml, words):
    assert words in _settings_error(tmp_path, monkeypatch, capsys, toml)


def test_old_settings_read_as_one_endpoint_list():
    from ground.settings import Settings

    old = Settings(llm={"base_urls": ["http://x/v1", "http://y/v1"], "model": "m"})
    assert old.llm_endpoints == [LLMEndpoint(url="http://x/v1", model="m"), LLMEndpoint(url="http://y/v1", model="m")]
    assert old.llm_models == ["m"] and old.generator_weights("sts") == {"m": 2.0}
    mixed = Settings(
        llm={
            "endpoints": [{"url": "http://x/v1", "model": A}, {"url": "http://y/v1", "model": B}],
            "mix": {A: 7, B: 3},
            "mix_by_task_type": {"sts": {B: 1}},
        }
    )
    assert mixed.llm_model == A and mixed.llm_base_urls == ["http://x/v1", "http://y/v1"]
    assert mixed.generator_weights("retrieval") == {A: 7.0, B: 3.0}
    assert mixed.generator_weights("sts") == {A: 0.0, B: 1.0}


def test_quotas_are_exact_and_the_order_is_seeded():
    import random

    assert quotas({A: 0.7, B: 0.3}, 1000) == {A: 700, B: 300}
    assert quotas({A: 1, B: 1, "c": 1}, 10) == {A: 4, B: 3, "c": 3}
    first, again = assign({A: 0.7, B: 0.3}, 50, random.Random(1)), assign({A: 0.7, B: 0.3}, 50, random.Random(1))
    assert first == again and first.count(B) == 15 and first != sorted(first)


# --- routing ------------------------------------------------------------------------------------
def test_router_leases_only_the_models_endpoints_and_never_takes_out_a_models_last_one():
    router = EndpointRouter(["http://a1", "http://a2", "http://b1"], models=[A, A, B])
    leases = [router.acquire(model=B) for _ in range(3)]
    assert {lease.url for lease in leases} == {"http://b1"}
    router.failed(leases[0], "boom")  # the only endpoint of B: nowhere else to send B's requests
    assert router.endpoints[2].in_rotation
    a = router.acquire(model=A)
    router.failed(a, "boom")  # A has another endpoint: this one goes out
    assert not router.endpoints[[e.url for e in router.endpoints].index(a.url)].in_rotation
    assert {router.acquire(model=A).url for _ in range(3)} == {"http://a1", "http://a2"} - {a.url}


# --- runs against two stub servers --------------------------------------------------------------
@pytest.fixture
def two_generators(monkeypatch, data_dir):
    """Two stub servers, each answering only as its model (another model's request gets vLLM's 404)."""
    with StubLLM(model=A, strict_model=True) as a, StubLLM(model=B, strict_model=True) as b:
        endpoints = [{"url": a.base_url, "model": A}, {"url": b.base_url, "model": B}]
        monkeypatch.setenv("EMBED_FACTORY_LLM__ENDPOINTS", json.dumps(endpoints))
        monkeypatch.setenv("EMBED_FACTORY_LLM__MIX", json.dumps({A: 0.7, B: 0.3}))
        monkeypatch.setenv("EMBED_FACTORY_LLM__MIX_BY_TASK_TYPE", json.dumps({"sts": {B: 1}}))
        monkeypatch.setenv("EMBED_FACTORY_GENERATION__INTENT_THRESHOLD", "null")
        monkeypatch.setenv("EMBED_FACTORY_GENERATION__SHARD_SIZE", "250")
        yield a, b


def test_a_run_writes_each_generators_rows_in_the_configured_ratio(prefect_api_url, two_generators, data_dir):
    from flows.generate import generate

    a, b = two_generators
    asyncio.run(generate(run_id="mix", examples=1000, seed=3))
    store = RunStore(data_dir, "mix")
    rows = store.read_kind("examples").select(["task_type", "model"]).to_pylist()
    rejects = store.read_kind("rejects").to_pylist()
    assert len(rows) >= 950, f"{len(rows)} rows, rejects: {rejects[:3]}"
    assert not [r for r in rejects if "404" in (r["reason"] or "")], "a request went to the other model's server"
    assert set(a.answered) == {A} and set(b.answered) == {B}, (a.answered, b.answered)
    assert {r["model"] for r in rows if r["task_type"] == "sts"} == {B}, "sts: llm.mix_by_task_type"
    mixed = [r["model"] for r in rows if r["task_type"] != "sts"]
    share = mixed.count(A) / len(mixed)
    assert abs(share - 0.7) <= 0.05 * 0.7, f"{A} wrote {share:.1%} of {len(mixed)} rows, configured 70%"
    assert abs((1 - share) - 0.3) <= 0.05 * 0.3, f"{B} wrote {1 - share:.1%} of {len(mixed)} rows, configured 30%"
    # the run's ledger: a row per task type and model, its examples = that model's rows
    ledger = duckdb.sql(f"SELECT model, sum(examples) AS n FROM '{store.ledger_path}' GROUP BY ALL").fetchall()
    assert dict(ledger) == {A: sum(r["model"] == A for r in rows), B: sum(r["model"] == B for r in rows)}


def test_the_reports_generator_table_matches_the_stage_tables(prefect_api_url, two_generators, data_dir, monkeypatch):
    from flows.clean import clean
    from flows.generate import generate
    from storage.catalog import Catalog
    from storage.corpus import CleanStore
    from storage.stages import CLEAN_STAGES
    from tasks.cleaning.report import render_report
    from tasks.cleaning.report_data import ReportData
    from tasks.cleaning.report_generators import generator_rows

    monkeypatch.setenv("EMBED_FACTORY_CLEAN__JUDGE", "true")
    monkeypatch.setenv("EMBED_FACTORY_CLEAN__NEGATIVES_PER_QUERY", "2")
    monkeypatch.setenv("EMBED_FACTORY_CLEAN__NEGATIVE_RANK_MIN", "1")
    monkeypatch.setenv("EMBED_FACTORY_CLEAN__NEGATIVE_RANK_MAX", "10")
    monkeypatch.setenv("EMBED_FACTORY_CLEAN__DECONTAMINATE", "false")
    monkeypatch.setenv("EMBED_FACTORY_COST__LLM_GPUS_PER_ENDPOINT", "1")  # so each model's rows cost something
    asyncio.run(generate(run_id="mix-small", examples=120, seed=5, task_types=["retrieval", "classification"]))
    clean(clean_id="c-mix", runs=["mix-small"])

    store, run = CleanStore(data_dir, "c-mix"), RunStore(data_dir, "mix-small")
    expected: dict[str, dict[str, int]] = {}
    generated = duckdb.sql(f"SELECT model, count(*) FROM '{run.root}/examples/*.parquet' GROUP BY ALL").fetchall()
    expected["generated"] = dict(generated)
    for stage in CLEAN_STAGES:
        if store.stage_path(stage.table).exists():
            counts = duckdb.sql(f"SELECT model, count(*) FROM '{store.stage_path(stage.table)}' GROUP BY ALL")
            expected[stage.table] = dict(counts.fetchall())
    assert "verified" in expected, "the judge ran"
    assert set(expected["generated"]) == {A, B} and set(expected["verified"]) == {A, B}
    catalog = Catalog(data_dir)
    with catalog.session():
        table = generator_rows(ReportData(catalog, "c-mix"))
    assert [r["model"] for r in table] == [A, B]
    for row in table:
        for column, counts in expected.items():
            assert row[column] == counts.get(row["model"], 0), (row, column, counts)
        assert row["cost_usd"] > 0
        assert row["cost_per_1k_accepted"] == pytest.approx(row["cost_usd"] / row["verified"] * 1000)
    # the clean ledger's accepted rows per model are the last stage table's
    ledger = duckdb.sql(f"SELECT model, sum(accepted) FROM '{store.ledger_path}' GROUP BY ALL").fetchall()
    assert dict(ledger) == expected["verified"]
    html = render_report(catalog, "c-mix")
    assert 'id="generators"' in html and f'<td class="text">{A}</td>' in html


def test_doctor_checks_that_each_endpoint_serves_its_own_model():
    from embed_factory import doctor
    from ground.settings import Settings

    with StubLLM(model=A) as a, StubLLM(model=B) as b:
        right = Settings(llm={"endpoints": [{"url": a.base_url, "model": A}, {"url": b.base_url, "model": B}]})
        assert doctor.check_llm(right, timeout_s=10).status == doctor.OK
        swapped = Settings(llm={"endpoints": [{"url": a.base_url, "model": B}, {"url": b.base_url, "model": A}]})
        check = doctor.check_llm(swapped, timeout_s=10)
    assert check.status == doctor.FAIL and f"{a.base_url} serves {A}, not {B}" in check.detail
    assert f"set the model of {a.base_url} in llm.endpoints to one of: {A}" in check.fix


def test_a_models_lone_endpoint_that_fails_is_retried_with_backoff_and_never_swapped_for_another_model():
    import time

    import httpx

    from llm.client import LLMClient, Sampling
    from prompts.render import RenderedPrompt
    from prompts.schemas import object_schema, string_field

    asked: dict[str, list[str]] = {"a.test": [], "b.test": []}

    async def handler(request: httpx.Request) -> httpx.Response:
        host, model = request.url.host, json.loads(request.content)["model"]
        asked[host].append(model)
        if host == "b.test" and len(asked[host]) <= 2:
            return httpx.Response(503, json={"error": "overloaded"})
        content = json.dumps({"answer": model})
        message = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
        return httpx.Response(200, json={"id": "x", "object": "chat.completion", "created": 0, "model": model,
                                         "choices": [message], "usage": usage})  # fmt: skip

    schema = object_schema({"answer": string_field(1, 20)})
    prompt = RenderedPrompt([{"role": "user", "content": "hi"}], schema, "t", "v1")
    client = LLMClient(
        ["http://a.test/v1", "http://b.test/v1"],
        A,
        models=[A, B],
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        max_retries=3,
    )

    async def main():
        async with client:
            return await client.complete_json(prompt, Sampling(0.9, 0.95, 64), seed=1, model=B)

    started = time.monotonic()
    answer = asyncio.run(main())
    assert answer.parsed == {"answer": B}
    assert asked == {"a.test": [], "b.test": [B, B, B]}, "B's requests stay on B's endpoint"
    assert time.monotonic() - started >= 0.375 + 0.75, "two backoffs (0.5 s, 1 s, less up to 25 % jitter)"
