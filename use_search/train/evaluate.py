"""Held-out text → segment retrieval: recall@k, with the chance level to compare against."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from use_search.model.base import Embedder
from use_search.train.data import PairImage, decode_segmentation
from use_search.types import Segment


def chance_recall(n_total: int, n_pos: int, k: int) -> float:
    """P(at least one of n_pos positives among k of n_total ranked at random)."""
    p_none = 1.0
    for i in range(min(k, n_total)):
        p_none *= max(n_total - n_pos - i, 0) / (n_total - i)
    return 1.0 - p_none


def recall_at_k(seg: np.ndarray, seg_texts: Sequence[Sequence[str]], queries: Sequence[str], txt: np.ndarray,
                ks: Sequence[int]) -> dict[str, float]:
    """Every query text ranks all segments by cosine similarity; a hit at k when one of the top k
    segments carries that text. Returns ``recall@k`` and ``chance@k`` averaged over the queries."""
    scores = txt @ seg.T  # (queries, segments)
    order = np.argsort(-scores, axis=1, kind="stable")
    pos = np.array([[q in texts for texts in seg_texts] for q in queries])  # (queries, segments)
    out: dict[str, float] = {}
    for k in ks:
        top = np.take_along_axis(pos, order[:, :k], axis=1)
        out[f"recall@{k}"] = float(top.any(axis=1).mean())
        out[f"chance@{k}"] = float(np.mean([chance_recall(len(seg_texts), int(p.sum()), k) for p in pos]))
    out["queries"] = len(queries)
    out["segments"] = len(seg_texts)
    return out


def evaluate_retrieval(embedder: Embedder, images: Sequence[PairImage], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Embed every segment of ``images`` (the inference path: full image, no augmentation) and every
    distinct text; score text → segment recall@k."""
    embs, texts = [], []
    for rec in images:
        with Image.open(rec.path) as im:
            pixels = np.asarray(im.convert("RGB"))
        segs = []
        for s in rec.segments:
            mask = decode_segmentation(s.segmentation, rec.height, rec.width)
            if mask.any():
                segs.append(Segment(mask=mask, bbox=(0, 0, 0, 0), area=int(mask.sum()), rle={}, source="annotation"))
                texts.append(s.texts)
        if segs:
            embs.append(embedder.embed_segments(pixels, segs))
    queries = sorted({t for ts in texts for t in ts})
    if not queries:
        raise ValueError("held-out set has no segments with texts")
    return recall_at_k(np.concatenate(embs), texts, queries, embedder.embed_texts(queries), ks)
