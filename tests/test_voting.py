"""Voting (paper §4.3): equals a direct per-pixel numpy reference; uncovered pixels are unlabeled."""

from __future__ import annotations

import numpy as np
import pytest

from use_search.query.voting import (
    UNLABELED,
    class_probabilities,
    label_png,
    read_label_png,
    semantic_segmentation,
    vote,
)


def reference_vote(masks: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """The paper's rule written pixel by pixel, no vectorisation."""
    n, h, w = masks.shape
    out = np.full((h, w), UNLABELED, dtype=np.int64)
    for y in range(h):
        for x in range(w):
            covering = [i for i in range(n) if masks[i, y, x]]
            if not covering:
                continue
            total = np.zeros(probs.shape[1])
            for i in covering:
                total += probs[i]
            out[y, x] = int(np.argmax(total))
    return out


def test_vote_hand_made_segments():
    h, w = 6, 8
    masks = np.zeros((3, h, w), bool)
    masks[0, :, :4] = True  # left half
    masks[1, 2:5, 2:7] = True  # a box over the middle
    masks[2, 0:2, 5:8] = True  # top-right corner
    probs = np.array([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.2, 0.5, 0.3]], np.float32)
    labels = vote(masks, probs)
    np.testing.assert_array_equal(labels, reference_vote(masks, probs))
    # Spelled out: left half alone → 0; overlap of 0 and 1 → sums (0.7, 0.5, 0.8) → 2; box alone → 2;
    # corner → 1; the rest (rows 5 right, rows 2-4 col 7 etc.) no segment → unlabeled.
    assert labels[0, 0] == 0 and labels[3, 3] == 2 and labels[3, 5] == 2 and labels[0, 6] == 1
    assert labels[5, 6] == UNLABELED and labels[3, 7] == UNLABELED
    assert labels.dtype == np.int32 and labels.shape == (h, w)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vote_matches_reference_random(seed):
    rng = np.random.default_rng(seed)
    n, c, h, w = 7, 5, 13, 17
    masks = rng.random((n, h, w)) < 0.25
    masks[:, 0, 0] = False  # at least one pixel nobody covers
    logits = rng.normal(size=(n, c)) * 3
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    labels = vote(masks, probs)
    ref = reference_vote(masks, probs)
    np.testing.assert_array_equal(labels, ref)
    assert labels[0, 0] == UNLABELED
    np.testing.assert_array_equal(labels == UNLABELED, ~masks.any(0))


def test_vote_no_segments_and_shape_errors():
    assert (vote(np.zeros((0, 3, 4), bool), np.zeros((0, 2))) == UNLABELED).all()
    with pytest.raises(ValueError):
        vote(np.zeros((2, 3, 4), bool), np.zeros((3, 2)))


def test_class_probabilities_softmax_with_scale():
    rng = np.random.default_rng(0)
    seg = rng.normal(size=(4, 8))
    cls = rng.normal(size=(3, 8))
    for scale in (1.0, 100.0):
        p = class_probabilities(seg * 5, cls, scale)  # unnormalised input is normalised
        sn = seg / np.linalg.norm(seg, axis=1, keepdims=True)
        cn = cls / np.linalg.norm(cls, axis=1, keepdims=True)
        z = scale * sn @ cn.T
        ref = np.exp(z - z.max(1, keepdims=True))
        ref /= ref.sum(1, keepdims=True)
        np.testing.assert_allclose(p, ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)


def test_label_png_roundtrip():
    labels = np.array([[0, 1, UNLABELED], [2, UNLABELED, 0]], np.int32)
    np.testing.assert_array_equal(read_label_png(label_png(labels)), labels)
    many = np.array([[300, UNLABELED, 0]], np.int32)  # >255 classes → 16-bit PNG
    np.testing.assert_array_equal(read_label_png(label_png(many)), many)


def test_semantic_segmentation_tiny_preset_on_photo(photos, tiny_settings):
    """A real (random-weight) run: shapes and consistency only, never quality."""
    from use_search.factory import Runtime
    from use_search.indexer import read_image

    rt = Runtime.from_settings(tiny_settings)
    segmenter, embedder = rt.segmenter(), rt.embedder()
    pixels = read_image(photos["chelsea"], 10**8).pixels
    classes = ["cat", "grass", "sky"]
    labels, masks = semantic_segmentation(pixels, classes, segmenter, embedder)
    assert labels.shape == pixels.shape[:2]
    assert set(np.unique(labels)) <= {UNLABELED, 0, 1, 2}
    assert list(masks) == classes
    for i, name in enumerate(classes):
        assert masks[name].shape == labels.shape
        np.testing.assert_array_equal(masks[name], labels == i)
    # Same rule as vote() on the segmenter's own masks.
    segments = segmenter.segment(pixels)
    assert segments
    covered = np.stack([s.mask for s in segments]).any(0)
    np.testing.assert_array_equal(labels != UNLABELED, covered)
