"""The command line as a user runs it: a real subprocess, real photos, the embedded store."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from scores import pixel_scores


def run(args, data_dir, timeout=300):
    env = {**os.environ, "USE_SEARCH_DATA_DIR": str(data_dir), "COLUMNS": "200", "USE_SEARCH_CONFIG": "/nonexistent"}
    return subprocess.run([sys.executable, "-m", "use_search", *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_index_then_query_json_and_overlays(tmp_path, photos):
    data = tmp_path / "data"
    root = photos["voc"].parent
    (root / "corrupt.jpg").write_bytes(b"GIF89a-not-really")
    r = run(["--preset", "tiny", "index", str(root)], data)
    assert r.returncode == 3, r.stderr  # one file failed, the rest is indexed
    assert "UNTRAINED MODELS" in r.stderr
    assert "corrupt.jpg" in r.stderr and "failed" in r.stderr
    assert "img/s" in r.stderr and "indexed images" in r.stderr

    r = run(["--preset", "tiny", "query", "a cat on a sofa", "-k", "3", "--json", "--save", str(tmp_path / "ov")], data)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert [row["rank"] for row in rows] == [1, 2, 3]
    # Each score is the cosine of the stored vector with the text embedded here (the tiny preset is
    # seeded: the same model); the three are the best three of every stored segment.
    cosine, tol = stored_cosines(data, "a cat on a sofa")
    for row in rows:
        assert row["score"] == pytest.approx(cosine[row["id"]], abs=tol), row["id"]
    best = sorted(cosine.values(), reverse=True)[:3]
    assert [row["score"] for row in rows] == pytest.approx(best, abs=tol)
    for row in rows:
        assert row["model"] == "crop-clip:clip-tiny-untrained"
        overlay = Image.open(row["overlay"])
        assert overlay.size == (row["width"], row["height"])

    r = run(["--preset", "tiny", "query", "a cat", "--image", str(photos["chelsea"]), "--json"], data)
    assert r.returncode == 0, r.stderr
    assert {json.loads(line)["path"] for line in r.stdout.splitlines()} == {str(photos["chelsea"])}

    r = run(["--preset", "tiny", "stats"], data)
    assert "images: 4" in r.stdout


def stored_cosines(data_dir, text: str) -> tuple[dict[str, float], float]:
    """({point id: cosine with ``text``} over the store under ``data_dir``, the float32 rounding bound of
    those the engine computes), ``text`` embedded in this process by the tiny preset's text tower."""
    from use_search.config import Settings
    from use_search.factory import Runtime
    from use_search.store import EdgeStore

    settings = Settings(data_dir=data_dir, preset="tiny", device="cpu", offline=True)
    q = Runtime.from_settings(settings).query_embedder().embed_texts([text])[0].astype(np.float64)
    with EdgeStore(data_dir / "store", "segments") as store:
        vectors = {str(p.id): np.asarray(p.vector, dtype=np.float64) for p in store.read_points(sorted(store.point_ids()))}
    cosines = {i: float(v @ q / (np.linalg.norm(v) * np.linalg.norm(q))) for i, v in vectors.items()}
    # A float32 dot product of d terms of unit vectors errs by at most d·u, and each side's float32
    # normalisation by about d/2·u (u = 2^-24).
    return cosines, 2 * (len(q) + 2) * 2.0**-24


def test_paper_preset_without_weights_fails_fast_and_names_the_files(tmp_path, photos):
    started = time.monotonic()
    r = run(["--preset", "paper", "--offline", "index", str(photos["voc"].parent)], tmp_path / "data")
    assert r.returncode == 2
    assert time.monotonic() - started < 60
    assert "sam_vit_h_4b8939.pth" in r.stderr and "use-search weights fetch sam_vit_h" in r.stderr
    assert "ViT-L-14-336px.pt" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "data" / "store").exists()  # nothing was created


def test_user_errors_have_no_traceback(tmp_path):
    r = run(["--preset", "tiny", "index", str(tmp_path / "nope")], tmp_path / "data")
    assert r.returncode == 2 and "no such file or folder" in r.stderr and "Traceback" not in r.stderr
    r = run(["--preset", "tiny", "query", "anything"], tmp_path / "data")
    assert r.returncode == 2 and "empty" in r.stderr and "Traceback" not in r.stderr
    r = run(["weights", "verify", "sam_vit_b"], tmp_path / "data")
    assert r.returncode == 1 and "missing" in r.stdout
    with open("/dev/full", "w") as full:  # output to a full disk: one line, not a traceback
        r = subprocess.run([sys.executable, "-m", "use_search", "weights", "list"], stdout=full, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, "USE_SEARCH_DATA_DIR": str(tmp_path / "data")}, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: [Errno 28] No space left on device", r.stderr


