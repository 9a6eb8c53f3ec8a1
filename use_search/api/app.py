"""HTTP API (FastAPI) over one store: search, segments, masks, overlays, upload+index, voting, metrics.

One process owns the embedded store (it is locked): the app opens it once in its lifespan.
Two paths that never wait for each other:
- search (and the other reads): the text tower under its own lock, the store lock held only for the
  store call itself;
- heavy work (``POST /segment``, ``POST /images``): a bounded queue into one worker process that owns
  SAM and the image embedder (``worker.py``); uploads are decoded at the segmenter's working size.
  Full: 503 at once; too slow: 503 and the worker is restarted.
The outer ASGI layer (``guard.py``) checks Host, Origin, API key and body size and keeps the metrics.
"""

from __future__ import annotations

import asyncio
import base64
import colorsys
import io
import ipaddress
import logging
import math
import os
import socket
import sys
import threading
import uuid
from contextlib import asynccontextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Optional

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageDraw
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from starlette.concurrency import run_in_threadpool

from use_search.api.guard import LOOPBACK_HOSTS, Guard, Metrics, Policy
from use_search.imaging import PixelBudgetError, decode_work, nearest_index, probe
from use_search.api.schemas import (
    MAX_CLASS_CHARS, MAX_CLASSES, ClassNames, ErrorOut, Filters, HealthOut, HitOut, ImageOut, SearchOut, SearchRequest, SegmentationOut,
    UploadOut, checked_text,
)
from use_search.api.worker import HeavyWorker, Indexed, JobInputError, WorkerBusy, WorkerFailed, WorkerTimeout
from use_search.config import Settings
from use_search.indexer.read import ImageReadError, max_file_bytes, read_file, sha256_bytes, stat_file
from use_search.indexer.runner import now_iso
from use_search.query.render import mask_png
from use_search.store.base import ImageEntry, SearchFilter, StoreError, VectorStore, image_id
from use_search.types import Hit

STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/health",)  # no key needed; the page and docs hold no data (their data calls need the key)
OPEN_PREFIXES = ("/static/",)
PAGE_PATHS = ("/", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc", "/favicon.ico")
UPLOAD_ROUTES = ("/images", "/segment")
MULTIPART_OVERHEAD = 64 * 1024  # form fields and part headers around an upload
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp", "MPO": "jpg"}
HIGHLIGHT = np.array([255, 64, 32], dtype=np.float32)


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "Not a usable image, or a malformed request.", 401: "Missing or wrong API key (header X-API-Key).",
        403: "Cross-origin request refused.", 404: "No such segment / image.",
        409: "Conflicts with what is indexed.", 410: "The indexed file cannot be read any more.",
        413: "Body or image over the limit.", 422: "Invalid parameters.",
        503: "Store unavailable, or the segmentation worker is busy / timed out.",
    }
    return {c: {"model": ErrorOut, "description": text[c]} for c in codes}


PNG = {200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}, "description": "PNG image"}}
DATA = (401, 403, 422, 503)  # every data route can answer these


# State --------------------------------------------------------------------------------------------
class AppState:
    def __init__(self, settings: Settings) -> None:
        from use_search.factory import Runtime

        self.settings = settings
        self.runtime = Runtime.from_settings(settings)
        self.store: VectorStore | None = None
        self.store_lock = threading.RLock()  # held for single store calls only
        self.text_lock = threading.Lock()  # the text tower (search's fast path)
        # PNGs drawn at once (overlays, masks): a full-size mask is 49 MB at 7000×7000. Waiters wait in
        # the event loop, not in the thread pool that every sync route (search too) runs in.
        self.render_slots = asyncio.Semaphore(2)
        self.worker = HeavyWorker(settings)  # SAM + image embedder, in a child process
        self._build_lock = threading.Lock()
        self._searcher = None

    def searcher(self):  # type: ignore[no-untyped-def]
        with self._build_lock:
            if self._searcher is None:
                from use_search.query.search import Searcher

                # CLIP's text tower alone: the image side lives in the worker process.
                self._searcher = Searcher(self.require_store(), self.runtime.query_embedder())
            return self._searcher

    def require_store(self) -> VectorStore:
        if self.store is None:
            raise StoreError("the store is not open")
        return self.store

    def image_entry(self, img_id: uuid.UUID) -> ImageEntry:
        with self.store_lock:
            store = self.require_store()
            entry = store.get_image_by_id(str(img_id)) if store.dim is not None else None
        if entry is None:
            raise HTTPException(404, f"no indexed image with id {img_id}")
        return entry

    def segment(self, seg_id: uuid.UUID) -> Hit:
        with self.store_lock:
            store = self.require_store()
            found = store.get_segments([str(seg_id)]) if store.dim is not None else []
        if not found:
            raise HTTPException(404, f"no segment with id {seg_id}")
        return found[0]

    def filenames(self, paths: set[str]) -> dict[str, str]:
        """Display names: an upload's original file name from its image record, else the file's name."""
        uploads = self.settings.data_dir / "uploads"
        names = {p: PurePosixPath(p).name for p in paths}
        for p in paths:
            if Path(p).parent == uploads:
                with self.store_lock:
                    entry = self.require_store().get_image(p)
                if entry is not None and entry.filename:
                    names[p] = entry.filename
        return names


