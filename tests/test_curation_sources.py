"""Text sources: sidecar .txt and COCO captions, the MLLM captioner (tiny), Visual Genome regions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data
from PIL import Image

from use_search.curation.annotations import VisualGenomeRegions
from use_search.curation.captions import (
    PART_AWARE_PROMPT,
    Caption,
    CocoCaptions,
    GenerationParams,
    MLLMCaptioner,
    SidecarCaptions,
    load_mllm_captioner,
)
from use_search.curation.pairs import TextEntry
from use_search.curation.pipeline import CurationConfig, run_curation
from use_search.curation.shards import iter_shard_records
from use_search.curation.tiny import build_tiny_mllm
from use_search.masks import decode_rle, mask_bbox
from use_search.weights import MissingWeightsError

PIXELS = np.zeros((8, 8, 3), dtype=np.uint8)


def test_sidecar_captions(tmp_path):
    img = tmp_path / "giraffe.png"
    img.write_bytes(b"")
    assert SidecarCaptions().captions(img, PIXELS) == []
    # Tux Paint stamp descriptions: English first, translations as "xx.utf8=..." lines.
    (tmp_path / "giraffe.txt").write_text("A giraffe.\n\nfr.utf8=Une girafe.\npt_BR.utf8=Uma girafa.\n  A tall animal with a long neck.  \n")
    assert SidecarCaptions().captions(img, PIXELS) == [
        Caption("A giraffe.", "caption:txt"), Caption("A tall animal with a long neck.", "caption:txt"),
    ]


def test_coco_captions_by_file_name(tmp_path):
    ann = {
        "images": [{"id": 9, "file_name": "000000000009.jpg"}, {"id": 25, "file_name": "000000000025.jpg"}],
        "annotations": [
            {"image_id": 9, "id": 1, "caption": "A plate of food. "},
            {"image_id": 25, "id": 2, "caption": "A giraffe eating leaves."},
            {"image_id": 9, "id": 3, "caption": "Broccoli and meat in a bowl."},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(ann))
    coco = CocoCaptions(tmp_path / "captions.json")
    assert [c.text for c in coco.captions(tmp_path / "train2017" / "000000000009.jpg", PIXELS)] == [
        "A plate of food.", "Broccoli and meat in a bowl.",
    ]
    assert coco.captions(tmp_path / "other.jpg", PIXELS) == []


def test_mllm_captioner_uses_the_part_aware_prompt_and_paper_sampling():
    params = GenerationParams(max_new_tokens=12)
    assert (params.temperature, params.top_p, params.top_k) == (0.8, 0.4, 5)  # §4.1
    captioner = MLLMCaptioner(*build_tiny_mllm(), params)
    prompt = captioner.prompt_text()
    assert PART_AWARE_PROMPT in prompt and "<image>" in prompt
    inputs = captioner.inputs([skimage.data.astronaut()[::8, ::8].copy()])
    assert inputs["pixel_values"].shape == (1, 3, 64, 64)
    out = captioner.captions(None, skimage.data.astronaut()[::8, ::8].copy())  # type: ignore[arg-type]
    assert len(out) == 1 and out[0].source == "caption:mllm" and out[0].text
    assert len(out[0].text.split()) <= 12 * 2


def test_missing_mllm_is_a_clear_error(tmp_path):
    with pytest.raises(MissingWeightsError, match="(?s)MLLM captioner 'use-search-tests/no-such-mllm' is not in the Hugging Face cache.*hf download"):
        load_mllm_captioner("use-search-tests/no-such-mllm", offline=True)
    with pytest.raises(MissingWeightsError, match="no model folder"):
        load_mllm_captioner(str(tmp_path / "missing-model"))


def test_visual_genome_regions_skip_grounding(tmp_path):
    photos = tmp_path / "VG_100K"
    photos.mkdir()
    rgb = np.asarray(Image.fromarray(skimage.data.coffee()).resize((120, 80)))
    Image.fromarray(rgb).save(photos / "1.png")
    regions = [{
        "id": 1,
        "regions": [
            {"region_id": 10, "image_id": 1, "phrase": "a cup of coffee", "x": 20, "y": 10, "width": 50, "height": 40},
            {"region_id": 11, "image_id": 1, "phrase": "the whole table", "x": 0, "y": 0, "width": 119, "height": 79},
            {"region_id": 12, "image_id": 1, "phrase": "", "x": 0, "y": 0, "width": 10, "height": 10},
        ],
    }, {"id": 2, "regions": [{"region_id": 20, "image_id": 2, "phrase": "a dog", "x": 0, "y": 0, "width": 5, "height": 5}]}]
    (tmp_path / "region_descriptions.json").write_text(json.dumps(regions))
    vg = VisualGenomeRegions(tmp_path / "region_descriptions.json")
    pairs = vg.pairs(photos / "1.png", 120, 80)
    assert [(p.box, p.texts) for p in pairs] == [
        ((20.0, 10.0, 70.0, 50.0), (TextEntry("a cup of coffee", "expression", "annotation:vg"),)),
        ((0.0, 0.0, 119.0, 79.0), (TextEntry("the whole table", "expression", "annotation:vg"),)),
    ]

    # Through the pipeline: no captioner, so no spaCy and no Grounding DINO are loaded.
    summary = run_curation(CurationConfig(
        images=photos, out=tmp_path / "pairs", vg_regions=tmp_path / "region_descriptions.json",
        sam="tiny", device="cpu", offline=True, progress=False,
    ))
    assert summary.images_curated == 1 and summary.pairs_before_nms == 2
    assert set(summary.models) == {"sam"}
    (rec,) = list(iter_shard_records(tmp_path / "pairs"))
    texts = {t["text"]: seg for seg in rec["segments"] for t in seg["texts"]}
    assert set(texts) <= {"a cup of coffee", "the whole table"} and "the whole table" in texts
    whole = texts["the whole table"]  # 119×79 of 120×80 is over 90%: the whole-image mask
    assert whole["area"] == 120 * 80 and whole["bbox"] == [0, 0, 120, 80]
    for seg in rec["segments"]:
        mask = decode_rle(seg["rle"])
        assert mask.shape == (80, 120) and int(mask.sum()) == seg["area"] and list(mask_bbox(mask)) == seg["bbox"]


def test_mllm_captions_through_the_pipeline(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.asarray(Image.fromarray(skimage.data.astronaut()).resize((96, 96)))).save(photos / "a.png")
    summary = run_curation(CurationConfig(
        images=photos, out=tmp_path / "pairs", mllm="tiny", generation=GenerationParams(max_new_tokens=24),
        grounding_model="tiny", sam="tiny", device="cpu", offline=True, progress=False,
    ))
    assert summary.images_curated == 1 and summary.untrained
    assert summary.models["captioner"] == "mllm-tiny-untrained"
    (rec,) = list(iter_shard_records(tmp_path / "pairs"))
    assert all(t["source"] == "caption:mllm" for seg in rec["segments"] for t in seg["texts"])
