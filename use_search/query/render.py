"""Pictures of results, drawn one way for the CLI (``query --save``) and the API (overlay PNGs): a hit's
mask over its image, every segment of an image, and a mask as a PNG."""

from __future__ import annotations

import colorsys
import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from use_search.imaging import resize_mask
from use_search.indexer.read import read_image
from use_search.types import Hit

HIGHLIGHT = np.array([255, 64, 32], dtype=np.float32)


def overlay(pixels: np.ndarray, mask: np.ndarray, bbox: tuple[float, float, float, float] | None = None) -> Image.Image:
    """Dim everything outside the mask, tint the mask, outline the box."""
    if pixels.shape[:2] != mask.shape:
        raise ValueError(f"mask {mask.shape} does not fit image {pixels.shape[:2]}")
    out = pixels.astype(np.float32)
    out[~mask] *= 0.35
    out[mask] = out[mask] * 0.6 + HIGHLIGHT * 0.4
    img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if bbox is not None:
        x, y, w, h = bbox
        ImageDraw.Draw(img).rectangle([x, y, max(x, x + w - 1), max(y, y + h - 1)], outline=(255, 220, 0), width=2)
    return img


def fitted(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """``mask`` at ``height`` × ``width`` (nearest neighbour), as it is when it fits already."""
    return mask if mask.shape == (height, width) else resize_mask(mask, height, width)


def draw_hit(pixels: np.ndarray, hit: Hit) -> Image.Image:
    """``hit`` over ``pixels``: its image at any size (the mask and the box are scaled to it)."""
    h, w = pixels.shape[:2]
    sx, sy = w / hit.width, h / hit.height
    x, y, bw, bh = hit.bbox
    return overlay(pixels, fitted(hit.mask(), h, w), (x * sx, y * sy, bw * sx, bh * sy))


def _colour(i: int) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 1.0)
    return np.array([r, g, b], np.float32) * 255


def draw_segments(pixels: np.ndarray, hits: Sequence[Hit]) -> Image.Image:
    """Every segment of an image tinted in its own colour, large ones first so small ones stay visible."""
    h, w = pixels.shape[:2]
    masks = [fitted(s.mask(), h, w) for s in hits]
    out = pixels.astype(np.float32)
    for i in sorted(range(len(masks)), key=lambda j: -int(masks[j].sum())):
        m = masks[i]
        out[m] = out[m] * 0.5 + _colour(i) * 0.5
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def hit_overlay(hit: Hit, max_pixels: int = 50_000_000) -> Image.Image:
    """``hit`` over its image file at full size (``query --save``)."""
    loaded = read_image(Path(hit.path), max_pixels)
    if loaded.record.sha256 != hit.sha256:
        raise FileNotFoundError(f"{hit.path} changed since it was indexed; reindex it")
    return draw_hit(loaded.pixels, hit)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def mask_png(mask: np.ndarray) -> bytes:
    return png_bytes(Image.fromarray(mask.astype(np.uint8) * 255, "L"))
