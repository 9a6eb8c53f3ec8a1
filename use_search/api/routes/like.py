"""More like an uploaded image (or the segment under a point of it): the worker segments and embeds
it with the store's model, then the store is searched with that vector."""

from __future__ import annotations

from typing import Any, Literal, Optional

import numpy as np
from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from use_search.api.errors import DATA, errors
from use_search.api.forms import StrictJSONRoute, check_form_parts, read_upload
from use_search.api.routes.search import hits_json, images_json
from use_search.api.schemas import SearchOut
from use_search.api.state import AppState, Config, State
from use_search.imaging import probe
from use_search.query import forms

router = APIRouter(route_class=StrictJSONRoute)


@router.post("/search/image", response_model=SearchOut, responses=errors(*DATA, 400, 413), operation_id="search_image")
async def search_image(
    request: Request,
    st: State,
    config: Config,
    file: UploadFile = File(..., description="The image to find more like."),
    x: Optional[int] = Form(None, ge=0, description="With y: the segment under this pixel (image's own pixels); without: the whole image."),
    y: Optional[int] = Form(None, ge=0),
    k: int = Form(10, ge=1, le=200, description="Number of hits (of images with group)."),
    min_score: Optional[float] = Form(None, ge=-1.0, le=1.0, allow_inf_nan=False, description="Drop hits below this cosine score."),
    group: Optional[Literal["image"]] = Form(None, description="image: one row per image with its best segments."),
) -> dict[str, Any]:
    """Segments (or images) most like the uploaded image's segment under (x, y), or the whole image.
    The image is segmented at the working size; a point no mask covers is a 422."""
    await check_form_parts(request, "/search/image")
    if (x is None) != (y is None):
        raise HTTPException(422, "give both x and y (the segment under that pixel), or neither (the whole image)")
    data = await read_upload(file, config.upload_limit)
    point = None if x is None or y is None else (x, y)
    return await run_in_threadpool(like_job, st, data, point, k, min_score, group)


def like_job(st: AppState, data: bytes, point: tuple[int, int] | None, k: int, min_score: Optional[float],
             group: Optional[str]) -> dict[str, Any]:
    probe(data, st.settings.api.max_pixels)
    store = st.require_store()
    if store.dim is None:
        return {"hits": [], "count": 0, **({"images": []} if group else {})}
    vector = np.asarray(st.worker.run("like", data, point), dtype=np.float32)
    ask = forms.Ask(like_vectors=[vector], min_score=min_score)
    searcher = st.searcher()
    with st.store_lock:
        if group:
            return images_json(st, forms.images(searcher, ask, k, st.settings.query.per_image))
        return hits_json(st, forms.segments(searcher, ask, k))
