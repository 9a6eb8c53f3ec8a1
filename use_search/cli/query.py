"""``use-search query``: segments for a text, more like a segment or an image, with negatives; images
showing several things (``--all`` / ``--none``); one row per image (``--group image``). The forms are
``use_search.query.forms``; this module parses flags and prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from use_search.cli.shell import app, banner, err, out, state
from use_search.cli.shell import open_store as _open_store
from use_search.cli.shell import store_label as _store_label

if TYPE_CHECKING:
    from use_search.query.forms import Ask, ImageMatch
    from use_search.types import Hit


@app.command(
    epilog="Exit codes: 0 the hits are printed (none when none passes --min-score); 2 a usage or setup error: "
    "an empty store, --image / --under naming a missing path or one with nothing indexed, an unknown --like "
    "id, a --like-image point no mask covers, missing weights. Scores: README, \"Queries\"."
)
def query(
    text: Optional[str] = typer.Argument(None, help="What to look for, e.g. \"car's license plate\"."),
    k: int = typer.Option(10, "-k", "--top", help="Number of results (images for --all / --group)."),
    like: list[str] = typer.Option([], "--like", help="More like this stored segment (an id from --json); repeatable."),
    like_image: Optional[str] = typer.Option(None, "--like-image", help="More like FILE (whole image) or FILE@X,Y (the segment under that pixel)."),
    other_images: bool = typer.Option(False, "--other-images", help="With --like: leave out the segments of the examples' images."),
    negatives: list[str] = typer.Option([], "--not", help="A negative text: subtracts its cosine from the score; repeatable."),
    all_: list[str] = typer.Option([], "--all", help="Images with a segment for every such phrase; repeatable."),
    none: list[str] = typer.Option([], "--none", help="With --all: drop images with a segment scoring --min-score or more for it."),
    group: Optional[str] = typer.Option(None, "--group", help="image: one row per image with its best segments."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line instead of a table."),
    save: Optional[Path] = typer.Option(None, "--save", help="Write overlay PNGs of the hit masks here."),
    image: Optional[Path] = typer.Option(None, "--image", help="Only segments of this image."),
    under: Optional[Path] = typer.Option(None, "--under", help="Only images under this folder."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Drop hits below this score (a cosine for one text or example)."),
    dedup: bool = typer.Option(False, "--dedup", help="One hit per overlapping group of masks on an image."),
) -> None:
    """Search the store: TEXT, and/or --like / --like-image examples, with --not negatives; or --all phrases."""
    from use_search.factory import Runtime
    from use_search.query import forms
    from use_search.query.search import Searcher
    from use_search.store.base import SearchFilter, StoreError

    _check_flags(text, like, like_image, negatives, all_, none, group, min_score)
    rt = Runtime.from_settings(state.settings)
    rt.preflight(("text",))
    flt = SearchFilter(path=str(image.absolute()) if image else None, under=str(under.absolute()) if under else None)
    example = _image_example(rt, like_image) if like_image else None
    embedder = rt.query_embedder()  # CLIP's text tower only: a model problem shows before the store is opened
    ask = forms.Ask(texts=[text] if text else [], like=like, like_vectors=[example] if example is not None else [],
                    negatives=negatives, other_images=other_images, flt=flt, min_score=min_score,
                    max_items=state.settings.query.max_phrases)
    with _open_store(writable=False) as store:
        if store.dim is None or store.count_segments() == 0:
            raise StoreError(f"the store at {_store_label()} is empty: run `use-search index FOLDER` first")
        banner(embedder.untrained)
        if not flt.is_empty() and store.count_segments(flt) == 0:
            raise StoreError(_nothing_indexed(image, under))
        searcher = Searcher(store, embedder)
        if all_ or group:
            matches = _images(searcher, ask, all_, none, k)
        elif like or example is not None or negatives:
            hits = forms.segments(searcher, ask, k, dedup)
        else:
            # The table shows no mask: the search leaves them out; --json and --save need them.
            hits = searcher.search(text, k, None if flt.is_empty() else flt, min_score, dedup,  # type: ignore[arg-type]
                                   masks=bool(as_json or save))
    if all_ or group:
        _print_images(matches, as_json, save, f"{len(matches)} images for " + _title(text, like, example, all_))
    else:
        _print_hits(hits, as_json, save, f"{len(hits)} segments for " + _title(text, like, example, all_))


def _check_flags(text: Optional[str], like: Sequence[str], like_image: Optional[str], negatives: Sequence[str],
                 all_: Sequence[str], none: Sequence[str], group: Optional[str], min_score: Optional[float]) -> None:
    from use_search.query.forms import QueryInputError

    if all_ and (text or like or like_image or negatives or group):
        raise QueryInputError("--all cannot be combined with TEXT, --like, --like-image, --not or --group")
    if not (text or like or like_image or all_):
        raise QueryInputError("give TEXT, --like SEGMENT_ID, --like-image FILE or --all PHRASE")
    if none and (not all_ or min_score is None):
        raise QueryInputError("--none needs --all and --min-score")
    if group not in (None, "image"):
        raise QueryInputError(f"--group takes 'image', not {group!r}")


def _image_example(rt, value: str):  # type: ignore[no-untyped-def]
    """The vector of --like-image FILE[@X,Y], by the store's model (the image side and, for a point, SAM)."""
    from use_search.indexer.read import max_file_bytes, read_file
    from use_search.query.forms import parse_image_point, upload_vector

    path, point = parse_image_point(value)
    s = state.settings
    data, _ = read_file(Path(path), max_file_bytes(s.max_image_pixels))
    return upload_vector(data, rt.embedder(), rt.segmenter(), point, s.max_image_pixels, s.work_side)


