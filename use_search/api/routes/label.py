"""Labels of the indexed images for a class list: §4.3 voting over the stored masks and vectors (no
segmenter, no image decode), a page of image records at a time."""

from __future__ import annotations

from itertools import islice
from typing import Any

from fastapi import APIRouter, HTTPException

from use_search.api.errors import DATA, errors
from use_search.api.forms import StrictJSONRoute
from use_search.api.schemas import ErrorOut, LabelOut, LabelRequest
from use_search.api.state import State
from use_search.store.base import SearchFilter

router = APIRouter(route_class=StrictJSONRoute)


NOT_INDEXED = {404: {"model": ErrorOut, "description": "Nothing is indexed under the folder asked for."}}


@router.post("/label", response_model=LabelOut, responses={**errors(*DATA, 400, 413), **NOT_INDEXED},
             operation_id="label_images")
def label_images(body: LabelRequest, st: State) -> dict[str, Any]:
    """Which classes each indexed image holds, their pixel areas (at the image's own size) and segments,
    from the masks and vectors stored at indexing time: a new class list costs dot products.

    Pages: ``limit`` image records (paths) from ``offset`` in the store's order; ``next_offset`` is the
    next page's ``offset`` (null after the last). An image indexed under several paths is labelled
    once, at its first path, so a page may hold fewer images than records. The masks are the stored
    ones: an image larger than SAM's input was segmented at the working size and its masks enlarged,
    which ``/segment`` on an upload (answered at the working size) does not do."""
    names = body.classes
    store = st.require_store()
    out: dict[str, Any] = {"classes": names, "fallback": body.fallback, "images": [], "next_offset": None}
    with st.store_lock:
        if store.dim is None or store.count_segments() == 0:
            return out
        if body.under is not None and store.count_segments(SearchFilter(under=body.under)) == 0:
            raise HTTPException(404, f"nothing is indexed under {body.under}")
    labeler = st.runtime.labeler(store, st.searcher().embedder, body.fallback)
    with st.store_lock:
        labeler.check(body.under)  # another model's vectors: 503, as /search
        records = list(islice(labeler.records(body.under, body.offset), body.limit + 1))
    with st.text_lock:
        vectors = labeler.class_vectors(names)
    for entry in records[: body.limit]:
        with st.store_lock:
            image = labeler.label_record(entry, names, vectors, body.under)
        if image is not None:
            out["images"].append(image.to_json())
    if len(records) > body.limit:
        out["next_offset"] = body.offset + body.limit
    return out
