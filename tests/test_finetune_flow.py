"""The ``finetune`` flow on a tiny export, its user errors, and the deployment trigger end to end.

* ``test_finetune_flow_on_tiny_export``: a hand-built clean export (40 rows, the real export format
  via ``tasks.cleaning.export.export_corpus``), 2 training steps, STS on the first 40 English pairs: the
  model folder loads, eval.json holds before / after / delta.
* ``test_clean_completion_triggers_finetune`` (marked ``trigger``, ~1-2 min on 2 cores): against
  the session's Prefect test server (an ephemeral server, which runs the event services: reactive
  triggers and actions), ``embed-factory serve`` serves the finetune deployment with its trigger in
  a subprocess; a real ``clean`` flow run on a tiny generation run completes; a finetune flow run
  of the deployment must appear with that clean run's clean_id and complete, and its model and
  eval.json must be there. Everything started is stopped at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from ground.settings import CleanSettings
from processes import stop
from storage.corpus import CleanStore
from storage.shards import RunStore, now_utc

ROOT = Path(__file__).resolve().parents[1]

# --- tiny, distinct, English-looking texts ---------------------------------------------------------
VERBS = [
    "repair",
    "paint",
    "clean",
    "store",
    "insure",
    "photograph",
    "sell",
    "move",
    "register",
    "winterize",
    "sharpen",
    "calibrate",
    "label",
    "recycle",
    "polish",
    "inspect",
]
ADJS = [
    "rusty",
    "antique",
    "borrowed",
    "second-hand",
    "waterproof",
    "fragile",
    "oversized",
    "electric",
    "handmade",
    "inherited",
    "foldable",
    "vintage",
]
NOUNS = [
    "bicycle",
    "violin",
    "greenhouse",
    "kayak",
    "sewing machine",
    "telescope",
    "bookshelf",
    "espresso grinder",
    "lawn mower",
    "aquarium",
    "drone",
    "piano stool",
    "tent",
    "microscope",
]
PLACES = [
    "a small flat",
    "a rainy coastal town",
    "a shared garage",
    "the mountains",
    "a humid basement",
    "a university lab",
    "a farmhouse",
    "a busy workshop",
    "a houseboat",
    "a school hall",
]
ADVICE = [
    "start by reading the maker's manual and photographing every part",
    "work slowly on a clean table and keep the screws in labelled cups",
    "ask a local club for help because members often lend the right tools",
    "check the warranty first since opening it yourself may void the cover",
    "use mild soap and warm water, never solvents that attack the finish",
    "keep it away from direct sunlight and sudden temperature changes",
    "measure twice, write the numbers down and order spare parts early",
    "budget an afternoon and expect the first attempt to take longer",
]


def tiny_pairs(n: int, seed: int = 7) -> list[tuple[str, str, str]]:
    """``n`` distinct (query, positive, negative) triples."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    while len(out) < n:
        verb, adj, noun, place = rng.choice(VERBS), rng.choice(ADJS), rng.choice(NOUNS), rng.choice(PLACES)
        query = f"How should I {verb} a {adj} {noun} in {place}?"
        if query in seen:
            continue
        seen.add(query)
        positive = (
            f"To {verb} a {adj} {noun} in {place}, {rng.choice(ADVICE)}. "
            f"A {noun} that is {adj} needs extra care, so {rng.choice(ADVICE)}."
        )
        negative = (
            f"The history of the {rng.choice(NOUNS)} goes back centuries; collectors in {rng.choice(PLACES)} "
            f"still argue about who built the first {rng.choice(ADJS)} one."
        )
        out.append((query, positive, negative))
    return out


def mined_like_table(n: int) -> pa.Table:
    """What the clean flow's ``mined`` stage hands to the export: the columns export_corpus reads."""
    rows = []
    pairs = tiny_pairs(n)
    for i, (query, positive, negative) in enumerate(pairs):
        task_type = "retrieval" if i % 4 else "short_short"
        rows.append(
            {
                "example_id": f"run-x:g00-{task_type}-{i:06d}",
                "task_type": task_type,
                "instruction": "Given a question about looking after an object, retrieve a helpful passage.",
                "query": query,
                "positive": positive,
                "negative": negative,
                "hard_negatives": [pairs[(i + 3) % n][1]],
            }
        )
    return pa.Table.from_pylist(rows)


