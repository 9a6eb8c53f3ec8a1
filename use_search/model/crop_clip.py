"""Training-free baseline: each segment's masked crop through the CLIP image tower.

Like OVSeg's mask-adapted crops: the segment's bbox is cut out, pixels outside the mask are set to
CLIP's mean colour (zero after normalisation), the crop is padded to a square and resized to the
tower's input size. One CLIP forward per segment is what USE avoids (§1: the encoder runs once).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from use_search.model.base import Embedder
from use_search.model.clip import ClipBundle
from use_search.model.registry import model_id
from use_search.model.text import TextEncoder
from use_search.types import Segment


class CropClipEmbedder(Embedder):
    def __init__(self, clip: ClipBundle, device: str = "cpu", batch: int = 64, untrained: bool = False) -> None:
        self.clip = clip
        self.device = device
        self.batch = batch
        self.text = TextEncoder(clip, device)
        self.dim = clip.dim
        self.untrained = untrained
        self.model_id = model_id(clip.model_id)
        self._mean = torch.tensor(clip.mean, device=device).view(3, 1, 1)
        self._std = torch.tensor(clip.std, device=device).view(3, 1, 1)

    def crops(self, image: np.ndarray, segments: Sequence[Segment]) -> torch.Tensor:
        """(n, 3, S, S) normalised CLIP inputs."""
        size = self.clip.image_size
        img = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1).float() / 255.0
        out = torch.empty(len(segments), 3, size, size, device=self.device)
        for i, seg in enumerate(segments):
            if seg.area <= 0:
                raise ValueError(f"segment {i} has an empty mask")
            x, y, w, h = seg.bbox
            crop = img[:, y : y + h, x : x + w]
            m = torch.from_numpy(seg.mask[y : y + h, x : x + w]).to(self.device)
            crop = torch.where(m, crop, self._mean)
            side = max(w, h)
            pad_l, pad_t = (side - w) // 2, (side - h) // 2
            square = self._mean.expand(3, side, side).clone()
            square[:, pad_t : pad_t + h, pad_l : pad_l + w] = crop
            resized = F.interpolate(square[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True)
            out[i] = (resized[0].clamp(0, 1) - self._mean) / self._std
        return out

    @torch.inference_mode()
    def embed_segments(self, image: np.ndarray, segments: Sequence[Segment]) -> np.ndarray:
        if not segments:
            return np.zeros((0, self.dim), np.float32)
        rows = []
        for i in range(0, len(segments), self.batch):
            x = self.crops(image, segments[i : i + self.batch])
            rows.append(F.normalize(self.clip.model.encode_image(x).float(), dim=-1))
        return torch.cat(rows).cpu().numpy().astype(np.float32)

    @torch.inference_mode()
    def embed_batch(self, images: Sequence[np.ndarray], segments: Sequence[Sequence[Segment]]) -> list[np.ndarray]:
        """The crops of all images in tower batches of ``batch``, filled across image borders: an
        image with few segments no longer costs a forward of its own. Rows as ``embed_segments``."""
        if len(images) != len(segments):
            raise ValueError(f"{len(images)} images but {len(segments)} segment lists")
        for i, segs in enumerate(segments):
            for j, seg in enumerate(segs):
                if seg.area <= 0:
                    raise ValueError(f"image {i}: segment {j} has an empty mask" if len(images) > 1 else f"segment {j} has an empty mask")
        pairs = [(i, j) for i, segs in enumerate(segments) for j in range(len(segs))]
        rows = []
        for start in range(0, len(pairs), self.batch):
            part = pairs[start : start + self.batch]
            crops = torch.cat([
                self.crops(images[i], [segments[i][j] for _, j in group])
                for i, group in itertools.groupby(part, key=lambda pair: pair[0])
            ])
            rows.append(F.normalize(self.clip.model.encode_image(crops).float(), dim=-1).cpu())
        flat = torch.cat(rows).numpy().astype(np.float32) if rows else np.zeros((0, self.dim), np.float32)
        bounds = np.cumsum([0] + [len(s) for s in segments])
        return [flat[bounds[i] : bounds[i + 1]] for i in range(len(segments))]

    def embed_texts(self, texts: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        return self.text.encode(texts, templates)