def complete_upload(store: VectorStore, dest: Path, digest: str) -> ImageEntry | None:
    """The record of an upload that is fully indexed: record with this content, file in place."""
    entry = store.get_image(str(dest)) if store.dim is not None else None
    return entry if entry is not None and entry.sha256 == digest and dest.is_file() else None


def repair_uploads(store: VectorStore, uploads: Path) -> list[str]:
    """Undo uploads a killed server left half-written. An upload is written as ``<sha256>.<ext>.<nonce>.part``,
    then its segments and record, then renamed into place: a ``.part`` still there means that request
    never finished, so whatever it wrote goes (unless the same image was completed by another request).
    Returns the upload paths undone."""
    undone = []
    for part in sorted(uploads.glob("*.part")) if uploads.is_dir() else []:
        digest, ext = part.name.split(".")[:2]
        dest = uploads / f"{digest}.{ext}"
        if drop_unfinished(store, dest, digest):
            undone.append(str(dest))
        part.unlink(missing_ok=True)
    return undone


def drop_unfinished(store: VectorStore, dest: Path, digest: str) -> bool:
    """Delete what an upload to ``dest`` wrote, unless the upload is complete (another request of the
    same image may have finished it). True when it was unfinished."""
    if complete_upload(store, dest, digest) is not None:
        return False
    if store.dim is not None:
        store.delete_image(str(dest))
    return True


def undo_upload(st: AppState, dest: Path, digest: str, tmp: Path) -> None:
    """Drop what a failed upload wrote (unless another request completed the same image). When the store
    cannot be written (closing, failing), the .part file stays and the next start undoes it."""
    try:
        with st.store_lock:
            drop_unfinished(st.require_store(), dest, digest)
        tmp.unlink(missing_ok=True)
    except Exception:  # noqa: BLE001 - the request's own error is the one to report
        pass


def _state(request: Request) -> AppState:
    return request.app.state.use


def hit_json(h: Hit, filename: str) -> dict[str, Any]:
    img = image_id(h.path)
    return {
        **h.to_json(), "image_id": img, "filename": filename,
        "mask_url": f"/segments/{h.id}/mask.png",
        "overlay_url": f"/images/{img}/overlay.png?segment={h.id}",
    }


def upload_name(name: str | None) -> str | None:
    """An upload's file name for display: the last path component, printable, at most 255 characters."""
    if not name:
        return None
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable()).strip()
    try:
        base.encode("utf-8")
    except UnicodeEncodeError:
        base = base.encode("utf-8", "replace").decode("utf-8")
    return base[:255] or None


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _colour(i: int) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 1.0)
    return np.array([r, g, b], np.float32) * 255


def segments_overlay(pixels: np.ndarray, masks: list[np.ndarray]) -> Image.Image:
    """Every segment tinted in its own colour, large ones first so small ones stay visible."""
    out = pixels.astype(np.float32)
    for i in sorted(range(len(masks)), key=lambda j: -int(masks[j].sum())):
        m = masks[i]
        out[m] = out[m] * 0.5 + _colour(i) * 0.5
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def segment_overlay(pixels: np.ndarray, mask: np.ndarray, bbox: tuple[float, float, float, float]) -> Image.Image:
    """Dim everything outside the mask, tint the mask, outline its box (``query.render.overlay``'s look)."""
    out = pixels.astype(np.float32)
    out[~mask] *= 0.35
    out[mask] = out[mask] * 0.6 + HIGHLIGHT * 0.4
    img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    x, y, w, h = bbox
    ImageDraw.Draw(img).rectangle([x, y, max(x, x + w - 1), max(y, y + h - 1)], outline=(255, 220, 0), width=2)
    return img


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, settings: Settings) -> str | None:
    """The warning ``serve`` prints when anyone on the network could use the server without a key."""
    if is_loopback(host) or settings.api_key:
        return None
    return (
        f"Serving on {host} WITHOUT an API key: anyone who can reach this port can search your photos, "
        "upload images and run segmentation. Set USE_SEARCH_API_KEY, or serve on 127.0.0.1."
    )