def test_bad_settings_are_one_line_naming_the_setting_or_file(tmp_path):
    """A typo in the settings file was ignored without a word; a broken file or a bad value printed
    pydantic's multi-line report with a URL, never naming the file."""
    data = tmp_path / "data"

    def stats(config: str | None = None, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "use_search", "stats"], capture_output=True, text=True, timeout=120,
            env={**os.environ, "USE_SEARCH_DATA_DIR": str(data), "USE_SEARCH_CONFIG": config or "/nonexistent", **env},
        )

    def one_error(r: subprocess.CompletedProcess) -> str:
        assert r.returncode == 2 and "Traceback" not in r.stderr and "errors.pydantic.dev" not in r.stderr, r.stderr
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        return lines[0]

    files = {"broken.toml": 'preset = [\n', "typo.toml": "[amg]\npoints_per_side = 8\npoints_per_sid = 4\n",
             "top.toml": "presett = 'tiny'\n", "good.toml": "preset = 'tiny'\n[amg]\npoints_per_side = 8\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert f"settings file {tmp_path / 'broken.toml'} is unreadable" in one_error(stats(str(tmp_path / "broken.toml")))
    assert "unknown setting(s) amg.points_per_sid " in one_error(stats(str(tmp_path / "typo.toml")))
    assert "unknown setting(s) presett " in one_error(stats(str(tmp_path / "top.toml")))
    assert "is unreadable" in one_error(stats(str(tmp_path)))  # a folder
    line = one_error(stats(USE_SEARCH_PRESET="bogus"))
    assert "invalid setting preset" in line and "'bogus'" in line
    line = one_error(stats(USE_SEARCH_STORE__MAX_SEGMENT_MB="lots"))
    assert "invalid setting store.max_segment_mb" in line and "'lots'" in line
    r = stats(str(tmp_path / "good.toml"))
    assert r.returncode == 0 and "images: 0" in r.stdout, r.stderr


def test_serve_on_a_port_in_use_is_one_error_line(tmp_path):
    """uvicorn found the port taken only after start-up and exited 3 (index's "some files failed")
    among its log lines; the socket is now bound first."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run(["--preset", "tiny", "serve", "--port", str(port)], tmp_path / "data", timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr
    assert "Traceback" not in r.stderr and "Started server process" not in r.stderr


def test_curate_run_and_stats(tmp_path, photos):
    data = tmp_path / "data"
    photos["chelsea"].with_suffix(".txt").write_text("A tabby cat with green eyes lies on a wooden floor.\n")
    photos["coffee"].with_suffix(".txt").write_text("A cup of coffee on a white saucer with a spoon.\n")
    shards = tmp_path / "shards"
    r = run(["--preset", "tiny", "curate", "run", str(photos["chelsea"].parent), "--out", str(shards), "--sidecar-captions"], data)
    assert r.returncode == 0, r.stderr
    # Three images under sub/; astronaut has no caption: done with no pairs, counted apart from the curated.
    assert "images found / skipped / curated / without text" in r.stderr and "3 / 0 / 2 / 1" in r.stderr
    assert r.stderr.count("UNTRAINED MODELS") == 1  # the banner, once
    from use_search.curation import shard_stats

    # The figures, counted here from the shards' JSON lines: one record per image; pairs before NMS as
    # each record says; after NMS, its segments; expressions, the distinct texts (any case).
    records = [json.loads(line) for f in sorted(shards.glob("pairs-*.jsonl")) for line in f.read_text().splitlines()]
    by_image = {rec["image"]: rec for rec in records}
    assert sorted(by_image) == sorted(str(photos[n]) for n in ("astronaut", "chelsea", "coffee")) and len(records) == 3
    assert by_image[str(photos["astronaut"])]["segments"] == []
    segments = [seg for rec in records for seg in rec["segments"]]
    texts = [t for seg in segments for t in seg["texts"]]
    assert all(seg["texts"] for seg in segments)
    expected = (3, sum(rec["pairs_before_nms"] for rec in records), len(segments), len({t["text"].strip().casefold() for t in texts}))
    st = shard_stats(shards)
    assert (st.images, st.pairs, st.pairs_after_nms, st.unique_expressions) == expected
    assert st.images_with_segments == 2 and st.texts_after_nms == len(texts)
    r = run(["curate", "stats", str(shards)], data)
    assert r.returncode == 0, r.stderr
    assert re.search(r"│\s*" + r"\s*│\s*".join(map(str, expected)) + r"\s*│", r.stdout), r.stdout
    r = run(["--preset", "tiny", "curate", "run", str(photos["chelsea"].parent), "--out", str(shards), "--sidecar-captions"], data)
    assert "3 / 3 / 0 / 0" in r.stderr  # resumed: every image already done

    # The shards train the USE head, and the checkpoint indexes and queries.
    ckpt_dir = tmp_path / "train"
    r = run(["--preset", "tiny", "train", "--shards", str(shards), "--out", str(ckpt_dir),
             "--max-steps", "2", "--batch-size", "1", "--workers", "0"], data)
    assert r.returncode == 0, r.stderr
    assert (ckpt_dir / "last.safetensors").is_file() and "2 steps" in r.stderr
    model = ["--preset", "tiny", "--model", str(ckpt_dir / "last.safetensors"), "--store", str(tmp_path / "use-store")]
    r = run([*model, "index", str(photos["chelsea"])], data)
    assert r.returncode == 0, r.stderr
    r = run([*model, "query", "a cat", "--json"], data)
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows and all(row["model"].startswith("use:last-") for row in rows)


def test_model_init_writes_an_untrained_checkpoint(tmp_path):
    r = run(["--preset", "tiny", "model", "init", str(tmp_path / "head.safetensors")], tmp_path / "data")
    assert r.returncode == 0, r.stderr
    from use_search.model.checkpoint import read_use_config

    cfg = read_use_config(tmp_path / "head.safetensors")
    assert cfg.trained_steps == 0 and cfg.is_tiny


def test_eval_semseg_and_retrieval_commands(tmp_path, voc):
    """The eval commands end to end on the VOC photo with its real labels and instance masks."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    Image.fromarray(voc["rgb"]).save(images / "voc.png")
    # The real labels made background / object: the random tiny model votes one class for every segment,
    # and among VOC's 21 it is one the photo lacks (every figure 0); of these two, either is in the photo.
    lab = np.where(voc["class_label"] < 0, 255, voc["class_label"] > 0).astype("uint8")
    Image.fromarray(lab).save(labels / "voc.png")
    (tmp_path / "classes.txt").write_text("background\nobject\n")
    preds = tmp_path / "preds"
    r = run(["--preset", "tiny", "eval", "semseg", str(images), str(labels), "--classes", str(tmp_path / "classes.txt"), "--json",
             "--save-preds", str(preds)], tmp_path / "data")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["images"] == 1 and res["segments"] > 0
    # The figures are what the saved prediction scores against the truth, recomputed here; the
    # prediction's unlabeled pixels (255: no segment covers them) are the misses it reports.
    pacc, miou = pixel_scores(preds, labels, 2)
    assert pacc > 0 and res["pAcc"] == pytest.approx(pacc, abs=1e-9) and res["mIoU"] == pytest.approx(miou, abs=1e-9)
    pred = np.asarray(Image.open(preds / "voc.png"))
    assert res["unlabeled_pixels"] == int(((pred == 255) & (lab != 255)).sum())

    from pycocotools import mask as mask_utils

    anns = []
    for i, (m, c) in enumerate(zip(voc["masks"], voc["labels"])):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        anns.append({"id": i + 1, "image_id": 1, "category_id": int(c), "iscrowd": 0, "area": int(m.sum()),
                     "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                     "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    coco = {"images": [{"id": 1, "file_name": "voc.png", "height": voc["rgb"].shape[0], "width": voc["rgb"].shape[1]}],
            "annotations": anns,
            "categories": [{"id": c, "name": voc["class_names"][c]} for c in sorted(set(int(x) for x in voc["labels"]))]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    # IoU 0.2: the tiny SAM's masks reach 0.5 with no instance, and recall would be 0 for every k.
    r = run(["--preset", "tiny", "eval", "retrieval", str(images), str(tmp_path / "instances.json"), "--json", "--iou", "0.2"],
            tmp_path / "data")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["images"] == 1
    # One query per annotated class, named by it, with its instance count; recall@k is the share of
    # queries whose first hit on an instance of their class is at rank k or better.
    n_gt = {c: list(voc["labels"]).count(c) for c in sorted(set(int(x) for x in voc["labels"]))}
    assert [(q["category_id"], q["text"], q["instances"]) for q in res["per_query"]] == [
        (c, voc["class_names"][c], n) for c, n in n_gt.items()]
    first = [q["first_correct_rank"] for q in res["per_query"]]
    assert any(first) and not all(first)
    for k in (1, 5, 10):
        assert res[f"recall@{k}"] == pytest.approx(100 * np.mean([f is not None and f <= k for f in first]), abs=1e-9)
