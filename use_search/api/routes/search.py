"""Text search over the segments (the fast path: the text tower, then one store call)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException

from use_search.api.errors import DATA, errors
from use_search.api.forms import StrictJSONRoute
from use_search.api.schemas import Filters, SearchOut, SearchRequest
from use_search.api.state import AppState, State
from use_search.query import forms
from use_search.query.forms import Ask
from use_search.store.base import SearchFilter, image_id
from use_search.types import Hit

router = APIRouter(route_class=StrictJSONRoute)


def hit_json(h: Hit, filename: str) -> dict[str, Any]:
    img = image_id(h.path)
    return {
        **h.to_json(), "image_id": img, "filename": filename,
        "mask_url": f"/segments/{h.id}/mask.png",
        "overlay_url": f"/images/{img}/overlay.png?segment={h.id}",
    }


@router.post("/search", response_model=SearchOut, responses=errors(*DATA, 400, 404, 413), operation_id="search")
def search(body: SearchRequest, st: State) -> dict[str, Any]:
    """Segments for a text and/or stored segments (``like``), with negatives (``not``); images showing
    every phrase (``all``, minus ``none``); one row per image (``group``). See ``use_search.query.forms``."""
    f = body.filters or Filters()
    flt = SearchFilter(path=f.path, under=f.under)
    store = st.require_store()
    if store.dim is None:
        return {"hits": [], "count": 0, **({"images": []} if body.all or body.group else {})}
    if body.all is None and body.like is None and body.not_ is None and body.group is None:
        searcher = st.searcher()
        with st.text_lock:
            vector = searcher.embed(body.text)
        with st.store_lock:
            hits = searcher.search_vector(
                vector, body.k, None if flt.is_empty() else flt, body.min_score, body.dedup, body.masks
            )
        return hits_json(st, hits, body.masks)
    ask = Ask(texts=[body.text] if body.text else [], like=[str(r.segment_id) for r in body.like or []],
              negatives=body.not_ or [], other_images=body.other_images, flt=flt, min_score=body.min_score,
              max_items=st.settings.query.max_phrases)
    return run_forms(st, body, ask)


def run_forms(st: AppState, body: SearchRequest, ask: Ask) -> dict[str, Any]:
    """A query form, its input errors as 404 (an unknown segment) or 422 (anything else)."""
    qs = st.settings.query
    searcher = st.searcher()
    try:
        with st.text_lock, st.store_lock:
            if body.all is not None:
                matches = forms.all_of(searcher, body.all, body.none or [], body.k, ask.flt, body.min_score,
                                       qs.all_candidates, qs.max_phrases)
            elif body.group is not None:
                matches = forms.images(searcher, ask, body.k, body.per_image)
            else:
                return hits_json(st, forms.segments(searcher, ask, body.k, body.dedup), body.masks)
    except forms.UnknownSegmentError as e:
        raise HTTPException(404, str(e)) from None
    except forms.QueryInputError as e:
        raise HTTPException(422, str(e)) from None
    return images_json(st, matches)


def hits_json(st: AppState, hits: list[Hit], masks: bool = True) -> dict[str, Any]:
    """``masks=False``: the hits without their ``rle`` (the fast path does not even read them)."""
    names = st.filenames({h.path for h in hits})
    rows = [hit_json(h, names[h.path]) for h in hits]
    return {"hits": rows if masks else [{**r, "rle": None} for r in rows], "count": len(hits)}


def images_json(st: AppState, matches: list[forms.ImageMatch]) -> dict[str, Any]:
    names = st.filenames({h.path for m in matches for h in m.segments})
    rows = [
        {"image_id": image_id(m.path), "path": m.path, "filename": names[m.path], "sha256": m.sha256, "score": m.score,
         "segments": [hit_json(h, names[h.path]) for h in m.segments], **({"phrases": m.phrases} if m.phrases else {})}
        for m in matches
    ]
    return {"hits": [], "count": len(rows), "images": rows}