def _jsonable(value: Any, depth: int = 0) -> Any:
    """What a 422 echoes back, made safe for strict JSON: NaN/Inf, lone surrogates, bytes, huge inputs."""
    if depth > 6:
        return "…"
    if isinstance(value, dict):
        return {str(_jsonable(k, depth + 1)): _jsonable(v, depth + 1) for k, v in list(value.items())[:50]}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in list(value)[:50]]
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value if not isinstance(value, int) or abs(value) < 2**63 else str(value)[:40]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    text = value if isinstance(value, str) else str(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= 200 else text[:200] + "…"


# App ----------------------------------------------------------------------------------------------
def create_app(
    settings: Settings, *, api_key: str | None = None, max_upload_bytes: int | None = None,
    bind_host: str | None = None,
) -> FastAPI:
    """The API app. ``api_key`` / ``max_upload_bytes`` override the settings' fields of those names;
    ``bind_host`` is the address served on (a loopback one restricts the Host header to loopback names)."""
    key = settings.api_key if api_key is None else api_key
    if key is not None and not key.strip():
        raise ValueError(
            "USE_SEARCH_API_KEY is set but empty: set a real key, or unset the variable to serve without one"
        )
    limit = max_upload_bytes or settings.max_upload_bytes
    api = settings.api
    uploads = settings.data_dir / "uploads"

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        st = AppState(settings)
        st.store = st.runtime.store()  # the exclusive lock is taken here, once
        for path in repair_uploads(st.store, uploads):
            logging.getLogger("uvicorn.error").warning("undid the unfinished upload %s (the server stopped during it)", path)
        app.state.use = st
        try:
            yield
        finally:
            await run_in_threadpool(st.worker.close)
            with st.store_lock:
                st.store.close()
                st.store = None

    app = FastAPI(
        title="use-search", version="0.1.0", lifespan=lifespan,
        description="Search image segments by text (USE: SAM segments, CLIP embeddings, Qdrant). "
        "When the server has an API key, every route but /health needs the header X-API-Key.",
    )

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    g_images = Gauge("use_search_images", "Indexed images in the store", registry=registry)
    g_segments = Gauge("use_search_segments", "Segments in the store", registry=registry)
    g_jobs = Gauge("use_search_worker_jobs", "Heavy jobs running or waiting", registry=registry)

    if api.allowed_hosts is not None:
        hosts: frozenset[str] | None = frozenset(h.lower().strip("[]") for h in api.allowed_hosts)
        if "*" in hosts:
            hosts = None
    else:
        loopback = bind_host is not None and is_loopback(bind_host)
        hosts = frozenset((*LOOPBACK_HOSTS, bind_host.strip("[]").lower())) if loopback else None
    policy = Policy(
        key=key,
        body_limit=lambda path: limit + MULTIPART_OVERHEAD if path in UPLOAD_ROUTES else api.max_body_bytes,
        is_open=lambda path: path in OPEN_PATHS or path in PAGE_PATHS or path.startswith(OPEN_PREFIXES),
        allowed_hosts=hosts,
        cors_origins=frozenset(api.cors_origins),
    )
    app.add_middleware(Guard, policy=policy, metrics=metrics, router=app.router)
    if api.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(api.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["X-API-Key", "Content-Type"],
        )

    # Errors: always {"detail": str} (+ "errors" on 422) -------------------------------------------
    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.exception_handler(ImageReadError)
    async def image_error(request: Request, exc: ImageReadError) -> JSONResponse:
        if isinstance(exc, PixelBudgetError):
            return JSONResponse({"detail": f"{exc} (api.max_pixels)"}, status_code=413)
        return JSONResponse({"detail": f"not a usable image: {exc}"}, status_code=400)

    @app.exception_handler(JobInputError)
    async def job_input_error(request: Request, exc: JobInputError) -> JSONResponse:
        if exc.kind == "budget":
            return JSONResponse({"detail": f"{exc} (api.max_pixels)"}, status_code=413)
        if exc.kind == "image":
            return JSONResponse({"detail": f"not a usable image: {exc}"}, status_code=400)
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(WorkerBusy)
    @app.exception_handler(WorkerTimeout)
    @app.exception_handler(WorkerFailed)
    async def worker_error(request: Request, exc: Exception) -> JSONResponse:
        headers = {"Retry-After": "5"} if isinstance(exc, (WorkerBusy, WorkerTimeout)) else None
        return JSONResponse({"detail": str(exc)}, status_code=503, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = [{k: v for k, v in e.items() if k not in ("ctx", "url")} for e in exc.errors()]
        safe = _jsonable(errs)
        first = safe[0] if safe else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid request')}", "errors": safe}, status_code=422)

    # Routes -------------------------------------------------------------------------------------
    @app.get("/health", response_model=HealthOut, operation_id="health")
    def health(request: Request) -> dict[str, Any]:
        st = _state(request)
        return {"status": "ok", "preset": settings.preset, "untrained": st.runtime.preset.untrained,
                "store": "open" if st.store is not None else "closed", "auth": bool(key),
                "worker": st.worker.state, "worker_jobs": st.worker.load}

    @app.get(
        "/metrics", response_class=Response, operation_id="metrics",
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Metrics"},
                   **_errors(401, 403)},
        description="Prometheus metrics (text exposition format).",
    )
    def get_metrics(request: Request) -> Response:
        st = _state(request)
        with st.store_lock:
            store = st.require_store()
            g_images.set(store.count_images() if store.dim is not None else 0)
            g_segments.set(store.count_segments() if store.dim is not None else 0)
        g_jobs.set(st.worker.load)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/search", response_model=SearchOut, responses=_errors(*DATA, 400, 413), operation_id="search")
    def search(body: SearchRequest, request: Request) -> dict[str, Any]:
        st = _state(request)
        f = body.filters or Filters()
        flt = SearchFilter(path=f.path, under=f.under)
        store = st.require_store()
        if store.dim is None:
            return {"hits": [], "count": 0}
        searcher = st.searcher()
        with st.text_lock:
            vector = searcher.embed(body.text)
        with st.store_lock:
            hits = searcher.search_vector(vector, body.k, None if flt.is_empty() else flt, body.min_score, body.dedup)
        names = st.filenames({h.path for h in hits})
        return {"hits": [hit_json(h, names[h.path]) for h in hits], "count": len(hits)}

    @app.get("/segments/{seg_id}", response_model=HitOut, responses=_errors(*DATA, 404), operation_id="get_segment")
    def get_segment(seg_id: uuid.UUID, request: Request) -> dict[str, Any]:
        st = _state(request)
        hit = st.segment(seg_id)
        return hit_json(hit, st.filenames({hit.path})[hit.path])

    @app.get("/segments/{seg_id}/mask.png", response_class=Response, responses={**PNG, **_errors(*DATA, 404)},
             operation_id="get_mask")
    async def get_mask(seg_id: uuid.UUID, request: Request) -> Response:
        st = _state(request)
        hit = await run_in_threadpool(st.segment, seg_id)
        async with st.render_slots:
            return Response(await run_in_threadpool(lambda: mask_png(hit.mask())), media_type="image/png")

    @app.get("/images/{img_id}", response_model=ImageOut, responses=_errors(*DATA, 404), operation_id="get_image")
    def get_image(img_id: uuid.UUID, request: Request) -> dict[str, Any]:
        st = _state(request)
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

    def _stored_bytes(entry: ImageEntry) -> bytes:
        changed = HTTPException(409, f"{entry.path} changed since it was indexed; reindex it")
        try:  # a regular file only: a FIFO put in its place would block the read forever, /dev/zero never end
            if entry.size is not None and stat_file(Path(entry.path)).st_size != entry.size:
                raise changed
            data, _ = read_file(Path(entry.path), max_file_bytes(settings.max_image_pixels))
        except ImageReadError as e:
            raise HTTPException(410, f"indexed image {entry.path} cannot be read any more: {e}") from None
        if sha256_bytes(data) != entry.sha256:
            raise changed
        return data

    @app.get("/images/{img_id}/overlay.png", response_class=Response, responses={**PNG, **_errors(*DATA, 404, 409, 410)},
             operation_id="get_overlay")
    async def image_overlay(request: Request, img_id: uuid.UUID, segment: Optional[uuid.UUID] = Query(None)) -> Response:
        """The image (long side at most ``api.overlay_side``) with one segment, or all, drawn on it."""
        st = _state(request)
        entry = await run_in_threadpool(st.image_entry, img_id)
        hit = await run_in_threadpool(st.segment, segment) if segment is not None else None
        if hit is not None and entry.path not in hit.paths:  # a content's segments belong to each of its paths
            raise HTTPException(404, f"segment {hit.id} is not on image {img_id}")
        async with st.render_slots:
            return Response(await run_in_threadpool(_overlay_png, st, entry, hit), media_type="image/png")

    def _overlay_png(st: AppState, entry: ImageEntry, hit: Hit | None) -> bytes:
        if hit is None:
            with st.store_lock:
                hits = list(st.require_store().scroll_segments(SearchFilter(path=entry.path)))
        data = _stored_bytes(entry)
        try:
            img = decode_work(data, settings.max_image_pixels, api.overlay_side)
        except ImageReadError as e:
            raise HTTPException(410, f"indexed image {entry.path} cannot be decoded any more: {e}") from None
        h, w = img.pixels.shape[:2]

        def small(m: np.ndarray) -> np.ndarray:
            return m if m.shape == (h, w) else m[nearest_index(h, m.shape[0])][:, nearest_index(w, m.shape[1])]

        if hit is not None:
            sx, sy = w / hit.width, h / hit.height
            x, y, bw, bh = hit.bbox
            out = segment_overlay(img.pixels, small(hit.mask()), (x * sx, y * sy, bw * sx, bh * sy))
        else:
            out = segments_overlay(img.pixels, [small(s.mask()) for s in hits])
        return _png(out)

    async def _read_upload(file: UploadFile) -> bytes:
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise HTTPException(413, f"upload over the {limit:,}-byte limit")
        return data

    @app.post("/images", status_code=201, response_model=UploadOut,
              responses={200: {"model": UploadOut, "description": "Already indexed (status 'exists')."},
                         **_errors(*DATA, 400, 409, 413)}, operation_id="upload_image")
    async def upload_image(request: Request, file: UploadFile = File(...)) -> JSONResponse:
        """Upload an image and index it: segmented at the working size, masks stored at its own size."""
        st = _state(request)
        data = await _read_upload(file)
        body = await run_in_threadpool(_index_upload, st, data, upload_name(file.filename))
        return JSONResponse(body, status_code=201 if body["status"] == "indexed" else 200)

    def _index_upload(st: AppState, data: bytes, filename: str | None) -> dict[str, Any]:
        info = probe(data, api.max_pixels)  # not an image / too many pixels: refused before any work
        digest = sha256_bytes(data)
        dest = uploads / f"{digest}.{FORMAT_EXT.get(info.format, info.format.lower())}"
        body = {"id": image_id(str(dest)), "path": str(dest), "sha256": digest, "filename": filename,
                "width": info.width, "height": info.height}
        with st.store_lock:
            store = st.require_store()
            old = complete_upload(store, dest, digest)
            twins = [e for e in store.find_images(digest) if e.path != str(dest)] if store.dim is not None else []
            someone = next(store.iter_images(), None) if store.dim is not None else None
        if old is not None:
            return exists(body, old)
        twin = next((e for e in twins if Path(e.path).is_file()), None)
        if twin is not None:  # point ids come from the content hash: indexing it again would steal its points
            raise HTTPException(409, f"the same image is already indexed as {twin.path} (id {image_id(twin.path)})")
        done: Indexed = st.worker.run("index", data, str(dest), digest)
        if someone is not None and someone.model != done.model:
            raise HTTPException(
                409, f"this store holds segments embedded with '{someone.model}', the server embeds with "
                f"'{done.model}': serve with the same preset/--model as for indexing"
            )
        # The file goes in place last, after the points and the record: a .part file left behind says
        # the request never finished (``repair_uploads``). One .part per request: the same image may
        # be uploaded twice at once, and the first to get here indexes it.
        uploads.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}.{uuid.uuid4().hex[:12]}.part")
        try:
            tmp.write_bytes(data)
            written = tmp.stat()
            with st.store_lock:
                store = st.require_store()
                old = complete_upload(store, dest, digest)
                if old is not None:
                    tmp.unlink()
                    return exists(body, old)
                store.ensure(done.dim)
                if done.points:
                    store.upsert_segments(done.points)
                store.put_image(ImageEntry(str(dest), digest, done.width, done.height, len(done.points), done.model,
                                           now_iso(), filename=filename, size=written.st_size, mtime_ns=written.st_mtime_ns))
                os.replace(tmp, dest)
        except BaseException:
            undo_upload(st, dest, digest, tmp)
            raise
        return {**body, "width": done.width, "height": done.height, "status": "indexed", "n_segments": len(done.points)}

    def exists(body: dict[str, Any], old: ImageEntry) -> dict[str, Any]:
        return {**body, "filename": old.filename, "width": old.width, "height": old.height, "status": "exists",
                "n_segments": old.n_segments}

    @app.post("/segment", response_model=SegmentationOut, responses=_errors(*DATA, 400, 404, 409, 410, 413),
              operation_id="segment_image")
    async def segment_image(
        request: Request,
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
        st = _state(request)
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
        if (file is None) == (image_id_ is None):
            raise HTTPException(422, "send exactly one of: an image file (field 'file') or 'image_id'")
        if file is not None:
            data = await _read_upload(file)
            source: dict[str, Any] = {"filename": upload_name(file.filename)}
        else:
            entry = await run_in_threadpool(st.image_entry, image_id_)
            data = await run_in_threadpool(_stored_bytes, entry)
            source = {"image_id": image_id_, "path": entry.path}
        out = await run_in_threadpool(_segment_job, data, names, labels_format == "base64", st)
        return {**source, **out, "classes": names, "unlabeled_value": 255}

    def _segment_job(data: bytes, names: list[str], with_png: bool, st: AppState) -> dict[str, Any]:
        probe(data, api.max_pixels)  # not an image / too many pixels: refused before it takes a queue slot
        out = st.worker.run("segment", data, names, with_png)
        if with_png:
            out["labels_png"] = base64.b64encode(out["labels_png"]).decode()
        return out

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = tidy_openapi(get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes), bool(key))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    # Web page -------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    return app


