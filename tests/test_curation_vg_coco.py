"""Visual Genome regions on COCO images (paper §4.1): VG's ``image_data.json`` maps VG ids to COCO ids.

About half of VG's images are COCO images, at another resolution (VG keeps up to 800 px, COCO 640 px):
the regions of VG image 5 (800×600) belong to COCO's ``000000000009.jpg`` (640×480), scaled by 0.8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
from PIL import Image

from use_search.curation.annotations import RegionError, VisualGenomeRegions
from use_search.curation.pairs import TextEntry
from use_search.curation.pipeline import CurationConfig, run_curation
from use_search.curation.shards import iter_shard_records

REGIONS = [
    {"id": 5, "regions": [
        {"region_id": 50, "image_id": 5, "phrase": "a cup of coffee", "x": 100, "y": 50, "width": 400, "height": 300},
        {"region_id": 51, "image_id": 5, "phrase": "a silver spoon", "x": 500, "y": 400, "width": 200, "height": 100},
    ]},
    {"id": 6, "regions": [
        {"region_id": 60, "image_id": 6, "phrase": "a cat's ear", "x": 10, "y": 10, "width": 30, "height": 30},
    ]},
    {"id": 7, "regions": [{"region_id": 70, "image_id": 7, "phrase": "a rocket", "x": 0, "y": 0, "width": 9, "height": 9}]},
    {"id": 9, "regions": [{"region_id": 90, "image_id": 9, "phrase": "not this one", "x": 0, "y": 0, "width": 9, "height": 9}]},
]
IMAGE_DATA = [
    {"image_id": 5, "width": 800, "height": 600, "coco_id": 9, "flickr_id": None, "url": "https://example/5.jpg"},
    {"image_id": 6, "width": 300, "height": 300, "coco_id": 25, "flickr_id": None, "url": "https://example/6.jpg"},
    {"image_id": 7, "width": 100, "height": 100, "coco_id": None, "flickr_id": 1, "url": "https://example/7.jpg"},
    {"image_id": 9, "width": 100, "height": 100, "coco_id": None, "flickr_id": 2, "url": "https://example/9.jpg"},
]


@pytest.fixture
def vg_files(tmp_path):
    (tmp_path / "region_descriptions.json").write_text(json.dumps(REGIONS))
    (tmp_path / "image_data.json").write_text(json.dumps(IMAGE_DATA))
    return tmp_path / "region_descriptions.json", tmp_path / "image_data.json"


@pytest.fixture
def coco_folder(tmp_path):
    folder = tmp_path / "train2017"
    folder.mkdir()
    Image.fromarray(skimage.data.coffee()).resize((160, 120)).save(folder / "000000000009.jpg")  # VG 5 at 0.2
    Image.fromarray(skimage.data.chelsea()).resize((150, 150)).save(folder / "000000000025.jpg")
    Image.fromarray(skimage.data.astronaut()).resize((64, 64)).save(folder / "000000000007.jpg")  # COCO 7: no VG image
    return folder


def test_regions_keyed_by_coco_id_and_scaled_to_the_coco_image(vg_files, coco_folder):
    vg = VisualGenomeRegions(*vg_files)
    # COCO 9 is VG 5, 800×600 in VG and 640×480 here: boxes scaled by 0.8.
    assert [(p.box, p.texts) for p in vg.pairs(coco_folder / "000000000009.jpg", 640, 480)] == [
        ((80.0, 40.0, 400.0, 280.0), (TextEntry("a cup of coffee", "expression", "annotation:vg"),)),
        ((400.0, 320.0, 560.0, 400.0), (TextEntry("a silver spoon", "expression", "annotation:vg"),)),
    ]
    # COCO 2014 names end in the same id.
    assert len(vg.pairs(coco_folder / "COCO_train2014_000000000009.jpg", 640, 480)) == 2
    # COCO 7 has no VG image (VG 7 is a Flickr photo, not COCO 7): nothing, not VG 7's regions.
    assert vg.pairs(coco_folder / "000000000007.jpg", 64, 64) == []
    assert vg.pairs(coco_folder / "no-digits.jpg", 64, 64) == []
    # Without image_data, files are VG images named by VG id.
    assert [p.texts[0].text for p in VisualGenomeRegions(vg_files[0]).pairs(coco_folder / "7.jpg", 100, 100)] == ["a rocket"]


def test_another_framing_is_an_error_not_shifted_boxes(vg_files):
    vg = VisualGenomeRegions(*vg_files)
    with pytest.raises(RegionError, match="(?s)VG image 5 is 800×600.*640×400"):
        vg.pairs("000000000009.jpg", 640, 400)
    assert len(vg.pairs("000000000009.jpg", 641, 481)) == 2  # rounding of a resize is not a mismatch


def test_curate_run_over_a_coco_folder_finds_each_images_regions(tmp_path, vg_files, coco_folder):
    out = tmp_path / "pairs"
    env = {**os.environ, "USE_SEARCH_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200", "USE_SEARCH_CONFIG": "/nonexistent"}
    args = [sys.executable, "-m", "use_search", "--preset", "tiny", "curate", "run", str(coco_folder), "--out", str(out),
            "--vg-regions", str(vg_files[0]), "--vg-image-data", str(vg_files[1])]
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "3 / 0 / 2 / 1" in r.stderr, r.stderr[-3000:]  # 000000000007.jpg has no region: without text, not curated
    recs = {os.path.basename(rec["image"]): rec for rec in iter_shard_records(out)}
    assert recs["000000000009.jpg"]["pairs_before_nms"] == 2
    assert recs["000000000025.jpg"]["pairs_before_nms"] == 1
    assert recs["000000000007.jpg"]["pairs_before_nms"] == 0
    texts = {t["text"] for s in recs["000000000009.jpg"]["segments"] for t in s["texts"]}
    assert texts <= {"a cup of coffee", "a silver spoon"}
    assert json.loads((out / "manifest.json").read_text())["vg_image_key"] == "coco"

    # --vg-image-data alone is a user error.
    r = subprocess.run(args[:-4] + ["--vg-image-data", str(vg_files[1])], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "--vg-image-data needs --vg-regions" in r.stderr and "Traceback" not in r.stderr


def test_mismatched_image_is_reported_and_retried(tmp_path, vg_files):
    folder = tmp_path / "coco"
    folder.mkdir()
    Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(folder / "000000000025.png")  # VG 6 is square
    summary = run_curation(CurationConfig(
        images=folder, out=tmp_path / "pairs", vg_regions=vg_files[0], vg_image_data=vg_files[1],
        sam="tiny", device="cpu", offline=True, progress=False,
    ))
    assert summary.images_curated == 0 and len(summary.images_failed) == 1
    assert "300×300" in summary.images_failed[0][1] and list(iter_shard_records(tmp_path / "pairs")) == []


def test_malformed_files_and_regions_are_clear_errors(tmp_path, vg_files):
    (tmp_path / "dict.json").write_text('{"id": 1}')
    with pytest.raises(ValueError, match="dict.json: not a Visual Genome image_data.json file: expected a JSON list"):
        VisualGenomeRegions(vg_files[0], tmp_path / "dict.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="broken.json: not a Visual Genome region_descriptions.json file"):
        VisualGenomeRegions(tmp_path / "broken.json")
    (tmp_path / "nox.json").write_text(json.dumps([{"id": 3, "regions": [{"phrase": "a hat", "y": 1, "width": 2, "height": 2}]}]))
    with pytest.raises(RegionError, match="3.jpg: a region of VG image 3 is malformed .*'x'"):
        VisualGenomeRegions(tmp_path / "nox.json").pairs("3.jpg", 10, 10)
