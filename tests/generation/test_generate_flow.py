"""Integration: the Prefect ``generate`` flow against the real embedded vLLM server; crash and resume."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from prompts.task_types import TASK_TYPES
from storage.shards import RunStore
from tasks.generation.generate import plan_examples, split_targets

pytestmark = pytest.mark.llm
ALL_TYPES = list(TASK_TYPES)


def test_flow_generates_every_task_type(llm_base_url, prefect_api_url, data_dir, monkeypatch):
    from flows.generate import generate

    monkeypatch.setenv("EMBED_FACTORY_GENERATION__SHARD_SIZE", "6")
    summary = asyncio.run(generate(run_id="it-all-types", examples=12, seed=7))

    store = RunStore(data_dir, "it-all-types")
    examples = store.read_kind("examples").to_pylist()
    rejects = store.read_kind("rejects").to_pylist()
    assert summary.examples_by_type == {
        t: sum(r["task_type"] == t for r in examples) for t in ALL_TYPES if any(r["task_type"] == t for r in examples)
    }
    assert {r["task_type"] for r in examples} == set(ALL_TYPES), "every task type yields parsed examples"
    assert len({r["example_id"] for r in examples}) == len(examples)

    for row in examples:
        spec = TASK_TYPES[row["task_type"]]
        parsed = json.loads(row["parsed"])
        query_key, pos_key, neg_key = spec.field_map
        assert row["query"] == parsed[query_key] and row["positive"] == parsed[pos_key]
        assert row["negative"] == (parsed[neg_key] if neg_key else None)
        assert row["prompt_version"] == spec.prompt_version
        assert row["model"] == "SmolLM2-135M-Instruct"
        assert row["completion_tokens"] > 0 and row["latency_s"] > 0 and row["finish_reason"]
        assert json.loads(row["raw_text"]) is not None
        if spec.brainstorms:  # lineage: the persona that brainstormed the instruction
            assert row["persona_id"] and row["persona"] and row["instruction_id"]
        else:
            assert row["persona_id"] is None and row["instruction"] == spec.fixed_instruction
    for row in rejects:
        assert row["reason"]

    # the unique instructions table records the persona of each instruction
    instructions = store.read_instructions().to_pylist()
    assert instructions and all(r["persona_id"] and r["persona"] for r in instructions)
    assert len({(r["task_type"], r["normalized"]) for r in instructions}) == len(instructions)
    # the manifest accounts for every shard file
    manifest = store.manifest()
    files = sorted(
        p.relative_to(store.root).with_suffix("").as_posix()
        for kind in ("brainstorm", "examples")
        for p in (store.root / kind).glob("*.parquet")
    )
    assert sorted(manifest) == files
    assert sum(v["rows"] for k, v in manifest.items() if k.startswith("examples/")) == len(examples)


def _run_cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "embed_factory.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_kill_9_mid_run_then_run_again_loses_duplicates_nothing_and_cleans(llm_base_url, prefect_api_url, tmp_path):
    """A user's crash: `run` killed mid-generation, then the same `run` again resumes, finishes and cleans."""
    data = tmp_path / "data"
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api_url,
        "EMBED_FACTORY_STORAGE__DATA_DIR": str(data),
        "EMBED_FACTORY_GENERATION__SHARD_SIZE": "2",
        "EMBED_FACTORY_GENERATION__SHARDS_IN_FLIGHT": "2",
        "EMBED_FACTORY_GENERATION__MAX_TOPUP_ROUNDS": "0",
        # an 8-example corpus is tiny: shrink the rank windows to fit it
        "EMBED_FACTORY_CLEAN__RANK_TOP_K": "6",
        "EMBED_FACTORY_CLEAN__NEGATIVE_RANK_MIN": "1",
        "EMBED_FACTORY_CLEAN__NEGATIVE_RANK_MAX": "6",
        "EMBED_FACTORY_CLEAN__CHECK_LANGUAGE": "false",
    }
    # one brainstormed type and one that is not: every type takes the same resume path, the tokens cost minutes
    types = ["retrieval", "sts"]
    args = ["run", "--run-id", "crash", "--examples", "8", "--seed", "3", "-t", types[0], "-t", types[1]]
    store = RunStore(data, "crash")

    first = _run_cli(args, env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # wait until at least one example shard is committed
        if any(k.startswith("examples/") for k in store.manifest()):
            break
        if first.poll() is not None:
            pytest.fail(f"run ended before it could be killed:\n{first.stdout.read()}")
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    committed_before = {k: v["sha256"] for k, v in store.manifest().items() if k.startswith("examples/")}
    planned_shards = 2 * -(-4 // 2)
    assert 0 < len(committed_before) < planned_shards, "the kill landed mid-run"
    assert not (data / "clean" / "crash").exists(), "killed before its clean began"

    second = _run_cli(args, env)
    out, _ = second.communicate(timeout=900)
    assert second.returncode == 0, out
    assert "shards written/skipped" in out

    examples = store.read_kind("examples")
    rejects = store.read_kind("rejects")
    generate_rejects = [r for r in rejects.to_pylist() if r["stage"] == "generate"]
    ids = examples["example_id"].to_pylist() + [r["example_id"] for r in generate_rejects]
    planned = plan_examples("crash", 0, split_targets(8, types), store.read_instructions(), 3, 2)
    planned_ids = [r.example_id for shard in planned for r in shard.requests]
    assert len(ids) == len(set(ids)), "no example (or reject) recorded twice"
    assert sorted(ids) == sorted(planned_ids), "every planned request ended in the data or the rejects"
    # shards committed before the kill were kept, not redone
    manifest_after = store.manifest()
    for key, sha in committed_before.items():
        assert manifest_after[key]["sha256"] == sha
    assert not list(data.rglob(".*.tmp-*")), "no temp file left behind"

    # then it cleaned what it generated, and the catalog answers over it
    assert "clean crash" in out and "report:" in out, out
    clean_root = data / "clean" / "crash"
    assert (clean_root / "valid.parquet").exists() and (clean_root / "report.html").exists()
    assert (clean_root / "export" / "train.jsonl").exists()
    query = subprocess.run(
        [sys.executable, "-m", "embed_factory.cli", "query", "SELECT count(*) AS n FROM raw"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert query.returncode == 0 and f"{examples.num_rows}" in query.stdout, query.stdout + query.stderr
