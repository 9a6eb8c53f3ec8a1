"""Text side: the CLIP text tower with prompt templates."""

from __future__ import annotations

from pathlib import Path
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
# Free-text queries use the training templates (the expressions they were trained on).
QUERY_TEMPLATES = TRAINING_TEMPLATES


# Named template sets for bare class names (voting, §4.3), selectable by name or as a file. The paper
# evaluates with "the prompt template used in [10]" (CLIP-S4), which publishes no code and whose set
# we could not identify, so it is not shipped; "imagenet80" is CLIP's 80 ImageNet templates (from
# open_clip, which carries OpenAI's list).
def _imagenet80() -> tuple[str, ...]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


TEMPLATE_SETS = {"train4": lambda: TRAINING_TEMPLATES, "imagenet80": _imagenet80}


def read_template_file(path: Path) -> tuple[str, ...]:
    """Prompt templates, one per line, each with one ``{}`` for the class name; ``#`` lines are comments."""
    lines = [s.strip() for s in Path(path).read_text(encoding="utf-8").splitlines()]
    templates = tuple(s for s in lines if s and not s.startswith("#"))
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"{path}: every template needs exactly one {{}} for the class name; bad: {list(bad[:3])}")
    return templates


def template_set(name_or_file: str | Path) -> tuple[str, ...]:
    """A named set (``train4``, ``imagenet80``) or a template file."""
    key = str(name_or_file)
    if key in TEMPLATE_SETS:
        return TEMPLATE_SETS[key]()
    path = Path(key).expanduser()
    if not path.is_file():
        raise ValueError(f"templates: {key!r} is neither a named set ({', '.join(TEMPLATE_SETS)}) nor a file")
    return read_template_file(path)


class TextEncoder:
    def __init__(self, clip: ClipBundle, device: str = "cpu", batch: int = 256) -> None:
        self.clip = clip
        self.device = device
        self.batch = batch

    def encode_raw(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised embeddings of the exact strings (no templates), an (n, dim) float32 tensor."""
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
