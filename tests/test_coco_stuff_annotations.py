"""COCO things and COCO-Stuff for the same images: one training record per image, both sets of segments.

``instances_train2017.json`` (80 thing classes, polygons) and ``stuff_train2017.json`` (91 stuff
classes as RLE, plus "other", id 183: every thing pixel as one mask, not a class) annotate the same
images. Given together they merge by image id.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from use_search.masks import encode_rle
from use_search.train.data import DataSpec, coco_pairs, decode_segmentation, load_pairs

H, W = 30, 40
IMAGES = [
    {"id": 9, "file_name": "000000000009.jpg", "width": W, "height": H},
    {"id": 25, "file_name": "000000000025.jpg", "width": W, "height": H},
]


def rect(x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def write(root, images=IMAGES):
    root.mkdir(parents=True, exist_ok=True)
    things = {
        "images": images,
        "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                       {"id": 62, "name": "potted_plant", "supercategory": "furniture"}],
        "annotations": [
            {"id": 1, "image_id": 9, "category_id": 1, "iscrowd": 0, "area": 100, "bbox": [0, 0, 10, 10],
             "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]},
            {"id": 2, "image_id": 25, "category_id": 62, "iscrowd": 0, "area": 25, "bbox": [5, 5, 5, 5],
             "segmentation": [[5, 5, 10, 5, 10, 10, 5, 10]]},
        ],
    }
    sky, wall, other = rect(0, 0, W, 10), rect(0, 10, W, 30), rect(0, 0, 10, 10)
    stuff = {
        "images": images,
        "categories": [{"id": 106, "name": "sky-other", "supercategory": "sky"},
                       {"id": 171, "name": "wall-brick", "supercategory": "wall"},
                       {"id": 183, "name": "other", "supercategory": "other"}],
        "annotations": [
            {"id": 10, "image_id": 9, "category_id": 106, "iscrowd": 0, "area": int(sky.sum()), "bbox": [0, 0, W, 10],
             "segmentation": encode_rle(sky)},
            {"id": 11, "image_id": 9, "category_id": 171, "iscrowd": 0, "area": int(wall.sum()), "bbox": [0, 10, W, 20],
             "segmentation": encode_rle(wall)},
            {"id": 12, "image_id": 9, "category_id": 183, "iscrowd": 0, "area": int(other.sum()), "bbox": [0, 0, 10, 10],
             "segmentation": encode_rle(other)},
        ],
    }
    captions = {"images": images, "annotations": [{"id": 1, "image_id": 9, "caption": "A person under the sky."}]}
    paths = {}
    for name, data in (("instances", things), ("stuff", stuff), ("captions", captions)):
        paths[name] = root / f"{name}.json"
        paths[name].write_text(json.dumps(data))
    return paths


def test_things_and_stuff_merge_by_image(tmp_path):
    p = write(tmp_path / "coco")
    recs = coco_pairs([p["instances"], p["stuff"]], tmp_path / "images", p["captions"])
    assert [r.path for r in recs] == [str(tmp_path / "images" / "000000000009.jpg"), str(tmp_path / "images" / "000000000025.jpg")]
    nine, twenty_five = recs
    # Things, then stuff ("other" dropped, names as words), then the captions' whole-image segment, once.
    assert [s.texts for s in nine.segments] == [("person",), ("sky",), ("wall brick",), ("A person under the sky.",)]
    assert np.array_equal(decode_segmentation(nine.segments[1].segmentation, H, W), rect(0, 0, W, 10))
    assert decode_segmentation(nine.segments[3].segmentation, H, W).all()
    assert [s.texts for s in twenty_five.segments] == [("potted plant",)]
    # One file still works, and the same merge comes through a DataSpec.
    assert len(coco_pairs(p["stuff"], tmp_path / "images")) == 1
    spec = DataSpec("coco", p["instances"], images=tmp_path / "images", captions=p["captions"], extra_annotations=(p["stuff"],))
    assert load_pairs([spec]) == recs


def test_the_same_id_naming_two_images_is_an_error(tmp_path):
    p = write(tmp_path / "a")
    q = write(tmp_path / "b", [{**IMAGES[0], "file_name": "000000000010.jpg"}, IMAGES[1]])
    with pytest.raises(ValueError, match="(?s)image id 9 is 000000000009.jpg.*000000000010.jpg"):
        coco_pairs([p["instances"], q["stuff"]])


def test_train_cli_merges_repeated_coco_files(tmp_path):
    p = write(tmp_path / "coco")
    env = {**os.environ, "USE_SEARCH_DATA_DIR": str(tmp_path / "data"), "USE_SEARCH_CONFIG": "/nonexistent"}
    base = [sys.executable, "-m", "use_search", "--preset", "tiny", "train", "--out", str(tmp_path / "out"),
            "--coco", str(p["instances"]), "--coco", str(p["stuff"]), "--batch-size", "3", "--workers", "0"]
    r = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300)
    # Two images, not four: the stuff file adds segments to the same images.
    assert r.returncode == 2 and "2 training images with segments: fewer than one batch of 3" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
