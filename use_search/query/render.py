"""Pictures of results: a hit's mask over its image, and a mask as a PNG."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from use_search.indexer.read import read_image
from use_search.types import Hit

HIGHLIGHT = np.array([255, 64, 32], dtype=np.float32)


def overlay(pixels: np.ndarray, mask: np.ndarray, bbox: tuple[int, int, int, int] | None = None) -> Image.Image:
    """Dim everything outside the mask, tint the mask, outline the box."""
    if pixels.shape[:2] != mask.shape:
        raise ValueError(f"mask {mask.shape} does not fit image {pixels.shape[:2]}")
    out = pixels.astype(np.float32)
    out[~mask] *= 0.35
    out[mask] = out[mask] * 0.6 + HIGHLIGHT * 0.4
    img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if bbox is not None:
        x, y, w, h = bbox
        ImageDraw.Draw(img).rectangle([x, y, x + w - 1, y + h - 1], outline=(255, 220, 0), width=2)
    return img


def hit_overlay(hit: Hit, max_pixels: int = 50_000_000) -> Image.Image:
    loaded = read_image(Path(hit.path), max_pixels)
    if loaded.record.sha256 != hit.sha256:
        raise FileNotFoundError(f"{hit.path} changed since it was indexed; reindex it")
    return overlay(loaded.pixels, hit.mask(), hit.bbox)


def mask_png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(buf, format="PNG")
    return buf.getvalue()
