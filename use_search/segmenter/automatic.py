"""Automatic segments from a grid of point prompts (SAM's "segment everything").

``AutoSegmenter`` runs segment-anything's own ``SamAutomaticMaskGenerator`` loop; ``batched.py`` is the
same algorithm rebuilt for throughput. Both give the same ``Segment``s, and both depart from
segment-anything in the same few places, on purpose:

- **Empty masks are dropped** (segment-anything returns them with ``area`` 0 and box ``[0, 0, 0, 0]``,
  and with ``min_mask_region_area`` larger than the image its hole filling turns them into whole-image
  masks). An empty segment has nothing to embed or show.
- **``bbox`` is COCO's tight XYWH**, ``w = x1 - x0 + 1`` over the mask's first and last pixel, as
  pycocotools' ``toBbox`` gives for the stored RLE. segment-anything's records say ``w = x1 - x0``
  (one less in width and height).
- **Boxes of zero width or height** (one-pixel-wide masks; every mask of a 1-pixel-high image) are
  suppressed among themselves in box NMS by their pixel extent (``amg.box_nms``); segment-anything's
  IoU is NaN for them and keeps them all: a 1×1 image gave every grid mask.
- **Images thinner than one encoder pixel** (4000×1) are resized to one pixel on the short side
  (``amg.ResizeToEncoder``), and crops with no pixels (crop layers cut a 1-pixel-high image into
  0-pixel-high crops) are skipped, where segment-anything fails; so are crops equal to an earlier one.
- ``min_mask_region_area`` post-processing is segment-anything's (holes, islands, second box NMS)
  with scipy instead of OpenCV (``amg.postprocess_small_regions``).

Everything else — prompts, filters, NMS, crops, mask pixels — is segment-anything's; segments come
largest first.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam
from segment_anything.utils.amg import MaskData

from use_search.config import AutoMaskParams  # the automatic-mask knobs, defined once
from use_search.masks import mask_bbox
from use_search.segmenter.amg import ResizeToEncoder, box_nms, postprocess_small_regions
from use_search.types import Segment


class AutoSegmenter:
    """segment-anything's ``SamAutomaticMaskGenerator`` → ``Segment``s, largest first (see the module
    docstring for the few deliberate differences)."""

    def __init__(self, sam: Sam, params: AutoMaskParams) -> None:
        self.params = params
        self.generator = _Generator(
            sam,
            **params.model_dump(exclude={"precision", "min_mask_region_area"}),  # segment-anything's own names
            min_mask_region_area=0,  # done below, without OpenCV
            output_mode="binary_mask",
        )
        self.generator.predictor.transform = ResizeToEncoder(sam.image_encoder.img_size)
        self.input_size: int | None = int(sam.image_encoder.img_size)
        self.image_batch = 1  # segment-anything's loop takes one image at a time

    @torch.inference_mode()
    def segment(self, image: np.ndarray) -> list[Segment]:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an H×W×3 uint8 RGB image, got {image.shape} {image.dtype}")
        # The generator's records come in its NMS order; empty masks never took part in its NMS.
        records = [r for r in self.generator.generate(image) if r["area"] > 0]
        records = self._suppress_flat_boxes(records)
        masks = [r["segmentation"] for r in records]
        if self.params.min_mask_region_area > 0:
            keep, cleaned = postprocess_small_regions(
                masks, self.params.min_mask_region_area, self.params.post_nms_thresh
            )
            records = [records[i] for i in keep]
            masks = [cleaned[i] for i in keep]
        out = [
            Segment(
                mask=mask, bbox=mask_bbox(mask), area=int(mask.sum()),
                predicted_iou=float(rec["predicted_iou"]), stability_score=float(rec["stability_score"]),
                source="auto",
            )
            for rec, mask in zip(records, masks)
        ]
        out.sort(key=lambda s: -s.area)
        return out

    def segment_batch(self, images: Sequence[np.ndarray]) -> list[list[Segment]]:
        return [self.segment(image) for image in images]

    def _suppress_flat_boxes(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The NMS segment-anything skipped: among masks whose box has zero width or height (which
        interact with no other box there), per crop by predicted IoU, then across crops preferring
        smaller crops, as its two NMS steps would have done with ``amg.box_nms``."""
        flat = [i for i, r in enumerate(records) if r["bbox"][2] == 0 or r["bbox"][3] == 0]
        if len(flat) < 2:
            return records
        # segment-anything's XYWH has w = x1 - x0: back to its inclusive XYXY.
        boxes = torch.tensor([_xyxy(records[i]["bbox"]) for i in flat], dtype=torch.float32)
        ious = torch.tensor([records[i]["predicted_iou"] for i in flat], dtype=torch.float32)
        crops = [tuple(_xyxy(records[i]["crop_box"])) for i in flat]
        kept: list[int] = []
        for crop in dict.fromkeys(crops):
            idx = torch.tensor([k for k, c in enumerate(crops) if c == crop])
            kept.extend(idx[box_nms(boxes[idx], ious[idx], self.params.box_nms_thresh)].tolist())
        kept.sort()
        if self.params.crop_n_layers > 0 and len(kept) > 1:
            idx = torch.tensor(kept)
            area = torch.tensor([(c[2] - c[0]) * (c[3] - c[1]) for c in (crops[k] for k in kept)])
            kept = idx[box_nms(boxes[idx], 1 / area, self.params.crop_nms_thresh)].tolist()
        dropped = {flat[k] for k in range(len(flat))} - {flat[k] for k in kept}
        return [r for i, r in enumerate(records) if i not in dropped]


class _Generator(SamAutomaticMaskGenerator):
    """segment-anything's generator, skipping crops without pixels (it fails on them) and crops equal
    to an earlier one (both happen only with crop layers on images a few pixels wide)."""

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        self._seen: set[tuple[int, ...]] = set()
        return super().generate(image)

    def _process_crop(self, image, crop_box, crop_layer_idx, orig_size):  # type: ignore[no-untyped-def]
        x0, y0, x1, y1 = crop_box
        if x1 <= x0 or y1 <= y0 or tuple(crop_box) in self._seen:
            return MaskData()
        self._seen.add(tuple(crop_box))
        return super()._process_crop(image, crop_box, crop_layer_idx, orig_size)


def _xyxy(xywh: list[float]) -> list[float]:
    x, y, w, h = xywh
    return [x, y, x + w, y + h]
