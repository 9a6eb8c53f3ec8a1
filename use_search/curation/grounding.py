"""Referring-expression grounding with Grounding DINO, queried with the whole caption (paper §3.1).

Grounding DINO scores every (box, caption token) pair. A box's confidence is its best token
probability; boxes above the box threshold (0.05, §4.1) are kept. "For each predicted box, we first
identify the token with the highest probability score and associate the box with the noun phrase that
contains the identified token" (§3.1): token → characters through the tokenizer's offsets, characters
→ the noun chunk whose span holds them. A box whose best token lies in no noun chunk ("is", ".") is
dropped. NMS at IoU 0.7 (§4.1) then runs per phrase: two boxes of different phrases on the same object
are both kept, so the mask NMS can merge their texts later.

Grounding DINO reads at most ``max_text_len`` (256) tokens; a longer caption is grounded in windows of
whole sentences, each a caption of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.ops import batched_nms

from use_search.curation.hf import load_pretrained

Span = tuple[int, int]  # [start, end) characters

DEFAULT_GROUNDING_MODEL = "IDEA-Research/grounding-dino-tiny"  # Swin-T, as in §4.1


@dataclass(frozen=True)
class GroundedBox:
    box: tuple[float, float, float, float]  # XYXY pixels in the image
    score: float  # the box's best token probability
    phrase_index: int  # into the phrase spans given to ``ground``
    token_index: int  # the best token, in the tokenized caption (window)


def best_token_phrases(
    probs: torch.Tensor, offsets: Sequence[Span], phrase_spans: Sequence[Span]
) -> tuple[torch.Tensor, torch.Tensor, list[int | None]]:
    """Per box (row of ``probs``, boxes × tokens): (score, best token, phrase index or None).

    Only real tokens count: special tokens ([CLS], [SEP], padding) have empty offsets. A token belongs
    to the phrase whose span contains its first character.
    """
    real = torch.tensor([end > start for start, end in offsets] + [False] * (probs.shape[1] - len(offsets)))
    masked = probs.masked_fill(~real.to(probs.device), -1.0)
    scores, tokens = masked.max(dim=1)
    phrases: list[int | None] = []
    for t in tokens.tolist():
        start = offsets[t][0]
        phrases.append(next((k for k, (ps, pe) in enumerate(phrase_spans) if ps <= start < pe), None))
    return scores, tokens, phrases


def select_grounded_boxes(
    probs: torch.Tensor,
    boxes_xyxy: torch.Tensor,
    offsets: Sequence[Span],
    phrase_spans: Sequence[Span],
    *,
    box_threshold: float = 0.05,
    nms_threshold: float = 0.7,
) -> list[GroundedBox]:
    """Threshold, match each box to a phrase by its best token, per-phrase NMS; best score first."""
    scores, tokens, phrases = best_token_phrases(probs, offsets, phrase_spans)
    keep = [i for i, p in enumerate(phrases) if p is not None and scores[i] > box_threshold]
    if not keep:
        return []
    idx = torch.tensor(keep)
    phrase_ids = torch.tensor([phrases[i] for i in keep])
    kept = batched_nms(boxes_xyxy[idx].float(), scores[idx].float(), phrase_ids, nms_threshold)
    out = []
    for j in kept.tolist():
        i = keep[j]
        x0, y0, x1, y1 = (float(v) for v in boxes_xyxy[i])
        out.append(GroundedBox((x0, y0, x1, y1), float(scores[i]), int(phrases[i]), int(tokens[i])))  # type: ignore[arg-type]
    return out


class GroundingDinoGrounder:
    """``ground(image, caption, phrase_spans)`` → boxes, each tied to one of the phrases."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        box_threshold: float = 0.05,
        nms_threshold: float = 0.7,
        device: str = "cpu",
        model_id: str = "",
    ) -> None:
        self.model = model.to(device).eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.box_threshold = box_threshold
        self.nms_threshold = nms_threshold
        self.device = device
        self.model_id = model_id
        self.max_text_len = int(model.config.max_text_len)

    @torch.inference_mode()
    def ground(
        self,
        image: np.ndarray,
        caption: str,
        phrase_spans: Sequence[Span],
        sentence_spans: Sequence[Span] | None = None,
    ) -> list[GroundedBox]:
        if not phrase_spans:
            return []
        h, w = image.shape[:2]
        pixels = self.processor.image_processor(images=Image.fromarray(image), return_tensors="pt")
        pixels = {k: v.to(self.device) for k, v in pixels.items()}
        out: list[GroundedBox] = []
        for ws, we in self.windows(caption, sentence_spans or [(0, len(caption))]):
            local = [(k, (s - ws, e - ws)) for k, (s, e) in enumerate(phrase_spans) if ws <= s and e <= we]
            if not local:
                continue
            for g in self._ground_text(pixels, caption[ws:we], [span for _, span in local], (h, w)):
                out.append(GroundedBox(g.box, g.score, local[g.phrase_index][0], g.token_index))
        return out

    def _ground_text(self, pixels: dict[str, torch.Tensor], text: str, spans: list[Span], hw: tuple[int, int]) -> list[GroundedBox]:
        enc = self.tokenizer(
            text, return_tensors="pt", return_offsets_mapping=True, truncation=True, max_length=self.max_text_len
        )
        offsets = [tuple(o) for o in enc.pop("offset_mapping")[0].tolist()]
        enc = {k: v.to(self.device) for k, v in enc.items()}
        outputs = self.model(**pixels, **enc)
        probs = outputs.logits[0, :, : len(offsets)].float().sigmoid().cpu()
        boxes = cxcywh_to_xyxy(outputs.pred_boxes[0].float().cpu(), hw)
        return select_grounded_boxes(
            probs, boxes, offsets, spans, box_threshold=self.box_threshold, nms_threshold=self.nms_threshold
        )

    def windows(self, caption: str, sentence_spans: Sequence[Span]) -> list[Span]:
        """The whole caption when it fits in the text encoder, else greedy runs of whole sentences."""
        budget = self.max_text_len - 2  # [CLS] and [SEP]
        if self._n_tokens(caption) <= budget:
            return [(0, len(caption))]
        windows: list[Span] = []
        start, end, used = None, None, 0
        for s, e in sentence_spans:
            n = self._n_tokens(caption[s:e])
            if start is not None and used + n > budget:
                windows.append((start, end))  # type: ignore[arg-type]
                start, used = None, 0
            if start is None:
                start = s
            end, used = e, used + n
        if start is not None:
            windows.append((start, end))  # type: ignore[arg-type]
        return windows

    def _n_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def cxcywh_to_xyxy(boxes: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Grounding DINO's normalized (cx, cy, w, h) → XYXY pixels."""
    h, w = hw
    cx, cy, bw, bh = boxes.unbind(-1)
    return torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], dim=-1)


def load_grounder(
    name_or_path: str = DEFAULT_GROUNDING_MODEL,
    *,
    device: str = "cpu",
    offline: bool = False,
    box_threshold: float = 0.05,
    nms_threshold: float = 0.7,
) -> GroundingDinoGrounder:
    """A Hugging Face model id or local folder. (The pipeline builds ``tiny`` itself, from ``curation.tiny``.)"""
    from transformers import AutoModelForZeroShotObjectDetection

    model, processor = load_pretrained(
        name_or_path, AutoModelForZeroShotObjectDetection, offline=offline, what="Grounding DINO"
    )
    return GroundingDinoGrounder(
        model, processor, box_threshold=box_threshold, nms_threshold=nms_threshold, device=device,
        model_id=name_or_path,
    )
