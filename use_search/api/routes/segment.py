"""Semantic segmentation by voting (paper §4.3) of an upload or an indexed image, in the worker."""

from __future__ import annotations

import base64
import uuid
from typing import Any, Literal, Optional

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from use_search.api.errors import DATA, errors
from use_search.api.forms import StrictJSONRoute, check_form_parts, read_upload, upload_name
from use_search.api.schemas import MAX_CLASS_CHARS, MAX_CLASSES, ClassNames, SegmentationOut, checked_text
from use_search.api.state import AppState, Config, State
from use_search.imaging import probe

router = APIRouter(route_class=StrictJSONRoute)


def class_names(classes: list[str]) -> list[str]:
    """The class names of the form's ``classes`` fields (each may be comma-separated), checked."""
    names = [c.strip() for item in classes for c in item.split(",") if c.strip()]
    if not names:
        raise HTTPException(422, "give at least one class name")
    if len(names) > MAX_CLASSES or len(set(names)) != len(names):
        raise HTTPException(422, f"class names must be distinct and at most {MAX_CLASSES}")
    for n in names:
        try:
            checked_text(n, "class name")
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        if len(n) > MAX_CLASS_CHARS:
            raise HTTPException(422, f"class names must be at most {MAX_CLASS_CHARS} characters")
    return names


@router.post("/segment", response_model=SegmentationOut, responses=errors(*DATA, 400, 404, 409, 410, 413),
             operation_id="segment_image")
async def segment_image(
    request: Request,
    st: State,
    config: Config,
    classes: list[ClassNames] = Form(
        ..., min_length=1, max_length=MAX_CLASSES,
        description="Class names: repeat the field, or one comma-separated value.",
    ),
    file: Optional[UploadFile] = File(None, description="The image (or give image_id)."),
    image_id_: Optional[uuid.UUID] = Form(None, alias="image_id", description="An indexed image (or send file)."),
    labels_format: Literal["base64", "none"] = Form("base64"),
) -> dict[str, Any]:
    """Semantic segmentation by voting (paper §4.3) of an upload or an indexed image.

    The image is segmented at the working size (long side at most SAM's input, 1024 px for the
    real models): the label map and masks are at ``width`` × ``height``; ``image_width`` ×
    ``image_height`` is the image's own size."""
    await check_form_parts(request, "/segment")
    names = class_names(classes)
    if (file is None) == (image_id_ is None):
        raise HTTPException(422, "send exactly one of: an image file (field 'file') or 'image_id'")
    if file is not None:
        data = await read_upload(file, config.upload_limit)
        source: dict[str, Any] = {"filename": upload_name(file.filename)}
    else:
        entry = await run_in_threadpool(st.image_entry, image_id_)
        data = await run_in_threadpool(st.stored_bytes, entry)
        source = {"image_id": image_id_, "path": entry.path}
    out = await run_in_threadpool(segment_job, st, data, names, labels_format == "base64")
    return {**source, **out, "classes": names, "unlabeled_value": 255}


def segment_job(st: AppState, data: bytes, names: list[str], with_png: bool) -> dict[str, Any]:
    probe(data, st.settings.api.max_pixels)  # not an image / too many pixels: refused before it takes a queue slot
    out = st.worker.run("segment", data, names, with_png)
    if with_png:
        out["labels_png"] = base64.b64encode(out["labels_png"]).decode()
    return out