def make_export(data_dir: Path, clean_id: str, n: int = 40) -> CleanStore:
    from tasks.cleaning.export import export_corpus

    store = CleanStore(data_dir, clean_id)
    export_corpus(mined_like_table(n), store.export_dir, CleanSettings(heldout_fraction=0.1, negatives_per_query=2))
    return store


def make_generation_run(data_dir: Path, run_id: str, n: int) -> None:
    """A generation run with one shard of ``n`` valid retrieval examples, as the generate flow writes them."""
    rows = []
    for i, (query, positive, negative) in enumerate(tiny_pairs(n, seed=11)):
        rows.append(
            {
                "example_id": f"{run_id}:r00-retrieval-{i:06d}",
                "run_id": run_id,
                "shard_id": "g00-00000",
                "task_type": "retrieval",
                "instruction": "Given a question about looking after an object, retrieve a helpful passage.",
                "instruction_id": "retrieval-000001",
                "persona_id": "p_x",
                "persona": "A careful hobbyist.",
                "placeholders": json.dumps({"language": "English"}),
                "prompt_version": "v",
                "model": "m",
                "sampling": "{}",
                "attempts": 1,
                "prompt_tokens": 10,
                "completion_tokens": 20,
                "latency_s": 1.0,
                "finish_reason": "stop",
                "query": query,
                "positive": positive,
                "negative": negative,
                "parsed": "{}",
                "raw_text": "{}",
                "created_at": now_utc(),
            }
        )
    RunStore(data_dir, run_id).write_shard("examples", "g00-00000", rows, [])


@pytest.fixture
def tiny_finetune(data_dir, monkeypatch):
    """Small, fast fine-tune settings (environment, so subprocesses get them too)."""
    from tasks.training.evaluate import bundled_sts_dir

    if not (bundled_sts_dir() / "stsb-en-test.csv").exists():
        pytest.fail(f"the bundled STS Benchmark is missing: {bundled_sts_dir()}/stsb-en-test.csv")
    for key, value in {
        "STS_LANGUAGES": '["en"]',
        "STS_MAX_PAIRS": "40",
        "BATCH_SIZE": "8",
        "MAX_SEQ_LENGTH": "64",
        "EVAL_BATCH_SIZE": "32",
        "HARD_NEGATIVES": "1",
        "MATRYOSHKA_DIMS": "[256, 64]",
        "MATRYOSHKA_WEIGHTS": "[1.0, 0.3]",
    }.items():
        monkeypatch.setenv(f"EMBED_FACTORY_FINETUNE__{key}", value)
    return data_dir


def _base_embedding(text: str):
    from tasks.training.evaluate import load_model

    return load_model(None).encode([text], normalize_embeddings=True)[0]


# --- (a) the flow --------------------------------------------------------------------------------
def test_finetune_flow_on_tiny_export(prefect_api_url, tiny_finetune):
    from sentence_transformers import SentenceTransformer

    from flows.finetune import finetune

    data_dir = tiny_finetune
    make_export(data_dir, "c-old")
    time.sleep(0.05)
    make_export(data_dir, "c-tiny")  # the latest export: picked when no clean_id is given
    started = time.monotonic()
    summary = finetune(max_steps=2)
    print(f"finetune flow on 40 rows, 2 steps: {time.monotonic() - started:.1f}s")

    assert summary["clean_id"] == "c-tiny"
    final = data_dir / "models" / "all-MiniLM-L6-v2-c-tiny"
    model_dir = Path(summary["model_dir"])
    assert model_dir == final or final in model_dir.parents
    assert summary["train"]["steps"] == 2 and summary["train"]["samples_per_s"] > 0
    assert not list((data_dir / "models").glob(".*")), "no staging or old folders left behind"

    # a sentence-transformers folder with a model card, that loads and embeds
    assert (model_dir / "README.md").exists() and (model_dir / "modules.json").exists()
    model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    text = "How should I store a fragile telescope in a humid basement?"
    vec = model.encode([text], normalize_embeddings=True)[0]
    assert vec.shape == (384,)
    assert abs(float(vec @ _base_embedding(text)) - 1.0) > 1e-7, "training changed the model"

    # eval.json: before / after / delta, per dim, for STS (en) and the held-out retrieval
    saved = json.loads(Path(summary["eval_path"]).read_text())
    assert set(saved) == {"before", "after", "delta"}
    dims = ["384", "256", "64"]
    for side in ("before", "after"):
        assert saved[side]["dims"] == [int(d) for d in dims]
        assert saved[side]["sts"]["pairs"] == {"en": 40}
        assert saved[side]["retrieval"]["queries"] >= 1
    for dim in dims:
        before = saved["before"]["sts"]["spearman"]["en"][dim]
        after = saved["after"]["sts"]["spearman"]["en"][dim]
        assert saved["delta"]["sts"]["en"][dim] == pytest.approx(after - before)
        assert summary["key_deltas"]["sts_spearman_mean"][dim] == pytest.approx(after - before, abs=1e-6)
    assert set(saved["delta"]["retrieval"]) == set(dims)
    assert json.loads((final / "finetune.json").read_text())["model_dir"] == summary["model_dir"]

    # again on the same clean run: the new model replaces the old one in place
    again = finetune(clean_id="c-tiny", max_steps=1)
    assert again["model_dir"] == summary["model_dir"] and again["train"]["steps"] == 1
    assert not list((data_dir / "models").glob(".*"))


