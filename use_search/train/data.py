"""Segment-text pairs for training: three sources, one record type, and the augmenting dataset.

Sources (each → ``list[PairImage]``; masks stay encoded until a worker needs them):
  ``coco_pairs``    COCO annotation JSONs (pycocotools): category names as texts; several files of the
                    same images (instances + COCO-Stuff) merge by image id; a COCO captions JSON
                    adds one whole-image segment per image carrying its captions (§3.1 treats vague,
                    image-wide texts the same way: the whole-image mask).
  ``shard_pairs``   the pair shards ``use-search curate`` writes (``curation/shards.py``).
  ``folder_pairs``  a folder of images, each with a sidecar ``<stem>.json``:
                    ``{"segments": [{"segmentation": <COCO polygons or RLE>, "texts": ["...", ...]}, ...]}``
                    (``"rle"`` is accepted in place of ``"segmentation"``, as in the shards).

Every random choice for one image in one epoch (scale, crop, segment subset, which text per segment,
§3.2) comes from a generator seeded by (seed, epoch, image index): a batch is a pure function of its
position in the run, whatever the number of workers or processes, so resuming mid-epoch is exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset, Sampler

from use_search.curation.shards import iter_shard_records
from use_search.model.geometry import segment_patch_weights

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class PairSegment:
    segmentation: Any  # COCO polygon list, uncompressed RLE, or compressed RLE (counts str/bytes)
    texts: tuple[str, ...]


@dataclass(frozen=True)
class PairImage:
    path: str
    width: int
    height: int
    segments: tuple[PairSegment, ...]


@dataclass(frozen=True)
class DataSpec:
    """One training or held-out source. ``path``: the instances JSON (coco), the shard folder
    (shards) or the image folder (folder)."""

    kind: Literal["coco", "shards", "folder"]
    path: Path
    images: Path | None = None  # coco: image folder (default: next to the JSON)
    captions: Path | None = None  # coco: optional captions JSON
    extra_annotations: tuple[Path, ...] = ()  # coco: more files of the same images (e.g. stuff_train2017.json)


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """COCO polygons / uncompressed RLE / compressed RLE → bool H×W mask."""
    if isinstance(segmentation, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        counts = segmentation["counts"]
        rle = {"size": list(segmentation["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    mask = mask_utils.decode(rle).astype(bool)
    if mask.shape != (height, width):
        raise ValueError(f"mask of size {mask.shape} on an image of size {(height, width)}")
    return mask


def _clean(texts: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t.strip() for t in texts if t and t.strip()))


# COCO-Stuff's "other" (id 183) is every thing pixel of the image as one mask: no class to learn.
COCO_STUFF_OTHER = "other"


def category_text(name: str) -> str:
    """A COCO / COCO-Stuff category name as words: ``potted_plant`` → "potted plant", ``sky-other`` → "sky",
    ``desk-stuff`` → "desk", ``sky-other-merged`` (panoptic) → "sky", ``wall-brick`` → "wall brick"."""
    words = name.replace("_", " ").split("-")
    while len(words) > 1 and words[-1] in ("other", "stuff", "merged"):
        words.pop()
    return " ".join(words)


def _identity(img: dict) -> tuple[str, int, int]:
    return Path(str(img["file_name"])).name, int(img["width"]), int(img["height"])


def coco_pairs(annotations: Path | Sequence[Path], images: Path | None = None, captions: Path | None = None, *,
               include_crowd: bool = False) -> list[PairImage]:
    """One record per image id over all ``annotations`` files, their segments in file order."""
    from pycocotools.coco import COCO

    files = [Path(annotations)] if isinstance(annotations, (str, Path)) else [Path(a) for a in annotations]
    images = Path(images) if images is not None else files[0].parent
    image_info: dict[int, tuple[dict, Path]] = {}
    segments: dict[int, list[PairSegment]] = {}
    for path in files:
        coco = COCO(str(path))
        cats = coco.loadCats(coco.getCatIds())
        names = {c["id"]: category_text(c["name"]) for c in cats if c["name"] != COCO_STUFF_OTHER}
        skip = {c["id"] for c in cats if c["name"] == COCO_STUFF_OTHER}
        for img in coco.loadImgs(coco.getImgIds()):
            seen = image_info.setdefault(img["id"], (img, path))
            if _identity(seen[0]) != _identity(img):
                raise ValueError(
                    f"image id {img['id']} is {seen[0]['file_name']} ({seen[0]['width']}×{seen[0]['height']}) in "
                    f"{seen[1]} but {img['file_name']} ({img['width']}×{img['height']}) in {path}: "
                    "annotation files given together must describe the same images"
                )
            for a in coco.loadAnns(coco.getAnnIds(imgIds=img["id"], iscrowd=None)):
                if a["category_id"] in skip or (a.get("iscrowd", 0) and not include_crowd):
                    continue
                if a["category_id"] not in names:
                    raise ValueError(f"{path}: annotation {a.get('id')} has category {a['category_id']}, not in its categories")
                segments.setdefault(img["id"], []).append(PairSegment(a["segmentation"], (names[a["category_id"]],)))
    caps: dict[int, list[str]] = {}
    if captions is not None:
        for ann in json.loads(Path(captions).read_text())["annotations"]:
            caps.setdefault(int(ann["image_id"]), []).append(ann["caption"])
    out = []
    for image_id in sorted(image_info):
        img = image_info[image_id][0]
        h, w = int(img["height"]), int(img["width"])
        segs = segments.get(image_id, [])
        if caps.get(img["id"]):
            whole = {"size": [h, w], "counts": [0, h * w]}  # uncompressed RLE of the full image
            segs.append(PairSegment(whole, _clean(caps[img["id"]])))
        if segs:
            out.append(PairImage(str(images / img["file_name"]), w, h, tuple(segs)))
    return out


def shard_pairs(folder: Path) -> list[PairImage]:
    out = []
    for rec in iter_shard_records(Path(folder)):
        segs = tuple(
            PairSegment(s["rle"], _clean([t["text"] for t in s["texts"]])) for s in rec["segments"] if s.get("texts")
        )
        if segs:
            out.append(PairImage(rec["image"], int(rec["width"]), int(rec["height"]), segs))
    return out


def folder_pairs(folder: Path) -> list[PairImage]:
    out = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        sidecar = path.with_suffix(".json")
        if not sidecar.is_file():
            continue
        meta = json.loads(sidecar.read_text())
        if "width" in meta and "height" in meta:
            w, h = int(meta["width"]), int(meta["height"])
        else:
            with Image.open(path) as im:
                w, h = im.size
        segs = []
        for i, s in enumerate(meta.get("segments", [])):
            segm = s.get("segmentation", s.get("rle"))
            if segm is None:
                raise ValueError(f"{sidecar}: segment {i} has neither 'segmentation' nor 'rle'")
            texts = _clean(s.get("texts", []))
            if texts:
                segs.append(PairSegment(segm, texts))
        if segs:
            out.append(PairImage(str(path), w, h, tuple(segs)))
    return out


def load_pairs(specs: Sequence[DataSpec]) -> list[PairImage]:
    out: list[PairImage] = []
    for spec in specs:
        if spec.kind == "coco":
            out += coco_pairs([spec.path, *spec.extra_annotations], spec.images, spec.captions)
        elif spec.kind == "shards":
            out += shard_pairs(spec.path)
        elif spec.kind == "folder":
            out += folder_pairs(spec.path)
        else:
            raise ValueError(f"unknown data kind {spec.kind!r}: coco, shards or folder")
    return out


# ---------------------------------------------------------------------------------------------------
# Dataset


@dataclass
class Item:
    image: torch.Tensor | None  # (3, S, S) uint8, or None when features come from the cache
    features: dict[str, torch.Tensor] | None
    weights: torch.Tensor  # (k, G·G) patch weights of the kept segments
    texts: list[str]  # one sampled text per kept segment


@dataclass
class Batch:
    images: torch.Tensor | None  # (B, 3, S, S) uint8
    features: list[dict[str, torch.Tensor]] | None
    weights: torch.Tensor  # (B, kmax, G·G), zero rows are padding
    valid: torch.Tensor  # (B, kmax) bool
    texts: list[str]  # the valid rows' texts, row-major

    @property
    def segments(self) -> int:
        return len(self.texts)

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True): page-locked tensors copy to the GPU asynchronously."""
        return Batch(
            self.images.pin_memory() if self.images is not None else None, self.features,
            self.weights.pin_memory(), self.valid.pin_memory(), self.texts,
        )


