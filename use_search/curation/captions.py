"""Captions for an image (paper §3.1, "Multi-Granularity Image Captioning").

Two kinds of ``Captioner``: existing captions (a COCO captions JSON, or sidecar ``.txt`` files next to
the images) and an MLLM prompted to describe every visible part of every object, sampled with the
paper's settings (§4.1: temperature 0.8, top-p 0.4, top-k 5).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image

from use_search.curation.hf import RemoteCodeError, load_pretrained

PART_AWARE_PROMPT = (
    "Describe this image in detail. In your description, specifically mention ALL VISIBLE parts of each "
    "object in the image."
)


@dataclass(frozen=True)
class Caption:
    text: str
    source: str  # "caption:txt", "caption:coco", "caption:mllm"


class Captioner(Protocol):
    """``captions(path, image)``; a captioner that runs a model may also caption several images at once
    with ``captions_batch(paths, images)``."""

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
    # Plain processors (no chat template): the text given with the image. BLIP-2 / InstructBLIP take the
    # prompt as is; a LLaVA-1.5 processor without a template needs "USER: <image>\n{prompt} ASSISTANT:".
    prompt_template: str = "{prompt}"

    def __post_init__(self) -> None:
        if "{prompt}" not in self.prompt_template:
            raise ValueError(f"the MLLM prompt template must contain {{prompt}}, got {self.prompt_template!r}")


PromptStyle = Literal["chat", "plain", "conversation"]


def prompt_style(model: Any, processor: Any) -> PromptStyle:
    """How the model wants its prompt.

    ``conversation``: the model builds its own inputs (CogVLM / CogVLM2 remote code:
    ``model.build_conversation_input_ids(tokenizer, query=..., images=[...])``, the processor a tokenizer);
    ``chat``: the processor has a chat template (LLaVA, Qwen2-VL, Idefics, ... in transformers);
    ``plain``: the processor takes the image and the prompt text as they are (BLIP-2, Kosmos-2, ...).
    """
    if callable(getattr(model, "build_conversation_input_ids", None)):
        return "conversation"
    if getattr(processor, "image_processor", None) is None:
        raise ValueError(
            f"the MLLM's processor ({type(processor).__name__}) takes no images and the model "
            f"({type(model).__name__}) builds no image inputs of its own: give its image processor "
            "(--mllm-processor) or a model that has one"
        )
    return "chat" if getattr(processor, "chat_template", None) else "plain"


class MLLMCaptioner:
    """An MLLM prompted with the paper's part-aware prompt, sampled with its settings (§3.1, §4.1).

    The prompt goes in as one user turn holding the image and the text (chat templates), as text beside
    the image (plain processors), or through the model's own conversation builder (CogVLM). Batches are
    left-padded so every row's continuation starts at the same column; the caption is that
    continuation only, special tokens stripped.
    """

    source = "caption:mllm"

    def __init__(
        self, model: Any, processor: Any, params: GenerationParams | None = None, *, device: str = "cpu",
        model_id: str = "", style: PromptStyle | None = None, batch_size: int = 8,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"MLLM batch size must be at least 1, got {batch_size}")
        self.model = model.to(device).eval()
        self.processor = processor
        self.params = params or GenerationParams()
        self.device = device
        self.model_id = model_id
        self.style: PromptStyle = style or prompt_style(model, processor)
        self.batch_size = batch_size
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if getattr(self.tokenizer, "pad_token_id", None) is None:
            # Llama / Vicuna tokenizers have no pad token; batches pad with EOS, masked out.
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def prompt_text(self) -> str:
        """The text beside the image: the chat template applied to one user turn, or the plain template."""
        p = self.params
        if self.style == "chat":
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p.prompt}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return p.prompt_template.replace("{prompt}", p.prompt)

    def generation_kwargs(self) -> dict[str, Any]:
        """The paper's sampling (§4.1: temperature 0.8, top-p 0.4, top-k 5), over the checkpoint's defaults."""
        p = self.params
        return {
            "do_sample": True, "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
            "max_new_tokens": p.max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id,
        }

    def inputs(self, images: Sequence[np.ndarray]) -> dict[str, Any]:
        """Model inputs for a batch of images (chat and plain styles), left-padded, on the model's device."""
        if self.style == "conversation":
            raise ValueError("conversation-style models build their inputs one image at a time: see conversation_inputs")
        text = self.prompt_text()
        enc = self.processor(
            images=[Image.fromarray(im) for im in images], text=[text] * len(images), return_tensors="pt",
            padding=True, padding_side="left",
        )
        return self._to_device(dict(enc))

    def conversation_inputs(self, image: np.ndarray) -> dict[str, Any]:
        """CogVLM's inputs for one image, as its model card feeds them to ``generate``."""
        built = self.model.build_conversation_input_ids(
            self.tokenizer, query=self.params.prompt, history=[], images=[Image.fromarray(image)]
        )
        enc: dict[str, Any] = {k: v.unsqueeze(0) for k, v in built.items() if k != "images"}
        enc["images"] = [[built["images"][0]]]
        return self._to_device(enc)

    def _to_device(self, enc: dict[str, Any]) -> dict[str, Any]:
        dtype = self.model.dtype  # pixels in the model's precision (bf16/fp16 checkpoints)

        def move(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return v.to(self.device, dtype=dtype) if v.is_floating_point() else v.to(self.device)
            if isinstance(v, list):
                return [move(x) for x in v]
            return v

        return {k: move(v) for k, v in enc.items()}

    @torch.inference_mode()
    def generate(self, enc: dict[str, Any]) -> list[str]:
        """Sample, then decode the new tokens of every row."""
        try:
            out = self.model.generate(**enc, **self.generation_kwargs())
        except (AttributeError, TypeError) as e:
            if not type(self.model).__module__.startswith("transformers_modules"):
                raise
            import transformers

            # CogVLM's Hub code, for one, calls generation internals that newer transformers removed.
            raise RemoteCodeError(
                f"the MLLM's own code ({type(self.model).__module__}) failed inside generate() under transformers "
                f"{transformers.__version__}: {type(e).__name__}: {e}. Its code was written for another transformers "
                "version: run curation in an environment with the version its model card names, or use an MLLM "
                "that transformers ships (LLaVA, Qwen2-VL, Idefics, ...)."
            ) from e
        prompt = enc["input_ids"]
        # Decoder-only models return prompt + continuation; encoder-decoders (BLIP-2 with T5) the continuation.
        n = prompt.shape[1]
        if out.shape[1] >= n and torch.equal(out[:, :n].to(prompt.device), prompt):
            out = out[:, n:]
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def caption_images(self, images: Sequence[np.ndarray]) -> list[str]:
        """One caption per image, ``batch_size`` images per ``generate`` (CogVLM: one at a time)."""
        texts: list[str] = []
        if self.style == "conversation":
            for im in images:
                texts += self.generate(self.conversation_inputs(im))
            return texts
        for start in range(0, len(images), self.batch_size):
            texts += self.generate(self.inputs(images[start : start + self.batch_size]))
        return texts

    def captions_batch(self, paths: Sequence[Path], images: Sequence[np.ndarray]) -> list[list[Caption]]:
        return [[Caption(t, self.source)] if t else [] for t in self.caption_images(images)]

    def captions(self, path: Path, image: np.ndarray) -> list[Caption]:
        return self.captions_batch([path], [image])[0]


def load_mllm_captioner(
    name_or_path: str,
    *,
    device: str = "cpu",
    offline: bool = False,
    params: GenerationParams | None = None,
    dtype: str = "auto",
    processor: str | None = None,
    trust_remote_code: bool = False,
    batch_size: int = 8,
) -> MLLMCaptioner:
    """A Hugging Face model id or local folder. (The pipeline builds ``tiny`` itself, from ``curation.tiny``.)

    ``processor``: another id or folder for the processor or tokenizer, for checkpoints that ship none
    (CogVLM: ``lmsys/vicuna-7b-v1.5``). ``trust_remote_code``: allow checkpoints that ship their own
    Python code (CogVLM); that code runs with this process's rights, so only for sources you trust.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    model, proc = load_pretrained(
        name_or_path, (AutoModelForImageTextToText, AutoModelForCausalLM), offline=offline, what="MLLM captioner",
        processor=processor, trust_remote_code=trust_remote_code, dtype=dtype,
    )
    return MLLMCaptioner(model, proc, params, device=device, model_id=name_or_path, batch_size=batch_size)
