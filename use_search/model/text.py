"""Text side: the CLIP text tower with prompt templates."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from use_search.model.clip import ClipBundle

# Paper §4.2: the four templates used for expressions in training (and our default at query time).
TRAINING_TEMPLATES: tuple[str, ...] = (
    "a photo of {}",
    "This is a photo of {}",
    "There is {} in the scene",
    "a photo of {} in the scene",
)
# For bare class names (eval / voting, §4.3) users may pass their own set; these are the defaults.
QUERY_TEMPLATES = TRAINING_TEMPLATES


class TextEncoder:
    def __init__(self, clip: ClipBundle, device: str = "cpu", batch: int = 256) -> None:
        self.clip = clip
        self.device = device
        self.batch = batch

    def encode_raw(self, texts: Sequence[str]) -> torch.Tensor:
        """Unnormalised... no: L2-normalised text embeddings of the exact strings, (n, dim) float32."""
        out = []
        for i in range(0, len(texts), self.batch):
            tokens = self.clip.tokenizer(list(texts[i : i + self.batch])).to(self.device)
            out.append(torch.nn.functional.normalize(self.clip.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.clip.dim)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        """Each text through every template, averaged, re-normalised (CLIP's prompt ensembling)."""
        if not texts:
            raise ValueError("no texts to encode")
        if any(not t or not t.strip() for t in texts):
            raise ValueError("texts must be non-empty")
        templates = tuple(templates) if templates else QUERY_TEMPLATES
        prompts = [tpl.format(t.strip()) for t in texts for tpl in templates]
        emb = self.encode_raw(prompts).reshape(len(texts), len(templates), -1).mean(dim=1)
        return torch.nn.functional.normalize(emb, dim=-1).cpu().numpy().astype(np.float32)