class PairDataset(Dataset):
    """Indexed by ``(epoch, image index)``. With ``augment``: random resize by a factor in
    ``scale_range`` and a random ``crop``×``crop`` window (§4.2: 0.5–2, 560), padded with ``fill``
    where the image is smaller. Without: the image scaled so its longer side is ``crop``, at the
    top-left. Segments keep at least ``min_visible`` of a patch of area in the crop."""

    def __init__(
        self, images: Sequence[PairImage], *, crop: int, grid: int, seed: int, augment: bool = True,
        scale_range: tuple[float, float] = (0.5, 2.0), max_segments: int = 32, min_visible: float = 0.5,
        fill: tuple[int, int, int] = (123, 117, 104), feature_dir: Path | None = None,  # fill: CLIP mean colour
    ) -> None:
        if crop % grid:
            raise ValueError(f"crop {crop} must be a multiple of the patch grid {grid}")
        self.images = list(images)
        self.crop, self.grid, self.seed = crop, grid, seed
        self.augment, self.scale_range = augment, scale_range
        self.max_segments, self.min_visible = max_segments, min_visible
        self.fill = fill
        self.feature_dir = feature_dir

    def __len__(self) -> int:
        return len(self.images)

    def window(self, rec: PairImage, rng: np.random.Generator) -> tuple[float, int, int]:
        """(scale, x0, y0): the crop's offset in the scaled image."""
        if not self.augment:
            return self.crop / max(rec.width, rec.height), 0, 0
        s = float(rng.uniform(*self.scale_range))
        ws, hs = max(1, round(rec.width * s)), max(1, round(rec.height * s))
        x0 = int(rng.integers(0, max(ws - self.crop, 0) + 1))
        y0 = int(rng.integers(0, max(hs - self.crop, 0) + 1))
        return s, x0, y0

    def __getitem__(self, key: tuple[int, int]) -> Item:
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        rec = self.images[index]
        S, G = self.crop, self.grid
        s, x0, y0 = self.window(rec, rng)
        w = min(S, max(1, round(rec.width * s)) - x0)
        h = min(S, max(1, round(rec.height * s)) - y0)
        # Nearest source pixel of every crop pixel: the same map for the image and its masks.
        cols = np.minimum(((x0 + np.arange(w) + 0.5) / s).astype(np.int64), rec.width - 1)
        rows = np.minimum(((y0 + np.arange(h) + 0.5) / s).astype(np.int64), rec.height - 1)

        k = S // G
        min_area = self.min_visible * k * k
        kept_m: list[np.ndarray] = []
        kept_t: list[str] = []
        for j in rng.permutation(len(rec.segments)):
            if len(kept_m) == self.max_segments:
                break
            seg = rec.segments[j]
            mask = decode_segmentation(seg.segmentation, rec.height, rec.width)[rows[:, None], cols[None, :]]
            if mask.sum() < max(min_area, 1):
                continue
            kept_m.append(mask)
            kept_t.append(seg.texts[int(rng.integers(len(seg.texts)))])
        weights = torch.from_numpy(segment_patch_weights(kept_m, G, side=S))

        if self.feature_dir is not None:
            from safetensors.torch import load_file

            return Item(None, load_file(str(feature_path(self.feature_dir, index))), weights, kept_t)
        with Image.open(rec.path) as im:
            im = im.convert("RGB")
            if im.size != (rec.width, rec.height):
                raise ValueError(f"{rec.path}: image is {im.size}, its annotations say {(rec.width, rec.height)}")
            box = (x0 / s, y0 / s, min((x0 + w) / s, rec.width), min((y0 + h) / s, rec.height))
            crop = np.asarray(im.resize((w, h), Image.BILINEAR, box=box))
        canvas = np.empty((S, S, 3), np.uint8)
        canvas[:] = self.fill
        canvas[:h, :w] = crop
        return Item(torch.from_numpy(canvas).permute(2, 0, 1).contiguous(), None, weights, kept_t)


