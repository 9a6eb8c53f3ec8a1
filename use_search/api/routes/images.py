"""Indexed images: an image's record, its overlay PNG, and uploading (indexing) a new one."""

from __future__ import annotations

import uuid
from pathlib import PurePosixPath
from typing import Any, Optional

from fastapi import APIRouter, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from use_search.api.errors import DATA, PNG, READ_ONLY, errors
from use_search.api.forms import StrictJSONRoute, check_form_parts, read_upload, upload_name
from use_search.api.schemas import ImageOut, UploadOut
from use_search.api.state import AppState, Config, State
from use_search.api.uploads import index_upload
from use_search.imaging import decode_work
from use_search.indexer.read import ImageReadError
from use_search.query.render import draw_hit, draw_segments, png_bytes
from use_search.store.base import ImageEntry, SearchFilter
from use_search.types import Hit

router = APIRouter(route_class=StrictJSONRoute)


@router.get("/images/{img_id}", response_model=ImageOut, responses=errors(*DATA, 404), operation_id="get_image")
def get_image(img_id: uuid.UUID, st: State) -> dict[str, Any]:
    entry = st.image_entry(img_id)
    with st.store_lock:
        segs = sorted(st.require_store().scroll_segments(SearchFilter(path=entry.path)), key=lambda h: h.segment_index)
    return {
        "id": img_id, "path": entry.path, "filename": entry.filename or PurePosixPath(entry.path).name,
        "sha256": entry.sha256, "width": entry.width, "height": entry.height,
        "n_segments": entry.n_segments, "model": entry.model, "indexed_at": entry.indexed_at,
        "overlay_url": f"/images/{img_id}/overlay.png",
        "segments": [{"id": h.id, "segment_index": h.segment_index, "bbox": list(h.bbox), "area": h.area} for h in segs],
    }


@router.get("/images/{img_id}/overlay.png", response_class=Response, responses={**PNG, **errors(*DATA, 404, 409, 410)},
            operation_id="get_overlay")
async def image_overlay(st: State, img_id: uuid.UUID, segment: Optional[uuid.UUID] = Query(None)) -> Response:
    """The image (long side at most ``api.overlay_side``) with one segment, or all, drawn on it."""
    entry = await run_in_threadpool(st.image_entry, img_id)
    hit = await run_in_threadpool(st.segment, segment) if segment is not None else None
    if hit is not None and entry.path not in hit.paths:  # a content's segments belong to each of its paths
        raise HTTPException(404, f"segment {hit.id} is not on image {img_id}")
    async with st.render_slots:
        return Response(await run_in_threadpool(overlay_png, st, entry, hit), media_type="image/png")


def overlay_png(st: AppState, entry: ImageEntry, hit: Hit | None) -> bytes:
    """``hit`` (or, when None, every segment) over the indexed image, drawn by ``query.render``."""
    if hit is None:
        with st.store_lock:
            hits = list(st.require_store().scroll_segments(SearchFilter(path=entry.path)))
    data = st.stored_bytes(entry)
    try:
        img = decode_work(data, st.settings.max_image_pixels, st.settings.api.overlay_side)
    except ImageReadError as e:
        raise HTTPException(410, f"indexed image {entry.path} cannot be decoded any more: {e}") from None
    return png_bytes(draw_hit(img.pixels, hit) if hit is not None else draw_segments(img.pixels, hits))


@router.post("/images", status_code=201, response_model=UploadOut,
             responses={200: {"model": UploadOut, "description": "Already indexed (status 'exists')."},
                        **errors(*DATA, 400, 409, 413), **READ_ONLY}, operation_id="upload_image")
async def upload_image(request: Request, st: State, config: Config, file: UploadFile = File(...)) -> JSONResponse:
    """Upload an image and index it: segmented at the working size, masks stored at its own size."""
    st.require_writable()
    await check_form_parts(request, "/images")
    data = await read_upload(file, config.upload_limit)
    body = await run_in_threadpool(index_upload, st, config.uploads, data, upload_name(file.filename))
    return JSONResponse(body, status_code=201 if body["status"] == "indexed" else 200)
