"""Grounding: box → noun phrase by the box's highest-probability token (paper §3.1), thresholds, NMS."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch

from use_search.curation.grounding import (
    GroundingDinoGrounder,
    best_token_phrases,
    cxcywh_to_xyxy,
    load_grounder,
    select_grounded_boxes,
)
from use_search.curation.phrases import load_phrase_extractor
from use_search.curation.tiny import build_tiny_grounding_dino
from use_search.weights import MissingWeightsError

PAPER_SENTENCE = (
    "There is an orange-red apple at the right side of the rabbit and there is another red apple "
    "visible behind the rabbit."
)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_grounding_dino()


@pytest.fixture(scope="module")
def extractor():
    return load_phrase_extractor()


def tokenize(tokenizer, text):
    enc = tokenizer(text, return_offsets_mapping=True)
    return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]


def token_at(text, offsets, word, occurrence=0):
    """Index of the token that starts the ``occurrence``-th ``word`` in ``text``."""
    start = -1
    for _ in range(occurrence + 1):
        start = text.index(word, start + 1)
    return next(i for i, (s, e) in enumerate(offsets) if s == start and e > s)


def test_tiny_tokenizer_keeps_grounding_dinos_special_ids(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids(["[PAD]", "[CLS]", "[SEP]", ".", "?"]) == [0, 101, 102, 1012, 1029]
    ids, offsets = tokenize(tok, "A giraffe, eating.")
    assert ids[0] == 101 and ids[-1] == 102 and 1012 in ids
    assert offsets[0] == (0, 0) and offsets[-1] == (0, 0)


def test_boxes_go_to_the_phrase_holding_their_best_token(tiny, extractor):
    tok = tiny[1].tokenizer
    ids, offsets = tokenize(tok, PAPER_SENTENCE)
    phrases = extractor(PAPER_SENTENCE)
    spans = [(p.start, p.end) for p in phrases]
    assert [p.text for p in phrases] == [
        "an orange-red apple", "the right side", "the rabbit", "another red apple", "the rabbit",
    ]
    t = lambda word, k=0: token_at(PAPER_SENTENCE, offsets, word, k)  # noqa: E731
    probs = torch.full((8, len(ids)), 0.01)
    boxes = torch.tensor([
        [10, 10, 50, 50], [60, 10, 90, 40], [100, 100, 140, 150], [0, 0, 30, 30],
        [5, 5, 20, 20], [10, 10, 50, 50], [11, 10, 51, 50], [70, 70, 90, 90],
    ], dtype=torch.float32)
    probs[0, t("apple")] = 0.90
    probs[0, 0] = 0.99  # [CLS] never counts
    probs[1, t("side")] = 0.80
    probs[2, t("rabbit", 1)] = 0.70  # the second "the rabbit"
    probs[3, t("is")] = 0.95  # best token outside every noun phrase: dropped ...
    probs[3, t("apple")] = 0.50  # ... even though a phrase token also scores
    probs[4, t("apple")] = 0.04  # under the 0.05 box threshold
    probs[5, t("apple", 1)] = 0.60  # same box as 0, other phrase: both kept
    probs[6, t("orange")] = 0.85  # IoU 0.95 with box 0, same phrase, lower score: suppressed
    probs[7, t("visible")] = 0.75  # in the expression "another red apple visible ...", not in a noun phrase

    scores, tokens, matched = best_token_phrases(probs, offsets, spans)
    assert matched == [0, 1, 4, None, 0, 3, 0, None]
    assert tokens[0].item() == t("apple") and scores[0].item() == pytest.approx(0.90)

    out = select_grounded_boxes(probs, boxes, offsets, spans, box_threshold=0.05, nms_threshold=0.7)
    assert [(g.phrase_index, round(g.score, 2)) for g in out] == [(0, 0.9), (1, 0.8), (4, 0.7), (3, 0.6)]
    assert out[0].box == (10.0, 10.0, 50.0, 50.0) and out[3].box == out[0].box
    assert [phrases[g.phrase_index].expression for g in out] == [
        "an orange-red apple", "the right side of the rabbit", "the rabbit",
        "another red apple visible behind the rabbit",
    ]
    # With NMS off, the near-duplicate of box 0 comes back.
    out = select_grounded_boxes(probs, boxes, offsets, spans, box_threshold=0.05, nms_threshold=1.0)
    assert sorted(g.phrase_index for g in out) == [0, 0, 1, 3, 4]


def test_word_pieces_map_to_their_word_phrase(tiny, extractor):
    tok = tiny[1].tokenizer
    text = "A giraffe stands near a tree."
    ids, offsets = tokenize(tok, text)
    spans = [(p.start, p.end) for p in extractor(text)]
    assert [text[s:e] for s, e in spans] == ["A giraffe", "a tree"]
    piece = next(i for i, tk in enumerate(tok.convert_ids_to_tokens(ids)) if tk == "##f")  # gi-r-a-f-f-e
    probs = torch.zeros((1, len(ids)))
    probs[0, piece] = 0.3
    assert best_token_phrases(probs, offsets, spans)[2] == [0]


def test_cxcywh_to_pixels():
    out = cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 0.5, 1.0], [0.25, 0.1, 0.1, 0.2]]), (200, 100))
    torch.testing.assert_close(out, torch.tensor([[25.0, 0.0, 75.0, 200.0], [20.0, 0.0, 30.0, 40.0]]))


def test_tiny_grounding_dino_end_to_end_on_a_photo(tiny, extractor):
    grounder = GroundingDinoGrounder(*tiny, box_threshold=0.05, nms_threshold=0.7)
    image = skimage.data.chelsea()[::2, ::2].copy()
    caption = "An orange cat with white whiskers and green eyes."
    parsed = extractor.parse(caption)
    spans = [(p.start, p.end) for p in parsed.phrases]
    out = grounder.ground(image, caption, spans, parsed.sentences)
    assert out, "20 random queries should land on some phrase"
    _, offsets = tokenize(tiny[1].tokenizer, caption)
    for g in out:
        s, e = spans[g.phrase_index]
        assert s <= offsets[g.token_index][0] < e
        assert g.score > 0.05 and np.isfinite(g.box).all()
    assert grounder.ground(image, caption, []) == []


def test_long_captions_are_grounded_in_sentence_windows(tiny, extractor):
    grounder = GroundingDinoGrounder(*tiny)
    caption = " ".join(f"A cat number {i} is sleeping on a red sofa." for i in range(50))
    parsed = extractor.parse(caption)
    windows = grounder.windows(caption, parsed.sentences)
    assert len(windows) >= 2
    assert windows[0][0] == 0 and windows[-1][1] == len(caption)
    sentence_ends = {e for _, e in parsed.sentences}
    for ws, we in windows:
        assert we in sentence_ends
        assert grounder._n_tokens(caption[ws:we]) <= grounder.max_text_len - 2
    spans = [(p.start, p.end) for p in parsed.phrases]
    out = grounder.ground(skimage.data.coffee()[::4, ::4].copy(), caption, spans, parsed.sentences)
    first_window = sum(1 for s, e in spans if e <= windows[0][1])
    assert max(g.phrase_index for g in out) >= first_window  # phrases past the first window are grounded


def test_missing_real_models_are_clear_errors():
    with pytest.raises(MissingWeightsError, match="(?s)Grounding DINO 'use-search-tests/no-such-grounding-dino' is not in the Hugging Face cache.*hf download use-search-tests/no-such-grounding-dino"):
        load_grounder("use-search-tests/no-such-grounding-dino", offline=True)
    with pytest.raises(MissingWeightsError, match="no model folder at /nonexistent/grounding-dino"):
        load_grounder("/nonexistent/grounding-dino")


def test_a_saved_grounding_dino_loads_from_its_folder(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path / "gd")
    processor.save_pretrained(tmp_path / "gd")
    loaded = load_grounder(str(tmp_path / "gd"), offline=True)
    assert type(loaded.model).__name__ == "GroundingDinoForObjectDetection" and loaded.model_id == str(tmp_path / "gd")
    image = skimage.data.coffee()[::8, ::8].copy()
    caption, spans = "a cup of coffee.", [(0, 15)]
    reference = GroundingDinoGrounder(model, processor).ground(image, caption, spans)
    assert loaded.ground(image, caption, spans) == reference and reference