def tidy_openapi(doc: dict[str, Any], keyed: bool) -> dict[str, Any]:
    """What FastAPI cannot say from the signatures: a multipart part is absent or present, never
    "null"; links from the responses that hand out ids to the routes that take them; and, on a
    server with a key, the X-API-Key scheme on every route that needs it."""
    for path, method in (("/segment", "post"), ("/images", "post")):
        ref = doc["paths"][path][method]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
        for prop in doc["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"].values():
            options = [o for o in prop.pop("anyOf", []) if o.get("type") != "null"]
            if options:
                prop.update(options[0])
    hit = {"get_segment": {"seg_id": "$response.body#/hits/0/id"}, "get_mask": {"seg_id": "$response.body#/hits/0/id"},
           "get_image": {"img_id": "$response.body#/hits/0/image_id"},
           "get_overlay": {"img_id": "$response.body#/hits/0/image_id", "segment": "$response.body#/hits/0/id"}}
    upload = {"get_image": {"img_id": "$response.body#/id"}, "get_overlay": {"img_id": "$response.body#/id"}}
    for path, status, links in (("/search", "200", hit), ("/images", "201", upload), ("/images", "200", upload)):
        response = doc["paths"][path]["post"]["responses"][status]
        response["links"] = {op: {"operationId": op, "parameters": params} for op, params in links.items()}
    if keyed:
        doc.setdefault("components", {})["securitySchemes"] = {
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
        for path, ops in doc["paths"].items():
            for op in ops.values():
                if path not in OPEN_PATHS:
                    op["security"] = [{"apiKey": []}]
    return doc


def app_from_env() -> FastAPI:
    """For ``uvicorn --factory use_search.api.app:app_from_env``: settings from env / config file."""
    return create_app(Settings())


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before anything loads: a port in use is one clear error
    (an ``OSError``), not uvicorn's log lines after start-up and its exit code 3."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --port or --host)") from None
    return sock


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info", **kw: Any) -> None:
    import uvicorn

    sock = listen(host, port)
    config = uvicorn.Config(create_app(settings, bind_host=host, **kw), host=host, port=port, log_level=log_level)
    shown = f"[{host}]" if ":" in host else host
    # uvicorn names the address only for sockets it binds itself
    print(f"serving on http://{shown}:{port} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    uvicorn.Server(config).run(sockets=[sock])