def test_model_store_promotes_whole_models_only(tmp_path):
    from storage.models import ModelStore, PlacedModel

    store = ModelStore(tmp_path)
    final = store.model_dir("Qwen/Qwen2-0.5B", "c1")
    assert final == tmp_path / "models" / "Qwen2-0.5B-c1"
    assert store.model_dir(None, "c1").name == "all-MiniLM-L6-v2-c1"

    with pytest.raises(RuntimeError, match="training failed"), store.staging(final) as staged:
        (staged.root / "final").mkdir(parents=True)
        raise RuntimeError("training failed")
    assert list((tmp_path / "models").iterdir()) == [], "a failed run leaves nothing behind"

    # the trainer wrote into the staging folder: eval.json beside the model, the folder moved into place
    with store.staging(final) as staged:
        model = staged.root / "final"
        model.mkdir(parents=True)
        (model / "modules.json").write_text("v1")
        staged.eval_path(model).write_text("{}")
        placed = staged.promote(model)
    assert placed == PlacedModel(final / "final", final / "final" / "eval.json")
    assert (placed.model_dir / "modules.json").read_text() == "v1" and placed.eval_path.exists()

    # it wrote elsewhere: copied into model/ with eval.json at the top; the previous model is replaced
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "modules.json").write_text("v2")
    with store.staging(final) as staged:
        assert staged.eval_path(elsewhere) == staged.root / "eval.json"
        staged.root.mkdir()
        staged.eval_path(elsewhere).write_text("{}")
        placed = staged.promote(elsewhere)
    assert placed == PlacedModel(final / "model", final / "eval.json")
    assert (final / "model" / "modules.json").read_text() == "v2" and placed.eval_path.exists()
    assert not (final / "final").exists(), "nothing of the previous model is left"
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["Qwen2-0.5B-c1"]


def test_no_export_is_a_clear_error(prefect_api_url, data_dir):
    from flows.finetune import FinetuneError, finetune

    with pytest.raises(FinetuneError, match="no clean run with an export"):
        finetune()
    (data_dir / "clean" / "c-half").mkdir(parents=True)
    with pytest.raises(FinetuneError, match="the clean run has no export yet"):
        finetune(clean_id="c-half")
    with pytest.raises(FinetuneError, match="no such clean run"):
        finetune(clean_id="c-nope")


