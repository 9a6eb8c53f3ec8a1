"""Captions for an image (paper §3.1, "Multi-Granularity Image Captioning").

Two kinds of ``Captioner``: existing captions (a COCO captions JSON, or sidecar ``.txt`` files next to
the images) and an MLLM prompted to describe every visible part of every object, sampled with the
paper's settings (§4.1: temperature 0.8, top-p 0.4, top-k 5).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from use_search.curation.hf import load_pretrained

PART_AWARE_PROMPT = (
    "Describe this image in detail. In your description, specifically mention ALL VISIBLE parts of each "
    "object in the image."
)


@dataclass(frozen=True)
class Caption:
    text: str
    source: str  # "caption:txt", "caption:coco", "caption:mllm"


class Captioner(Protocol):
    def captions(self, path: Path, image: np.ndarray) -> list[Caption]: ...


# Tux Paint stamp descriptions put translations on lines like "fr.utf8=Une girafe.".
_LOCALE_LINE = re.compile(r"^[A-Za-z]{2,3}(_[A-Za-z]{2})?(\.[A-Za-z0-9-]+)?(@\w+)?=")


class SidecarCaptions:
    """``photo.jpg`` → the non-empty lines of ``photo.txt`` beside it, one caption per line."""

    source = "caption:txt"

    def captions(self, path: Path, image: np.ndarray) -> list[Caption]:
        txt = Path(path).with_suffix(".txt")
        if not txt.is_file():
            return []
        lines = [line.strip() for line in txt.read_text(encoding="utf-8", errors="replace").splitlines()]
        return [Caption(line, self.source) for line in lines if line and not _LOCALE_LINE.match(line)]


class CocoCaptions:
    """Captions from a COCO captions file (``captions_train2017.json``), matched by file name."""

    source = "caption:coco"

    def __init__(self, annotation_file: Path) -> None:
        data = json.loads(Path(annotation_file).read_text(encoding="utf-8"))
        names = {img["id"]: Path(img["file_name"]).name for img in data["images"]}
        self.by_name: dict[str, list[str]] = {}
        for ann in data["annotations"]:
            name = names.get(ann["image_id"])
            if name is not None:
                self.by_name.setdefault(name, []).append(ann["caption"].strip())

    def captions(self, path: Path, image: np.ndarray) -> list[Caption]:
        return [Caption(text, self.source) for text in self.by_name.get(Path(path).name, []) if text]


@dataclass(frozen=True)
class GenerationParams:
    prompt: str = PART_AWARE_PROMPT
    temperature: float = 0.8
    top_p: float = 0.4
    top_k: int = 5
    max_new_tokens: int = 512


class MLLMCaptioner:
    """An image-text-to-text model from transformers (LLaVA, Qwen2-VL, ... with a chat template).

    The prompt goes in as one user turn holding the image and the text; the caption is the sampled
    continuation, special tokens stripped.
    """

    source = "caption:mllm"

    def __init__(self, model: Any, processor: Any, params: GenerationParams | None = None, *, device: str = "cpu", model_id: str = "") -> None:
        self.model = model.to(device).eval()
        self.processor = processor
        self.params = params or GenerationParams()
        self.device = device
        self.model_id = model_id

    def prompt_text(self) -> str:
        """The model's chat template applied to one user turn: the image, then the prompt."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.params.prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def inputs(self, image: np.ndarray) -> dict[str, torch.Tensor]:
        enc = self.processor(images=Image.fromarray(image), text=self.prompt_text(), return_tensors="pt")
        dtype = self.model.dtype  # pixels in the model's precision (bf16/fp16 checkpoints)
        return {k: v.to(self.device, dtype=dtype) if v.is_floating_point() else v.to(self.device) for k, v in enc.items()}

    @torch.inference_mode()
    def captions(self, path: Path, image: np.ndarray) -> list[Caption]:
        enc = self.inputs(image)
        p = self.params
        out = self.model.generate(
            **enc, do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
            max_new_tokens=p.max_new_tokens,
        )
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        text = self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()
        return [Caption(text, self.source)] if text else []


def load_mllm_captioner(
    name_or_path: str,
    *,
    device: str = "cpu",
    offline: bool = False,
    params: GenerationParams | None = None,
    dtype: str = "auto",
) -> MLLMCaptioner:
    """A Hugging Face model id or local folder, or ``tiny`` (random-init, tests and smoke runs only)."""
    if name_or_path == "tiny":
        from use_search.curation.tiny import build_tiny_mllm

        model, processor = build_tiny_mllm()
        return MLLMCaptioner(model, processor, params, device=device, model_id="mllm-tiny-untrained")
    from transformers import AutoModelForImageTextToText

    model, processor = load_pretrained(
        name_or_path, AutoModelForImageTextToText, offline=offline, what="MLLM captioner",
        dtype=dtype,
    )
    return MLLMCaptioner(model, processor, params, device=device, model_id=name_or_path)
