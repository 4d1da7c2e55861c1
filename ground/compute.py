"""Compute facts shared by every phase: the one bf16 capability probe and L2 normalisation of vectors."""

from __future__ import annotations

import numpy as np


def bf16_supported() -> bool:
    """True when torch on this CPU runs bf16 GEMMs natively (AVX512-BF16 or AMX); else autocast would emulate it."""
    import torch  # imported here: the ground layer stays cheap to import

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except Exception:  # pragma: no cover - private probes may change between torch versions
            continue
    return False


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32 (zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-d array of vectors, got shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray(vectors / norms, dtype=np.float32)
