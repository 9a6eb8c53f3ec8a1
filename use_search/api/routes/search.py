"""Text search over the segments (the fast path: the text tower, then one store call)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from use_search.api.errors import DATA, errors
from use_search.api.forms import StrictJSONRoute
from use_search.api.schemas import Filters, SearchOut, SearchRequest
from use_search.api.state import State
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


@router.post("/search", response_model=SearchOut, responses=errors(*DATA, 400, 413), operation_id="search")
def search(body: SearchRequest, st: State) -> dict[str, Any]:
    f = body.filters or Filters()
    flt = SearchFilter(path=f.path, under=f.under)
    store = st.require_store()
    if store.dim is None:
        return {"hits": [], "count": 0}
    searcher = st.searcher()
    with st.text_lock:
        vector = searcher.embed(body.text)
    with st.store_lock:
        hits = searcher.search_vector(vector, body.k, None if flt.is_empty() else flt, body.min_score, body.dedup, body.masks)
    names = st.filenames({h.path for h in hits})
    return {"hits": [hit_json(h, names[h.path]) for h in hits], "count": len(hits)}