def _images(searcher, ask: "Ask", all_: Sequence[str], none: Sequence[str], k: int) -> "list[ImageMatch]":  # type: ignore[no-untyped-def]
    from use_search.query import forms

    qs = state.settings.query
    if all_:
        return forms.all_of(searcher, all_, none, k, ask.flt, ask.min_score, qs.all_candidates, qs.max_phrases)
    return forms.images(searcher, ask, k, qs.per_image)


def _title(text: Optional[str], like: Sequence[str], example, all_: Sequence[str]) -> str:  # type: ignore[no-untyped-def]
    parts = [f"“{escape(text)}”"] if text else []
    parts += [f"like {i}" for i in like] + (["like the image"] if example is not None else [])
    parts += [" + ".join(f"“{escape(p)}”" for p in all_)] if all_ else []
    return ", ".join(parts)


def _save(save: Optional[Path], rank: int, h: "Hit") -> Optional[str]:
    from use_search.query.render import hit_overlay

    if not save:
        return None
    save.mkdir(parents=True, exist_ok=True)
    dest = save / f"{rank:02d}-{Path(h.path).stem}-seg{h.segment_index}.png"
    try:
        hit_overlay(h, state.settings.max_image_pixels).save(dest)
    except (OSError, ValueError) as e:
        err.print(f"[yellow]cannot render[/] {escape(h.path)}: {escape(str(e))}")
        return None
    return str(dest)


def _print_hits(hits: "list[Hit]", as_json: bool, save: Optional[Path], title: str) -> None:
    saved = {h.id: _save(save, rank, h) for rank, h in enumerate(hits, 1)}
    if as_json:
        for rank, h in enumerate(hits, 1):
            print(json.dumps({"rank": rank, **h.to_json(), **({"overlay": saved[h.id]} if saved[h.id] else {})}))
        return
    t = Table(title=title)
    for col in ("rank", "score", "image", "segment", "bbox (x,y,w,h)", "area"):
        t.add_column(col, justify="right" if col in ("rank", "score", "area", "segment") else "left")
    for rank, h in enumerate(hits, 1):
        t.add_row(str(rank), f"{h.score:.4f}", escape(h.path), str(h.segment_index), ",".join(map(str, h.bbox)), str(h.area))
    _table(t, [h.path for h in hits])
    if save:
        err.print(f"overlays written to {save}")


def _print_images(matches: "list[ImageMatch]", as_json: bool, save: Optional[Path], title: str) -> None:
    for rank, m in enumerate(matches, 1):
        for h in m.segments:
            _save(save, rank, h)
    if as_json:
        for rank, m in enumerate(matches, 1):
            print(json.dumps({"rank": rank, **m.to_json()}))
        return
    t = Table(title=title)
    for col in ("rank", "score", "image", "segments (score)"):
        t.add_column(col, justify="right" if col in ("rank", "score") else "left")
    for rank, m in enumerate(matches, 1):
        names = m.phrases or [""] * len(m.segments)
        segs = ", ".join(f"{escape(p) + ': ' if p else ''}seg {h.segment_index} ({h.score:.4f})" for p, h in zip(names, m.segments))
        t.add_row(str(rank), f"{m.score:.4f}", escape(m.path), segs)
    _table(t, [m.path for m in matches])
    if save:
        err.print(f"overlays written to {save}")


def _table(t: Table, paths: Sequence[str]) -> None:
    # Piped or redirected: wide enough for whole paths (a terminal's table cuts them to fit).
    (out if out.is_terminal else Console(width=max(out.width, 160 + max((len(p) for p in paths), default=0)))).print(t)


def _nothing_indexed(image: Optional[Path], under: Optional[Path]) -> str:
    """Why ``--image`` / ``--under`` match no segment: the path is not there, or nothing is indexed there."""
    for opt, path, there in (("--image", image, image and image.is_file()), ("--under", under, under and under.is_dir())):
        if path is not None and not there:
            return f"{opt} {path}: no such {'file' if opt == '--image' else 'folder'}"
    where = f"{image}" if image else f"under {under}"
    return f"nothing is indexed {'for ' if image else ''}{where} in {_store_label()}: run `use-search index {image or under}` first"
