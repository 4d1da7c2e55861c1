"""The ``finetune`` flow on a tiny export and its user errors; the model store's promotion.

``test_finetune_flow_on_tiny_export``: a hand-built clean export (40 rows, the real export format via
``tasks.cleaning.export.export_corpus``, ``tests/support/rows.py``), 2 training steps, STS on the first 40
English pairs: the model folder loads, eval.json holds before / after / delta. The deployment trigger
end to end is ``test_finetune_trigger.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.cli_process import cli
from support.rows import make_export


def _base_embedding(text: str):
    from tasks.training.evaluate import load_model

    return load_model(None).encode([text], normalize_embeddings=True)[0]


# --- the flow --------------------------------------------------------------------------------
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

    assert summary.clean_id == "c-tiny"
    final = data_dir / "models" / "all-MiniLM-L6-v2-c-tiny"
    model_dir = Path(summary.model_dir)
    assert model_dir == final or final in model_dir.parents
    assert summary.train.steps == 2 and summary.train.samples_per_s > 0
    assert not list((data_dir / "models").glob(".*")), "no staging or old folders left behind"

    # the comparable loss: the held-out split's fixed batches, scored before and after, in the summary,
    # the finetune-training artifact's table and the model card
    from flows.artifacts import training_markdown

    before, after = summary.train.heldout_loss_before, summary.train.heldout_loss_after
    assert before.source == after.source == "heldout" and before.batches == after.batches >= 1
    assert set(before.by_task) == set(after.by_task)
    line = f"held-out loss {before.mean:.4f} -> {after.mean:.4f} ({before.batches} fixed batches"
    assert line in training_markdown(summary)
    assert line in (model_dir / "README.md").read_text(encoding="utf-8")

    # a sentence-transformers folder with a model card, that loads and embeds
    assert (model_dir / "README.md").exists() and (model_dir / "modules.json").exists()
    model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    text = "How should I store a fragile telescope in a humid basement?"
    vec = model.encode([text], normalize_embeddings=True)[0]
    assert vec.shape == (384,)
    assert abs(float(vec @ _base_embedding(text)) - 1.0) > 1e-7, "training changed the model"

    # eval.json: before / after / delta, per dim, for STS (en) and the held-out retrieval
    saved = json.loads(Path(summary.eval_path).read_text())
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
        assert summary.key_deltas["sts_spearman_mean"][dim] == pytest.approx(after - before, abs=1e-6)
    assert set(saved["delta"]["retrieval"]) == set(dims)
    assert json.loads((final / "finetune.json").read_text())["model_dir"] == summary.model_dir

    # again on the same clean run: the new model replaces the old one in place
    again = finetune(clean_id="c-tiny", max_steps=1)
    assert again.model_dir == summary.model_dir and again.train.steps == 1
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


def test_atomic_dir_swaps_whole_model_folders_and_a_dead_writers_folder_goes(tmp_path):
    """The trainer saves through storage.atomic.atomic_dir: the old folder or the whole new one, never half."""
    from storage import atomic

    target = tmp_path / "model"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    assert (target / "weights").read_text() == "v1"
    with pytest.raises(RuntimeError, match="save failed"), atomic.atomic_dir(target) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("save failed")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (target / "weights").read_text() == "v1"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "other").write_text("v2")
    assert [p.name for p in target.iterdir()] == ["other"], "nothing of the old folder is left"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".model.tmp-{int(dead.stdout)}-1"  # a killed writer's half-saved folder
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "weights").write_text("partial")
    assert atomic.remove_stale_temps(tmp_path) == 1
    assert not stale.exists() and (target / "other").exists()


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
    result = cli(command, "--help", timeout=120)
    assert result.returncode == 0 and "Usage" in result.stdout and "--max-steps" in result.stdout


def test_cli_finetune_user_errors(tmp_path):
    env = {
        "EMBED_FACTORY_STORAGE__DATA_DIR": str(tmp_path / "data"),
        # configured API that nothing answers: these errors must come before any Prefect call
        "EMBED_FACTORY_PREFECT__API_URL": "http://127.0.0.1:9/api",
    }

    def finetune_cli(*args):
        return cli("finetune", *args, env=env, cwd=tmp_path, timeout=120)

    result = finetune_cli()  # no data folder yet (tests/app/test_cli_bad_ids.py has every such case)
    assert result.returncode == 1 and "holds no runs" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    make_export(tmp_path / "data", "c1", n=12)
    result = finetune_cli("--clean-id", "c1", "--base-model", str(tmp_path / "no-such-model"))
    assert result.returncode == 1 and "no such folder" in result.stderr and "Traceback" not in result.stderr
    result = finetune_cli("--max-steps", "0")
    assert result.returncode == 2