def feature_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"{index:08d}.safetensors"


def collate(items: Sequence[Item]) -> Batch:
    kmax = max((len(it.texts) for it in items), default=0)
    p = items[0].weights.shape[1]
    weights = torch.zeros(len(items), kmax, p)
    valid = torch.zeros(len(items), kmax, dtype=torch.bool)
    texts: list[str] = []
    for i, it in enumerate(items):
        n = len(it.texts)
        weights[i, :n] = it.weights
        valid[i, :n] = True
        texts += it.texts
    images = torch.stack([it.image for it in items]) if items[0].image is not None else None
    features = [it.features for it in items] if items[0].features is not None else None
    return Batch(images, features, weights, valid, texts)


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """One epoch of batches: a seeded permutation cut into global batches of ``batch_size`` (the last
    partial batch dropped), each rank taking every ``world``-th image of a batch. Starts at
    ``start_step`` to resume mid-epoch. The global batch does not depend on the number of ranks."""

    def __init__(self, n: int, batch_size: int, *, epoch: int, seed: int, rank: int = 0, world: int = 1,
                 start_step: int = 0) -> None:
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by {world} processes")
        self.n, self.batch_size, self.epoch, self.seed = n, batch_size, epoch, seed
        self.rank, self.world, self.start_step = rank, world, start_step

    @staticmethod
    def steps_per_epoch(n: int, batch_size: int) -> int:
        return n // batch_size

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch(self.n, self.batch_size) - self.start_step)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        for step in range(self.start_step, self.steps_per_epoch(self.n, self.batch_size)):
            chunk = order[step * self.batch_size : (step + 1) * self.batch_size]
            yield [(self.epoch, int(i)) for i in chunk[self.rank :: self.world]]
