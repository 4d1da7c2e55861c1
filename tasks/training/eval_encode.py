"""Embedding texts for evaluation: one encode of the unique texts, Matryoshka slices of the vectors.

:func:`encode` embeds every unique text once at full width (longest first, in chunks that report to a
progress stage); :func:`truncate` slices and re-normalises vectors to a Matryoshka dimension;
:func:`eval_dims` says which dimensions to evaluate. Used by :mod:`tasks.training.evaluate`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ground import progress
from ground.compute import l2_normalize
from tasks.training.eval_data import EvaluationError

#: texts per ``model.encode`` call, in batches: one progress report each (a multiple of the batch size keeps
#: the batches exactly those of one call over all texts)
_ENCODE_CHUNK_BATCHES = 8


# --- dimensions ---------------------------------------------------------------------------------
def eval_dims(width: int, dims: Iterable[int]) -> list[int]:
    """The dimensions to evaluate: the full ``width`` plus every listed dim below it, descending.

    The same rule as training: listed dims above the width are skipped, the full width always counts
    (once, even if listed).
    """
    width = int(width)
    if width < 1:
        raise ValueError(f"model width must be positive, got {width}")
    out = {width}
    for dim in dims:
        dim = int(dim)
        if dim < 1:
            raise ValueError(f"Matryoshka dims must be positive, got {dim}")
        if dim < width:
            out.add(dim)
    return sorted(out, reverse=True)


def truncate(vectors: np.ndarray, dim: int) -> np.ndarray:
    """The first ``dim`` components of each row, re-normalised to unit length (a Matryoshka slice)."""
    vectors = np.asarray(vectors)
    if dim > vectors.shape[1]:
        raise ValueError(f"cannot truncate {vectors.shape[1]}-d vectors to {dim} dims")
    return l2_normalize(vectors[:, :dim])


# --- encoding -----------------------------------------------------------------------------------
def is_torch_module(model: Any) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, torch.nn.Module)


def _encode_chunked(model: Any, unique: list[str], batch_size: int, stage: str | None) -> np.ndarray:
    """``model.encode`` over chunks of the texts, longest first (as sentence-transformers sorts them), so the
    batches are those of a single call; each chunk is reported to the progress ``stage``."""
    kwargs = dict(batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=False, show_progress_bar=False)
    order = sorted(range(len(unique)), key=lambda i: -len(unique[i]))
    chunk = batch_size * _ENCODE_CHUNK_BATCHES
    if stage:
        progress.add_total(stage, len(unique))
    parts = []
    for start in range(0, len(order), chunk):
        picked = order[start : start + chunk]
        out = model.encode([unique[i] for i in picked], **kwargs)
        if hasattr(out, "detach"):  # a tensor
            out = out.detach().float().cpu().numpy()
        out = np.asarray(out, dtype=np.float32)
        if out.ndim != 2 or out.shape[0] != len(picked):
            raise EvaluationError(f"model returned {out.shape[0] if out.ndim else 0} vectors for {len(picked)} texts")
        parts.append(out)
        if stage:
            progress.advance(stage, len(picked))
    vectors = np.empty((len(unique), parts[0].shape[1]), dtype=np.float32)
    vectors[order] = np.concatenate(parts)
    return vectors


def encode(
    model: Any,
    texts: Sequence[str],
    batch_size: int = 64,
    bf16: bool = False,
    num_threads: int | None = None,
    stage: str | None = None,
) -> np.ndarray:
    """Embed ``texts`` with ``model.encode`` as float32, L2-normalised rows, one per text, in order.

    Every unique text is embedded once (duplicates share the row). A torch model runs under
    ``inference_mode`` and, with ``bf16``, bf16 autocast; rows are normalised again in fp32.
    ``num_threads``: torch intra-op threads while encoding (None: torch's default). On cores that
    other busy processes share, 1 is far faster (OpenMP barriers spin on descheduled threads).
    ``stage``: the progress stage to report the unique texts to (None: no reports).
    """
    texts = list(texts)
    unique = list(dict.fromkeys(texts))
    if not unique:
        return np.zeros((0, 0), dtype=np.float32)
    if is_torch_module(model):
        import torch

        threads = torch.get_num_threads()
        if num_threads:
            torch.set_num_threads(num_threads)
        try:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(bf16)):
                out = _encode_chunked(model, unique, batch_size, stage)
        finally:
            if num_threads:
                torch.set_num_threads(threads)
    else:
        out = _encode_chunked(model, unique, batch_size, stage)
    vectors = l2_normalize(out)
    if len(unique) == len(texts):
        return vectors
    index = {text: i for i, text in enumerate(unique)}
    return vectors[[index[text] for text in texts]]


def encode_unique(
    model: Any,
    texts: Iterable[str],
    batch_size: int,
    bf16: bool,
    num_threads: int | None = None,
    stage: str | None = None,
) -> tuple[dict[str, int], np.ndarray]:
    """The unique texts' row index and their vectors (:func:`encode`), each text embedded once."""
    unique = list(dict.fromkeys(texts))
    return {t: i for i, t in enumerate(unique)}, encode(model, unique, batch_size, bf16, num_threads, stage)
