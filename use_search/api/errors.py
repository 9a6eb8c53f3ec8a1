"""Errors: every error answer is ``{"detail": str}`` (+ ``"errors"`` on 422), and how the OpenAPI
document names the error answers of each route."""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from use_search.api.schemas import ErrorOut
from use_search.api.worker import JobInputError, WorkerBusy, WorkerFailed, WorkerTimeout
from use_search.imaging import PixelBudgetError
from use_search.indexer.read import ImageReadError
from use_search.store.base import StoreError

ERROR_TEXT = {
    400: "Not a usable image, or a malformed request.", 401: "Missing or wrong API key (header X-API-Key).",
    403: "Cross-origin request refused.", 404: "No such segment / image.",
    409: "Conflicts with what is indexed.", 410: "The indexed file cannot be read any more.",
    413: "Body or image over the limit.", 422: "Invalid parameters.",
    503: "Store unavailable, or the segmentation worker is busy / timed out.",
}
DATA = (401, 403, 422, 503)  # every data route can answer these
# A route that writes the store: its 503 also means a read-only store (one this server cannot write).
READ_ONLY = {503: {"model": ErrorOut, "description": ERROR_TEXT[503] + " Also: the store is read-only for this server."}}
PNG = {200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}, "description": "PNG image"}}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route that can answer ``codes``."""
    return {c: {"model": ErrorOut, "description": ERROR_TEXT[c]} for c in codes}


def jsonable(value: Any, depth: int = 0) -> Any:
    """What a 422 echoes back, made safe for strict JSON: NaN/Inf, lone surrogates, bytes, huge inputs."""
    if depth > 6:
        return "…"
    if isinstance(value, dict):
        return {str(jsonable(k, depth + 1)): jsonable(v, depth + 1) for k, v in list(value.items())[:50]}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, depth + 1) for v in list(value)[:50]]
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value if not isinstance(value, int) or abs(value) < 2**63 else str(value)[:40]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    text = value if isinstance(value, str) else str(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= 200 else text[:200] + "…"


async def store_error(request: Request, exc: StoreError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=503)


async def image_error(request: Request, exc: ImageReadError) -> JSONResponse:
    if isinstance(exc, PixelBudgetError):
        return JSONResponse({"detail": f"{exc} (api.max_pixels)"}, status_code=413)
    return JSONResponse({"detail": f"not a usable image: {exc}"}, status_code=400)


async def job_input_error(request: Request, exc: JobInputError) -> JSONResponse:
    if exc.kind == "budget":
        return JSONResponse({"detail": f"{exc} (api.max_pixels)"}, status_code=413)
    if exc.kind == "image":
        return JSONResponse({"detail": f"not a usable image: {exc}"}, status_code=400)
    return JSONResponse({"detail": str(exc)}, status_code=422)


async def worker_error(request: Request, exc: Exception) -> JSONResponse:
    headers = {"Retry-After": "5"} if isinstance(exc, (WorkerBusy, WorkerTimeout)) else None
    return JSONResponse({"detail": str(exc)}, status_code=503, headers=headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errs = [{k: v for k, v in e.items() if k not in ("ctx", "url")} for e in exc.errors()]
    safe = jsonable(errs)
    first = safe[0] if safe else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":  # say what is wrong with the JSON, not only that it is
        msg = f"{msg}: {jsonable(exc.errors()[0].get('ctx', {}).get('error', ''))}"
    return JSONResponse({"detail": f"{where}: {msg}", "errors": safe}, status_code=422)


HANDLERS = {
    StoreError: store_error, ImageReadError: image_error, JobInputError: job_input_error,
    WorkerBusy: worker_error, WorkerTimeout: worker_error, WorkerFailed: worker_error,
    RequestValidationError: validation_error,
}


def add_error_handlers(app: FastAPI) -> None:
    for exc, handler in HANDLERS.items():
        app.add_exception_handler(exc, handler)  # type: ignore[arg-type]
