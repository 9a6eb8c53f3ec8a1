"""Per-segment class probabilities (paper §4.3) and their combination over an ensemble (A.2).

Numpy only: ``config`` checks the ensemble weights with ``ovseg_exponents`` from here.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

CLIP_LOGIT_SCALE = 100.0  # CLIP's learned logit scale (saturated at 100): crop-CLIP's softmax scale
COMBINE_MODES = ("ovseg", "mean", "geometric")


def class_probabilities(
    segment_vectors: np.ndarray, class_vectors: np.ndarray, logit_scale: float = CLIP_LOGIT_SCALE
) -> np.ndarray:
    """(N, D) segment embeddings × (C, D) class text embeddings → (N, C) softmax over classes of
    cosine × ``logit_scale``. Rows are normalised here, so unnormalised inputs are fine."""
    s = np.asarray(segment_vectors, dtype=np.float64)
    t = np.asarray(class_vectors, dtype=np.float64)
    if s.ndim != 2 or t.ndim != 2 or s.shape[1] != t.shape[1]:
        raise ValueError(f"embedding shapes do not match: segments {s.shape}, classes {t.shape}")
    s = s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12)
    t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    logits = logit_scale * (s @ t.T)
    logits -= logits.max(axis=1, keepdims=True) if len(logits) else 0.0
    e = np.exp(logits)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def ovseg_exponents(weights: Sequence[float]) -> list[float]:
    """The exponents of OVSeg's ensemble ``p₀^(1-λ) · p₁^λ`` for A.2's weights (``PATH:WEIGHT``).

    The first model is the base (A.2: the curated-data model, weight 1); each other model's weight
    relative to it is its exponent λᵢ, and the base gets 1 - Σ λᵢ. So weights 1 and 0.25 give
    p₀^0.75 · p₁^0.25. The λᵢ must sum below 1 (the base keeps a positive exponent).
    """
    if len(weights) < 2:
        return [1.0] * len(weights)
    lams = [w / weights[0] for w in weights[1:]]
    if sum(lams) >= 1:
        raise ValueError(
            f"combine 'ovseg': the other models' weights relative to the first ({', '.join(f'{w:g}' for w in weights)}) "
            f"are exponents that must sum below 1 (A.2: the curated-data model first at 1, e.g. PATH:1 PATH:0.25); "
            "list the base model first or use combine 'mean'"
        )
    return [1.0 - sum(lams), *lams]


def combine_probabilities(probs: Sequence[np.ndarray], weights: Sequence[float], mode: str = "ovseg") -> np.ndarray:
    """Per-segment class probabilities of several models, (N, C) each → one (N, C).

    ``ovseg`` (A.2, "same as OVSeg"): OVSeg's weighted geometric mean Πᵢ pᵢ^eᵢ with the exponents of
    ``ovseg_exponents`` (two models: p₀^(1-λ) · p₁^λ), not renormalised: a segment on which the models
    disagree keeps less mass in the per-pixel sum.
    ``mean``: Σᵢ wᵢ·pᵢ / Σᵢ wᵢ. ``geometric``: Πᵢ pᵢ^(wᵢ/Σ w), each row renormalised to sum to 1
    (other exponents than ``ovseg`` for the same weights, and every segment votes with mass 1).
    All reduce to the model itself for one model.
    """
    if len(probs) != len(weights) or not probs:
        raise ValueError(f"{len(probs)} probability arrays but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or (w <= 0).any():
        raise ValueError(f"ensemble weights must be positive numbers, got {list(weights)}")
    p = np.stack([np.asarray(x, dtype=np.float64) for x in probs])  # (M, N, C); raises on unequal shapes
    if mode == "ovseg":
        out = np.prod(p ** np.asarray(ovseg_exponents(list(w)))[:, None, None], axis=0)
    elif mode == "mean":
        out = np.tensordot(w / w.sum(), p, axes=1)
    elif mode == "geometric":
        out = np.exp(np.tensordot(w / w.sum(), np.log(np.maximum(p, 1e-300)), axes=1))
        out /= np.maximum(out.sum(axis=-1, keepdims=True), 1e-300)
    else:
        raise ValueError(f"unknown ensemble combination {mode!r}; choose one of {', '.join(COMBINE_MODES)}")
    return out.astype(np.float32)

