"""The KaLM-Embedding training loss: InfoNCE with in-batch and hard negatives, under Matryoshka.

:func:`build_loss` returns sentence-transformers' own losses, composed::

    MatryoshkaLoss(model, MultipleNegativesRankingLoss(model, scale=1 / cfg.temperature),
                   matryoshka_dims=..., matryoshka_weights=...)

``MultipleNegativesRankingLoss`` with its defaults is InfoNCE over cosine similarities: for query
``i`` the candidates are every positive of the batch (in-batch negatives) and every hard negative
of every row; temperature 0.01 is ``scale = 100``. ``MatryoshkaLoss`` runs it once per dimension
on the first ``d`` components of the embeddings, re-normalised, and sums the weighted losses.

The dimensions come from :func:`matryoshka_dims_for`: the model's full width always counts (with
the weight of the largest listed dimension, KaLM's 1.0), listed dimensions above the width are
skipped, and the others keep their own weights. For all-MiniLM-L6-v2 (384-d) and KaLM's list
``[896, 512, 256, 128, 64]`` / ``[1.0, 0.3, 0.2, 0.1, 0.1]`` that is ``[384, 256, 128, 64]`` /
``[1.0, 0.2, 0.1, 0.1]``; for an 896-d model (Qwen2-0.5B) exactly the listed ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # at run time only build_loss needs it, as an annotation: bench/gpu_check.py runs without pydantic
    from ground.settings import FinetuneSettings


def matryoshka_dims_for(width: int, dims: Sequence[int], weights: Sequence[float]) -> tuple[list[int], list[float]]:
    """The Matryoshka dimensions and weights for a model of embedding width ``width``.

    * The full width is always trained, first, with the weight of the largest listed dimension
      (whether or not that dimension is the width itself, is larger and skipped, or is smaller).
    * Listed dimensions larger than the width are skipped; the width itself is not repeated.
    * Listed dimensions below the width keep their own weights.

    Returns ``(dims, weights)`` in descending order of dimension.
    """
    width = int(width)
    if width <= 0:
        raise ValueError(f"embedding width must be positive, got {width}")
    dims, weights = list(dims), [float(w) for w in weights]
    if not dims:
        raise ValueError("at least one Matryoshka dimension is needed")
    if len(dims) != len(weights):
        raise ValueError(f"{len(weights)} weights for {len(dims)} Matryoshka dims")
    if any(int(d) != d or d <= 0 for d in dims):
        raise ValueError(f"Matryoshka dims must be positive integers, got {dims}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"Matryoshka dims repeat: {dims}")
    if any(w < 0 for w in weights):
        raise ValueError(f"Matryoshka weights must be non-negative, got {weights}")
    pairs = sorted(zip((int(d) for d in dims), weights, strict=True), key=lambda p: p[0], reverse=True)
    out_dims, out_weights = [width], [pairs[0][1]]
    for dim, weight in pairs:
        if dim < width:
            out_dims.append(dim)
            out_weights.append(weight)
    return out_dims, out_weights


def embedding_width(model: Any) -> int:
    """The sentence-embedding dimension of a SentenceTransformer (any 5.x/6.x spelling)."""
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    width = get()
    if width is None:
        raise ValueError("the model does not report its embedding dimension")
    return int(width)


def build_loss(model: Any, cfg: FinetuneSettings):
    """``MatryoshkaLoss(MultipleNegativesRankingLoss(scale=1/temperature))`` over the model's dims."""
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

    dims, weights = matryoshka_dims_for(embedding_width(model), cfg.matryoshka_dims, cfg.matryoshka_weights)
    inner = MultipleNegativesRankingLoss(model, scale=1.0 / cfg.temperature)
    return MatryoshkaLoss(model, inner, matryoshka_dims=dims, matryoshka_weights=weights)
