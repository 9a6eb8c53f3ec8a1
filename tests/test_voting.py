"""Voting (paper §4.3): equals a direct per-pixel numpy reference; the fallbacks for pixels no segment
covers (nearest labelled pixel, a whole-image voter, none) against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest

from use_search.config import VotingSettings
from use_search.masks import mask_bbox
from use_search.voting.combine import class_probabilities
from use_search.voting.png import label_png, read_label_png
from use_search.voting.predict import predict_labels, semantic_segmentation
from use_search.voting.vote import UNLABELED, fill_nearest, vote
from use_search.types import Segment


def reference_vote(masks: np.ndarray, probs: np.ndarray, prior: np.ndarray | None = None) -> np.ndarray:
    """The paper's rule written pixel by pixel, no vectorisation (``prior``: a voter on every pixel)."""
    n, h, w = masks.shape
    out = np.full((h, w), UNLABELED, dtype=np.int64)
    for y in range(h):
        for x in range(w):
            covering = [i for i in range(n) if masks[i, y, x]]
            if not covering and prior is None:
                continue
            total = np.zeros(probs.shape[1]) if prior is None else prior.astype(np.float64).copy()
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
    bare = VotingSettings(fallback="none", templates="train4")
    labels, masks = semantic_segmentation(pixels, classes, segmenter, embedder, bare)
    assert labels.shape == pixels.shape[:2]
    assert set(np.unique(labels)) <= {UNLABELED, 0, 1, 2}
    assert list(masks) == classes
    for i, name in enumerate(classes):
        assert masks[name].shape == labels.shape
        np.testing.assert_array_equal(masks[name], labels == i)
    # Same rule as vote() on the segmenter's own masks: without a fallback, uncovered pixels stay unlabeled.
    segments = segmenter.segment(pixels)
    assert segments
    covered = np.stack([s.mask for s in segments]).any(0)
    assert not covered.all()  # the tiny SAM leaves gaps, so the fallback has work to do
    np.testing.assert_array_equal(labels != UNLABELED, covered)
    # segment's default fallback (nearest labelled pixel) keeps every covered pixel and fills the rest.
    assert VotingSettings().fallback is None
    filled, _ = semantic_segmentation(pixels, classes, segmenter, embedder, VotingSettings(templates="train4"))
    np.testing.assert_array_equal(filled[covered], labels[covered])
    assert (filled != UNLABELED).all()
    np.testing.assert_array_equal(filled, fill_nearest(labels))


def reference_nearest(labels: np.ndarray) -> np.ndarray:
    """Brute force: every unlabeled pixel takes the label of a labelled pixel at the least Euclidean
    distance; where several are equally near, any of their labels is right, so report the set."""
    out = labels.copy()
    ys, xs = np.nonzero(labels >= 0)
    for y, x in zip(*np.nonzero(labels < 0)):
        d = (ys - y) ** 2 + (xs - x) ** 2
        nearest = set(labels[ys[d == d.min()], xs[d == d.min()]].tolist())
        out[y, x] = min(nearest) if len(nearest) == 1 else -2 - len(nearest)  # -2-k: a tie, k labels
    return out


def test_fill_nearest_matches_brute_force():
    rng = np.random.default_rng(3)
    labels = np.full((19, 23), UNLABELED, np.int32)
    for k in range(5):  # five labelled blobs of random rectangles
        y, x = rng.integers(0, 16), rng.integers(0, 20)
        labels[y : y + rng.integers(1, 5), x : x + rng.integers(1, 5)] = k
    filled = fill_nearest(labels)
    ref = reference_nearest(labels)
    assert (filled >= 0).all()
    exact = ref >= 0
    np.testing.assert_array_equal(filled[exact], ref[exact])
    for y, x in zip(*np.nonzero(~exact)):  # ties: the label is one of the equally near ones
        ys, xs = np.nonzero(labels >= 0)
        d = (ys - y) ** 2 + (xs - x) ** 2
        assert filled[y, x] in set(labels[ys[d == d.min()], xs[d == d.min()]].tolist())
    assert (fill_nearest(np.full((3, 3), UNLABELED)) == UNLABELED).all()  # nothing to copy from