@pytest.mark.parametrize("command", ["finetune", "serve"])
def test_cli_help(command):
    result = subprocess.run(
        [sys.executable, "-m", "embed_factory.cli", command, "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "Usage" in result.stdout and "--max-steps" in result.stdout


def test_cli_finetune_user_errors(tmp_path):
    def cli(*args):
        env = {
            **os.environ,
            "EMBED_FACTORY_STORAGE__DATA_DIR": str(tmp_path / "data"),
            # configured API that nothing answers: these errors must come before any Prefect call
            "EMBED_FACTORY_PREFECT__API_URL": "http://127.0.0.1:9/api",
        }
        return subprocess.run(
            [sys.executable, "-m", "embed_factory.cli", "finetune", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )

    result = cli()
    assert result.returncode == 1 and "no clean run with an export" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    make_export(tmp_path / "data", "c1", n=12)
    result = cli("--clean-id", "c1", "--base-model", str(tmp_path / "no-such-model"))
    assert result.returncode == 1 and "no such folder" in result.stderr and "Traceback" not in result.stderr
    result = cli("--max-steps", "0")
    assert result.returncode == 2


# --- (b) the deployment trigger ----------------------------------------------------------------------
async def _finetune_runs(deployment_id):
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    async with get_client() as client:
        return await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )


async def _deployment_with_trigger():
    """The served deployment's id once it and its trigger's automation are registered, else None."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    from embed_factory.deployments.finetune_trigger import FULL_NAME, TRIGGER_NAME

    async with get_client() as client:
        try:
            deployment = await client.read_deployment_by_name(FULL_NAME)
        except ObjectNotFound:
            return None
        automations = await client.read_automations_by_name(TRIGGER_NAME)
        ours = [
            a
            for a in automations
            if any(getattr(action, "deployment_id", None) == deployment.id for action in a.actions)
        ]
        return deployment.id if ours else None


async def _delete_deployment(deployment_id):
    from prefect import get_client

    async with get_client() as client:
        await client.delete_resource_owned_automations(f"prefect.deployment.{deployment_id}")
        await client.delete_deployment(deployment_id)


@pytest.mark.trigger
def test_clean_completion_triggers_finetune(prefect_api_url, tiny_finetune, tmp_path, monkeypatch):
    from prefect.client.schemas.objects import StateType

    from flows.clean import clean

    data_dir = tiny_finetune
    make_generation_run(data_dir, "run-t", 24)
    # a corpus of 48 texts: mine negatives from ranks 2-10 (the defaults, 50-100, are beyond it)
    for key, value in {
        "RANK_TOP_K": "10",
        "NEGATIVE_RANK_MIN": "1",
        "NEGATIVE_RANK_MAX": "10",
        "NEGATIVES_PER_QUERY": "2",
    }.items():
        monkeypatch.setenv(f"EMBED_FACTORY_CLEAN__{key}", value)
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    t0 = time.monotonic()
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "embed_factory.cli", "serve", "--max-steps", "2"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
    deployment_id = None

    def fail(message: str):
        pytest.fail(f"{message}\n--- serve log ---\n{log_path.read_text(errors='replace')[-6000:]}")

    try:
        deadline = time.monotonic() + 90
        while deployment_id is None:
            if server.poll() is not None:
                fail(f"`embed-factory serve` exited with {server.returncode}")
            if time.monotonic() > deadline:
                fail("the finetune deployment and its trigger were not registered within 90 s")
            time.sleep(1)
            deployment_id = asyncio.run(_deployment_with_trigger())
        t_served = time.monotonic()
        assert asyncio.run(_finetune_runs(deployment_id)) == [], "no fine-tune before a clean run completes"

        summary = clean(clean_id="c-trig")  # the real clean flow, in this process; Completed fires the trigger
        assert summary["counts"]["mined"] > 0
        t_clean = time.monotonic()

        runs = []
        deadline = time.monotonic() + 60
        while not runs:
            if time.monotonic() > deadline:
                fail("no finetune flow run was created within 60 s of the clean run completing")
            time.sleep(1)
            runs = asyncio.run(_finetune_runs(deployment_id))
        t_created = time.monotonic()
        assert len(runs) == 1
        run = runs[0]
        assert run.parameters["clean_id"] == "c-trig", run.parameters  # templated from the clean run
        assert run.parameters["max_steps"] == 2

        deadline = time.monotonic() + 150
        while not (run.state and run.state.is_final()):
            if time.monotonic() > deadline:
                fail(f"the triggered finetune run did not finish within 150 s (state {run.state_name})")
            time.sleep(2)
            run = asyncio.run(_finetune_runs(deployment_id))[0]
        if run.state.type != StateType.COMPLETED:
            fail(f"the triggered finetune run ended {run.state_name}: {run.state.message}")
        t_done = time.monotonic()
        eval_json = data_dir / "models" / "all-MiniLM-L6-v2-c-trig" / "eval.json"
        assert eval_json.exists()
        assert set(json.loads(eval_json.read_text())) == {"before", "after", "delta"}
        print(
            f"serve registered in {t_served - t0:.1f}s, clean {t_clean - t_served:.1f}s, "
            f"trigger → run created {t_created - t_clean:.1f}s, fine-tune done {t_done - t_created:.1f}s"
        )
    finally:
        stop(server)
        if deployment_id is not None:
            asyncio.run(_delete_deployment(deployment_id))
