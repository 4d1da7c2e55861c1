"""The production decoder path of fine-tuning, for real: a causal LM trained a few steps as an embedding model.

Production fine-tunes Qwen/Qwen2-0.5B, a decoder with no sentence-transformers files; the stand-in
here is SmolLM2-135M, the Llama-style decoder that the embedded vLLM server runs, converted from its
bundled GGUF into a Hugging Face folder by ``EmbeddedLLMServer.ensure_model`` (once per machine, in
``~/.cache/embed-factory/models``). The test goes through ``tasks.training.train`` as production
does: the plain folder wrapped as Transformer -> mean Pooling -> Normalize, a pad token set where
the tokenizer has none (the copy here has its pad token removed, so that path always runs), fp32
weights from a bf16 checkpoint, gradient checkpointing, bf16 autocast (forced: native on some CPUs and every
GPU, emulated on the other CPUs, so the production precision runs in every CI); then a few STS pairs, saving,
and reloading with sentence-transformers, which must embed the same vectors: what was evaluated is what ships.

Without the converted folder (and without the vLLM venv to build it) the test fails under CI=true
and skips elsewhere, saying what to run.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub

import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from ground.settings import EmbeddedLLMSettings, FinetuneSettings  # noqa: E402
from support.exports import write_export  # noqa: E402

TOKENIZER_FILES_WITH_PAD = ("tokenizer_config.json", "special_tokens_map.json")


def converted_decoder() -> Path:
    """The SmolLM2 Hugging Face folder of the embedded server, converting the GGUF if the vLLM venv is there."""
    from embed_factory.llm_server import EmbeddedLLMServer

    settings = EmbeddedLLMSettings()
    if (settings.model_dir / "config.json").exists():
        return settings.model_dir
    server = EmbeddedLLMServer(settings)
    if Path(server.python).exists():
        return server.ensure_model()
    reason = (
        f"no converted decoder at {settings.model_dir} and no vLLM venv to convert it "
        f"({server.python}); run `embed-factory llm up` once"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def without_pad_token(source: Path, view: Path) -> Path:
    """``source`` seen through symlinks, with the pad token removed from its tokenizer files."""
    view.mkdir()
    for item in source.iterdir():
        if item.name in TOKENIZER_FILES_WITH_PAD:
            data = json.loads(item.read_text(encoding="utf-8"))
            data.pop("pad_token", None)
            (view / item.name).write_text(json.dumps(data), encoding="utf-8")
        else:
            (view / item.name).symlink_to(item)
    return view


def test_decoder_fine_tunes_saves_and_reloads_to_the_same_vectors(tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoConfig, AutoTokenizer

    from tasks.training.evaluate import evaluate_model, evaluate_sts
    from tasks.training.train import train_embedding_model

    source = converted_decoder()
    base = without_pad_token(source, tmp_path / "decoder")
    assert AutoTokenizer.from_pretrained(base).pad_token is None  # the path that sets one runs
    config = AutoConfig.from_pretrained(base)
    assert not (base / "modules.json").exists()  # a plain causal LM folder, like Qwen/Qwen2-0.5B
    width = config.hidden_size

    train_path = write_export(tmp_path / "train.parquet", rows_per_task=2)
    cfg = FinetuneSettings(
        base_model=str(base),
        max_steps=3,
        batch_size=4,
        max_seq_length=24,
        hard_negatives=1,
        learning_rate=1e-4,
        gradient_checkpointing=True,
        bf16=True,
        eval_batch_size=8,
        sts_languages=["en"],
        sts_max_pairs=12,
    )
    trained = {}

    def evaluate(model):
        trained["model"] = model
        return {"sts_en_spearman": evaluate_sts(model, cfg, bf16=True)["en"][width]}

    out = tmp_path / "model"
    result = train_embedding_model(train_path, out, cfg, eval_callback=evaluate)

    # trained as production trains a decoder
    assert result.steps == 3 and len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    assert result.matryoshka_dims[0] == width and result.gradient_checkpointing is True
    assert result.precision == "bf16"
    assert "_original_forward" not in trained["model"].__dict__  # accelerate's autocast wrapper removed
    model = trained["model"]
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    assert model[1].pooling_mode == "mean"
    tokenizer = model[0].tokenizer
    assert tokenizer.pad_token is not None and tokenizer.pad_token == tokenizer.eos_token
    assert model[0].auto_model.is_gradient_checkpointing  # really on, not only asked for
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights from a bf16 checkpoint
    assert -1.0 <= result.eval_metrics["sts_en_spearman"] <= 1.0  # not NaN: the pairs' cosines differ

    # distinct texts, distinct vectors (a chat template rendered around every text made them all one vector)
    texts = [
        "Instruct: Retrieve a passage\nQuery: how do I descale a kettle?",
        "Soak it in vinegar and water for an hour.",
        "a red bicycle",
    ]
    expected = model.encode(texts, convert_to_tensor=True)
    assert float((expected[0] @ expected[1:].T).max()) < 0.99
    # the weights moved from the (bf16) checkpoint's
    from safetensors import safe_open

    with safe_open(str(source / "model.safetensors"), "pt") as weights:
        name = next(k for k in weights.keys() if k.endswith("layers.0.self_attn.q_proj.weight"))
        before = weights.get_tensor(name).float()
    assert not torch.equal(model[0].auto_model.layers[0].self_attn.q_proj.weight.detach(), before)

    # saved and reloaded: the same modules, the same vectors, the same STS scores
    loaded = SentenceTransformer(str(out), device="cpu", local_files_only=True)
    assert [type(m).__name__ for m in loaded] == ["Transformer", "Pooling", "Normalize"]
    assert loaded[0].tokenizer.pad_token == tokenizer.pad_token
    again = loaded.encode(texts, convert_to_tensor=True)
    assert again.shape == (3, width)
    assert torch.allclose(again, expected, atol=1e-5)
    after = evaluate_model(loaded, cfg, bf16=True)
    assert after.width == width and after.sts.pairs == {"en": 12}
    assert after.sts.spearman["en"][str(width)] == pytest.approx(result.eval_metrics["sts_en_spearman"], abs=1e-6)