@pytest.mark.parametrize("seed", [0, 1])
def test_vote_fill_labels_only_uncovered_pixels(seed):
    rng = np.random.default_rng(seed)
    n, c, h, w = 5, 4, 11, 9
    masks = rng.random((n, h, w)) < 0.2
    probs = rng.dirichlet(np.ones(c), size=n).astype(np.float32)
    labels = vote(masks, probs, fill=2)
    covered = masks.any(0)
    assert not covered.all()
    np.testing.assert_array_equal(labels[covered], reference_vote(masks, probs)[covered])
    assert (labels[~covered] == 2).all()
    # No segment at all: the fill labels everything.
    assert (vote(np.zeros((0, h, w), bool), np.zeros((0, c)), fill=1) == 1).all()


def test_whole_image_fallback_never_changes_a_covered_pixel():
    """The whole image's class fills the gaps only. It used to vote everywhere with weight 0.05, which
    decided near-ties on covered pixels too. By hand, on a 1×5 image: segment 0 covers pixels 0-1 with
    (0.51, 0.49), segment 1 pixels 1-2 with (0.5, 0.5), the whole image says (0.1, 0.9). Votes:
    pixel 0 → 0; pixel 1 sums (1.01, 0.99) → 0; pixel 2 ties (0.5, 0.5) → 0 (the lower index); pixels
    3-4 → the whole image's class 1. With the 0.05 × (0.1, 0.9) voter added everywhere, pixel 0 would
    sum (0.515, 0.535), pixel 1 (1.015, 1.035) and pixel 2 (0.505, 0.545): all three flipped to 1."""
    masks = np.zeros((2, 1, 5), bool)
    masks[0, 0, :2] = True
    masks[1, 0, 1:3] = True
    probs = np.array([[0.51, 0.49], [0.5, 0.5]], np.float32)
    whole = np.array([0.1, 0.9], np.float32)
    assert vote(masks, probs, fill=int(whole.argmax())).tolist() == [[0, 0, 0, 1, 1]]
    assert reference_vote(masks, probs, 0.05 * whole).tolist() == [[1, 1, 1, 1, 1]]  # the old rule


class FixedSegmenter:
    """A segmenter whose masks are given (SAM's are random on the tiny preset)."""

    def __init__(self, masks: list[np.ndarray]) -> None:
        self.masks = masks

    def segment(self, image: np.ndarray) -> list[Segment]:
        return [Segment(mask=m, bbox=mask_bbox(m), area=int(m.sum())) for m in self.masks]


def test_predict_labels_fallbacks_on_a_hand_example(photos, tiny_settings):
    """Two segments leaving a gap; the real tiny embedder. none: the gap is unlabeled; nearest: filled
    from its neighbours; image: filled with the class of the whole image taken as one more segment."""
    from use_search.factory import Runtime
    from use_search.indexer import read_image

    embedder = Runtime.from_settings(tiny_settings).embedder()
    pixels = read_image(photos["chelsea"], 10**8).pixels[:40, :50]
    a = np.zeros((40, 50), bool)
    a[:, :20] = True
    b = np.zeros((40, 50), bool)
    b[5:30, 15:35] = True  # overlaps a on columns 15-19; columns 35-49 are covered by neither
    seg = FixedSegmenter([a, b])
    classes = ["cat", "grass", "sky", "wall"]
    cv = embedder.embed_texts(classes)
    segs = seg.segment(pixels)
    p = class_probabilities(embedder.embed_segments(pixels, segs), cv, 100.0)

    none = predict_labels(pixels, seg, embedder, cv, fallback="none")
    np.testing.assert_array_equal(none.labels, reference_vote(np.stack([a, b]), p))
    assert none.segments == 2 and none.uncovered_pixels == none.unlabeled_pixels == int((~(a | b)).sum())

    nearest = predict_labels(pixels, seg, embedder, cv, fallback="nearest")
    assert nearest.unlabeled_pixels == 0 and nearest.uncovered_pixels == none.uncovered_pixels
    np.testing.assert_array_equal(nearest.labels, fill_nearest(none.labels))

    image = predict_labels(pixels, seg, embedder, cv, fallback="image")
    whole = Segment(mask=np.ones((40, 50), bool), bbox=(0, 0, 50, 40), area=2000)
    p_img = class_probabilities(embedder.embed_segments(pixels, [whole]), cv, 100.0)[0]
    np.testing.assert_array_equal(image.labels[a | b], none.labels[a | b])
    assert image.unlabeled_pixels == 0 and (image.labels[~(a | b)] == p_img.argmax()).all()
    assert (none.fallback, nearest.fallback, image.fallback) == ("none", "nearest", "image")

    with pytest.raises(ValueError, match="unknown fallback"):
        predict_labels(pixels, seg, embedder, cv, fallback="zeros")
