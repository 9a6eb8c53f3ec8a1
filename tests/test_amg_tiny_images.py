"""Tiny and very thin images through the automatic-mask engines, the HTTP upload and ``index``.

segment-anything's box NMS gives boxes of zero width or height an IoU of NaN, so they never suppress
each other: every mask of a 1×1 image (all of them the same pixel, box [0, 0, 0, 0]) survived, and
a 1-pixel-high image's masks were never deduplicated. Its resize rounds a 4000×1 image's short
side to 0 pixels and PIL fails ("height and width must be > 0").
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import httpx
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator
from torchvision.ops import batched_nms

from amg_stress import same_arithmetic
from servers import api_server
from use_search.masks import encode_rle
from use_search.segmenter.amg import ResizeToEncoder, box_nms
from use_search.segmenter.automatic import AutoMaskParams, AutoSegmenter
from use_search.segmenter.batched import BatchedAutoSegmenter
from use_search.segmenter.sam import build_tiny_sam

# The tiny preset's settings: 8×8 grid, no score thresholds (random weights), NMS 0.7.
PARAMS = AutoMaskParams(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0)
HANDFUL = 4
SHAPES = [(1, 1), (2, 2), (1, 7), (3, 5), (1, 1000), (1000, 1), (1, 4000), (4000, 1), (2, 3000)]


def strip(h: int, w: int) -> np.ndarray:
    """A real photo squeezed to h×w."""
    return np.asarray(Image.fromarray(skimage.data.coffee()).resize((w, h), Image.BILINEAR))


@pytest.fixture(scope="module")
def sam():
    return build_tiny_sam()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_segment_anything_itself_keeps_every_mask_of_a_1x1_image(sam):
    """The failure being fixed, shown on segment-anything's generator with the tiny preset's settings."""
    gen = SamAutomaticMaskGenerator(sam, points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    with torch.inference_mode():
        records = gen.generate(strip(1, 1))
    assert len([r for r in records if r["area"] > 0]) > 50


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_tiny_and_thin_images_give_a_handful_of_segments(sam, shape):
    image = strip(*shape)
    auto = AutoSegmenter(sam, PARAMS).segment(image)
    batched = BatchedAutoSegmenter(sam, PARAMS).segment(image)
    assert 1 <= len(batched) <= HANDFUL, [s.area for s in batched]
    # The two engines agree here too: with the same float32 operations on the same shapes, on any CPU.
    same = BatchedAutoSegmenter(sam, PARAMS, same_arithmetic(PARAMS)).segment(image)
    assert [s.rle for s in auto] == [s.rle for s in same]
    for s in batched:
        assert s.mask.shape == shape and s.area == int(s.mask.sum()) > 0 and s.rle == encode_rle(s.mask)
    assert len({s.rle["counts"] for s in batched}) == len(batched)  # no duplicate masks


@pytest.mark.parametrize("shape", [(1, 1), (1, 1000), (3, 2)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_crop_layers_on_tiny_images(sam, shape):
    """A crop layer cuts a 1-px-high image into crops 0 px high: skipped (segment-anything fails)."""
    params = AutoMaskParams(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, crop_n_layers=1)
    image = strip(*shape)
    batched = BatchedAutoSegmenter(sam, params).segment(image)
    assert 1 <= len(batched) <= min(8, shape[0] * shape[1])  # a 3×2 image has 6 pixels; crops see them apart
    assert len({s.rle["counts"] for s in batched}) == len(batched)
    same = BatchedAutoSegmenter(sam, params, same_arithmetic(params)).segment(image)
    assert [s.rle for s in AutoSegmenter(sam, params).segment(image)] == [s.rle for s in same]


def test_resize_never_rounds_a_side_to_zero():
    t = ResizeToEncoder(1024)
    assert t.get_preprocess_shape(1, 4000, 1024) == (1, 1024)
    assert t.get_preprocess_shape(4000, 1, 1024) == (1024, 1)
    assert t.get_preprocess_shape(480, 640, 1024) == (768, 1024)  # segment-anything's own otherwise
    assert t.apply_image(strip(1, 4000)).shape == (1, 1024, 3)


def test_box_nms_is_torchvisions_except_for_flat_boxes():
    rng = np.random.default_rng(0)
    xy = rng.integers(0, 80, (60, 2))
    boxes = torch.tensor(np.concatenate([xy, xy + rng.integers(1, 30, (60, 2))], 1), dtype=torch.float32)
    scores = torch.tensor(rng.random(60), dtype=torch.float32)
    zeros = torch.zeros(60)
    assert torch.equal(box_nms(boxes, scores, 0.5), batched_nms(boxes, scores, zeros, 0.5))
    # Flat boxes: same pixel (a 1×1 image) → one survives; a 1-px-high strip → 1-D overlap decides.
    same = torch.zeros(5, 4)
    assert box_nms(same, torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2]), 0.7).tolist() == [1]
    assert len(batched_nms(same, torch.rand(5), torch.zeros(5), 0.7)) == 5  # torchvision: NaN IoU
    strips = torch.tensor([[0, 0, 99, 0], [0, 0, 89, 0], [50, 0, 149, 0], [120, 0, 199, 0]], dtype=torch.float32)
    assert box_nms(strips, torch.tensor([0.9, 0.8, 0.7, 0.6]), 0.7).tolist() == [0, 2, 3]
    # Mixed: flat and normal boxes never interact; the order is by score across both.
    mixed = torch.cat([boxes[:3], strips[:2]])
    keep = box_nms(mixed, torch.tensor([0.5, 0.3, 0.1, 0.4, 0.2]), 0.7)
    assert keep.tolist() == [0, 3, 1, 2]


def test_upload_of_a_1x1_and_a_thin_png_over_http(tmp_path):
    def png(h: int, w: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(strip(h, w)).save(buf, format="PNG")
        return buf.getvalue()

    with api_server(tmp_path) as base, httpx.Client(base_url=base, timeout=120) as client:
        for name, (h, w) in {"dot.png": (1, 1), "line.png": (1, 1000)}.items():
            r = client.post("/images", files={"file": (name, png(h, w), "image/png")})
            assert r.status_code == 201, r.text
            body = r.json()
            assert body["status"] == "indexed" and 1 <= body["n_segments"] <= HANDFUL, body
            info = client.get(f"/images/{body['id']}").json()
            assert len(info["segments"]) == body["n_segments"]


def test_index_command_indexes_thin_images(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, (h, w) in {"dot.png": (1, 1), "line.png": (1, 1000), "pole.png": (4000, 1)}.items():
        Image.fromarray(strip(h, w)).save(photos / name)
    env = {**os.environ, "USE_SEARCH_DATA_DIR": str(tmp_path / "data"), "USE_SEARCH_CONFIG": "/nonexistent",
           "COLUMNS": "200", "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "use_search", "--preset", "tiny", *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)

    r = run("index", str(photos))
    assert r.returncode == 0, r.stderr
    assert not re.search(r"failed\S*\s+\S*(dot|line|pole)\.png", r.stderr), r.stderr  # no per-file failure
    assert "height and width" not in r.stderr and "Traceback" not in r.stderr
    assert "images: 3" in run("stats").stdout
