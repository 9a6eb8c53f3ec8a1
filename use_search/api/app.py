"""HTTP API (FastAPI) over one store: search, segments, masks, overlays, upload+index, voting, metrics.

One process owns the embedded store (it is locked): the app opens it once in its lifespan and
builds the searcher / indexer / segmenter lazily, once, on first use. Store and model calls are
serialised with locks (sync routes run in a thread pool).
"""

from __future__ import annotations

import base64
import colorsys
import hmac
import io
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field

from use_search.config import Settings
from use_search.indexer.read import ImageReadError, LoadedImage, decode_image, read_image, sha256_bytes
from use_search.masks import encode_rle
from use_search.query.render import mask_png, overlay
from use_search.query.voting import label_png, semantic_segmentation
from use_search.store.base import SearchFilter, StoreError, VectorStore, image_id
from use_search.types import Hit, ImageRecord

STATIC = Path(__file__).parent / "static"
MAX_CLASSES = 255
OPEN_PATHS = ("/health",)  # no key needed; the page and docs hold no data (their data calls need the key)
OPEN_PREFIXES = ("/static/",)
PAGE_PATHS = ("/", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc", "/favicon.ico")
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp", "MPO": "jpg"}


# Request / response bodies ---------------------------------------------------------------------
class Filters(BaseModel):
    path: Optional[str] = Field(None, description="Only segments of this image (absolute path).")
    under: Optional[str] = Field(None, description="Only images under this folder.")


class SearchRequest(BaseModel):
    text: str = Field(..., min_length=1, max_length=1000)
    k: int = Field(10, ge=1, le=200)
    filters: Optional[Filters] = None
    min_score: Optional[float] = None
    dedup: bool = False


# State --------------------------------------------------------------------------------------------
class AppState:
    def __init__(self, settings: Settings) -> None:
        from use_search.factory import Runtime

        self.settings = settings
        self.runtime = Runtime.from_settings(settings)
        self.store: VectorStore | None = None
        self.store_lock = threading.RLock()
        self.model_lock = threading.Lock()
        self._searcher = None
        self._indexer = None
        self._segmenter = None
        self._ids: dict[str, str] = {}  # image id → path

    # Lazily built parts (each once) ------------------------------------------------------------
    def searcher(self):  # type: ignore[no-untyped-def]
        with self.model_lock:
            if self._searcher is None:
                from use_search.query.search import Searcher

                self._searcher = Searcher(self.require_store(), self._embedder())
            return self._searcher

    def _embedder(self):  # type: ignore[no-untyped-def]
        if self._indexer is not None:
            return self._indexer.embedder
        if self._searcher is not None:
            return self._searcher.embedder
        return self.runtime.embedder()

    def indexer(self):  # type: ignore[no-untyped-def]
        with self.model_lock:
            if self._indexer is None:
                from use_search.indexer.runner import Indexer

                s = self.settings
                with self.store_lock:
                    self._indexer = Indexer(
                        self.require_store(), self._segmenter_locked(), self._embedder(),
                        max_image_pixels=s.max_image_pixels, batch_images=s.batch_images,
                        extensions=s.image_extensions,
                    )
            return self._indexer

    def _segmenter_locked(self):  # type: ignore[no-untyped-def]
        if self._segmenter is None:
            self._segmenter = self.runtime.segmenter()
        return self._segmenter

    def segment_parts(self):  # type: ignore[no-untyped-def]
        with self.model_lock:
            return self._segmenter_locked(), self._embedder_cached()

    def _embedder_cached(self):  # type: ignore[no-untyped-def]
        emb = self._embedder()
        if self._searcher is None and self._indexer is None:
            from use_search.query.search import Searcher

            self._searcher = Searcher(self.require_store(), emb)  # keep the one embedder around
        return emb

    def require_store(self) -> VectorStore:
        if self.store is None:
            raise StoreError("the store is not open")
        return self.store

    # Image ids ----------------------------------------------------------------------------------
    def path_of(self, img_id: str) -> str:
        if img_id in self._ids:
            return self._ids[img_id]
        with self.store_lock:
            self._ids = {image_id(e.path): e.path for e in self.require_store().iter_images()}
        if img_id not in self._ids:
            raise HTTPException(404, f"no indexed image with id {img_id}")
        return self._ids[img_id]


def _state(request: Request) -> AppState:
    return request.app.state.use


def _uuid(value: str, what: str) -> str:
    """Ids are UUIDs; anything else (paths, '..', junk) is rejected before it reaches the store."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError):
        raise HTTPException(422, f"malformed {what} id {value[:80]!r}: expected a UUID") from None


def hit_json(h: Hit) -> dict[str, Any]:
    img = image_id(h.path)
    return {
        **h.to_json(), "image_id": img,
        "mask_url": f"/segments/{h.id}/mask.png",
        "overlay_url": f"/images/{img}/overlay.png?segment={h.id}",
    }


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


# App ----------------------------------------------------------------------------------------------
def create_app(
    settings: Settings, *, api_key: str | None = None, max_upload_bytes: int | None = None
) -> FastAPI:
    """The API app. ``api_key`` / ``max_upload_bytes`` override the settings' fields of those names."""
    key = api_key or settings.api_key
    limit = max_upload_bytes or settings.max_upload_bytes
    uploads = settings.data_dir / "uploads"

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        st = AppState(settings)
        st.store = st.runtime.store()  # the exclusive lock is taken here, once
        app.state.use = st
        try:
            yield
        finally:
            with st.store_lock:
                st.store.close()
                st.store = None

    app = FastAPI(
        title="use-search", version="0.1.0", lifespan=lifespan,
        description="Search image segments by text (USE: SAM segments, CLIP embeddings, Qdrant).",
    )

    registry = CollectorRegistry()
    requests = Counter("use_search_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry)
    latency = Histogram("use_search_http_request_seconds", "HTTP request latency", ["method", "route"], registry=registry)
    g_images = Gauge("use_search_images", "Indexed images in the store", registry=registry)
    g_segments = Gauge("use_search_segments", "Segments in the store", registry=registry)

    # Middleware: auth, upload size, metrics. Errors are JSON {detail}. -----------------------
    @app.middleware("http")
    async def guard(request: Request, call_next):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        path = request.url.path
        response: Response
        open_path = path in OPEN_PATHS or path in PAGE_PATHS or path.startswith(OPEN_PREFIXES)
        given = request.headers.get("x-api-key")
        if key and not open_path and not (given and hmac.compare_digest(given.encode(), key.encode())):
            response = JSONResponse(
                {"detail": "missing API key (header X-API-Key)" if not given else "wrong API key"}, status_code=401
            )
        elif request.method == "POST" and _too_big(request, limit):
            response = JSONResponse({"detail": f"upload over the {limit:,}-byte limit"}, status_code=413)
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        label = getattr(route, "path", None) or ("unmatched" if response.status_code == 404 else path if open_path else "other")
        requests.labels(request.method, label, str(response.status_code)).inc()
        latency.labels(request.method, label).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.exception_handler(ImageReadError)
    async def image_error(request: Request, exc: ImageReadError) -> JSONResponse:
        return JSONResponse({"detail": f"not a usable image: {exc}"}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse(
            {"detail": f"{where}: {first.get('msg', 'invalid request')}", "errors": _jsonable(errs)}, status_code=422
        )

    # Routes -------------------------------------------------------------------------------------
    @app.get("/health")
    def health(request: Request) -> dict[str, Any]:
        st = _state(request)
        return {"status": "ok", "preset": settings.preset, "untrained": st.runtime.preset.untrained,
                "store": "open" if st.store is not None else "closed", "auth": bool(key)}

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        st = _state(request)
        with st.store_lock:
            store = st.require_store()
            g_images.set(store.count_images() if store.dim is not None else 0)
            g_segments.set(store.count_segments() if store.dim is not None else 0)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/search")
    def search(body: SearchRequest, request: Request) -> dict[str, Any]:
        st = _state(request)
        f = body.filters or Filters()
        flt = SearchFilter(path=f.path, under=f.under)
        store = st.require_store()
        if store.dim is None:
            return {"hits": [], "count": 0}
        searcher = st.searcher()
        with st.model_lock:
            vector = searcher.embed(body.text)
        with st.store_lock:
            try:
                hits = searcher.search_vector(vector, body.k, None if flt.is_empty() else flt, body.min_score, body.dedup)
            except ValueError as e:
                raise HTTPException(422, str(e)) from None
        return {"hits": [hit_json(h) for h in hits], "count": len(hits)}

    def _segment(st: AppState, seg_id: str) -> Hit:
        sid = _uuid(seg_id, "segment")
        with st.store_lock:
            store = st.require_store()
            found = store.get_segments([sid]) if store.dim is not None else []
        if not found:
            raise HTTPException(404, f"no segment with id {sid}")
        return found[0]

    @app.get("/segments/{seg_id}")
    def get_segment(seg_id: str, request: Request) -> dict[str, Any]:
        return hit_json(_segment(_state(request), seg_id))

    @app.get("/segments/{seg_id}/mask.png")
    def get_mask(seg_id: str, request: Request) -> Response:
        return Response(mask_png(_segment(_state(request), seg_id).mask()), media_type="image/png")

    def _image_pixels(st: AppState, img_id: str) -> tuple[str, np.ndarray]:
        path = st.path_of(_uuid(img_id, "image"))
        with st.store_lock:
            entry = st.require_store().get_image(path)
        if entry is None:
            raise HTTPException(404, f"no indexed image with id {img_id}")
        try:
            loaded = read_image(Path(path), settings.max_image_pixels)
        except ImageReadError as e:
            raise HTTPException(410, f"indexed image {path} cannot be read any more: {e}") from None
        if loaded.record.sha256 != entry.sha256:
            raise HTTPException(409, f"{path} changed since it was indexed; reindex it")
        return path, loaded.pixels

    @app.get("/images/{img_id}")
    def get_image(img_id: str, request: Request) -> dict[str, Any]:
        st = _state(request)
        iid = _uuid(img_id, "image")
        path = st.path_of(iid)
        with st.store_lock:
            store = st.require_store()
            entry = store.get_image(path)
            segs = sorted(store.scroll_segments(SearchFilter(path=path)), key=lambda h: h.segment_index)
        if entry is None:
            raise HTTPException(404, f"no indexed image with id {img_id}")
        return {
            "id": iid, "path": entry.path, "sha256": entry.sha256, "width": entry.width, "height": entry.height,
            "n_segments": entry.n_segments, "model": entry.model, "indexed_at": entry.indexed_at,
            "overlay_url": f"/images/{iid}/overlay.png",
            "segments": [{"id": h.id, "segment_index": h.segment_index, "bbox": list(h.bbox), "area": h.area} for h in segs],
        }

    @app.get("/images/{img_id}/overlay.png")
    def image_overlay(request: Request, img_id: str, segment: Optional[str] = Query(None)) -> Response:
        st = _state(request)
        path, pixels = _image_pixels(st, img_id)
        if segment is not None:
            hit = _segment(st, segment)
            if hit.path != path:
                raise HTTPException(404, f"segment {hit.id} is not on image {img_id}")
            img = overlay(pixels, hit.mask(), hit.bbox)
        else:
            with st.store_lock:
                segs = list(st.require_store().scroll_segments(SearchFilter(path=path)))
            img = segments_overlay(pixels, [h.mask() for h in segs])
        return Response(_png(img), media_type="image/png")

    async def _read_upload(file: UploadFile) -> bytes:
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise HTTPException(413, f"upload over the {limit:,}-byte limit")
        return data

    @app.post("/images", status_code=201)
    async def upload_image(request: Request, file: UploadFile = File(...)) -> JSONResponse:
        st = _state(request)
        data = await _read_upload(file)
        # Decode first: a corrupt upload stores nothing (no file, no points).
        pixels = decode_image(data, settings.max_image_pixels)
        fmt = Image.open(io.BytesIO(data)).format or "PNG"
        digest = sha256_bytes(data)
        uploads.mkdir(parents=True, exist_ok=True)
        dest = uploads / f"{digest}.{FORMAT_EXT.get(fmt, fmt.lower())}"
        h, w = pixels.shape[:2]
        body = {"id": image_id(str(dest)), "path": str(dest), "sha256": digest, "width": w, "height": h,
                "filename": file.filename}
        from starlette.concurrency import run_in_threadpool

        status, n = await run_in_threadpool(_index_upload, st, dest, data, pixels, digest)
        st._ids[body["id"]] = str(dest)
        return JSONResponse({**body, "status": status, "n_segments": n}, status_code=201 if status == "indexed" else 200)

    def _index_upload(st: AppState, dest: Path, data: bytes, pixels: np.ndarray, digest: str) -> tuple[str, int]:
        with st.store_lock:
            store = st.require_store()
            old = store.get_image(str(dest)) if store.dim is not None else None
            twins = [e for e in store.find_images(digest) if e.path != str(dest)] if store.dim is not None else []
        if old is not None and old.sha256 == digest and dest.is_file():
            return "exists", old.n_segments
        twin = next((e for e in twins if Path(e.path).is_file()), None)
        if twin is not None:  # point ids come from the content hash: indexing it again would steal its points
            raise HTTPException(409, f"the same image is already indexed as {twin.path} (id {image_id(twin.path)})")
        indexer = st.indexer()
        h, w = pixels.shape[:2]
        loaded = LoadedImage(ImageRecord(str(dest), digest, w, h), pixels)
        with st.model_lock:
            points = indexer.process(loaded)
        tmp = dest.with_suffix(dest.suffix + ".part")
        tmp.write_bytes(data)
        try:
            with st.store_lock:
                indexer._commit([(loaded, points)])
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return "indexed", len(points)

    @app.post("/segment")
    async def segment_image(
        request: Request,
        classes: list[str] = Form(..., description="Class names: repeat the field, or one comma-separated value."),
        file: Optional[UploadFile] = File(None),
        image_id_: Optional[str] = Form(None, alias="image_id"),
        labels_format: str = Form("base64", pattern="^(base64|none)$"),
    ) -> dict[str, Any]:
        """Semantic segmentation by voting (paper §4.3) of an upload or an indexed image."""
        st = _state(request)
        names = [c.strip() for item in classes for c in item.split(",") if c.strip()]
        if not names:
            raise HTTPException(422, "give at least one class name")
        if len(names) > MAX_CLASSES or len(set(names)) != len(names):
            raise HTTPException(422, f"class names must be distinct and at most {MAX_CLASSES}")
        if (file is None) == (image_id_ is None):
            raise HTTPException(422, "send exactly one of: an image file (field 'file') or 'image_id'")
        if file is not None:
            pixels = decode_image(await _read_upload(file), settings.max_image_pixels)
            source: dict[str, Any] = {"filename": file.filename}
        else:
            from starlette.concurrency import run_in_threadpool

            path, pixels = await run_in_threadpool(_image_pixels, st, image_id_)
            source = {"image_id": _uuid(image_id_, "image"), "path": path}
        from starlette.concurrency import run_in_threadpool

        labels, masks = await run_in_threadpool(_vote, st, pixels, names)
        h, w = labels.shape
        out: dict[str, Any] = {
            **source, "width": w, "height": h, "classes": names, "unlabeled_value": 255,
            "unlabeled_pixels": int((labels < 0).sum()),
            "masks": [
                {"class": n, "index": i, "area": int(m.sum()), "rle": encode_rle(m)} for i, (n, m) in enumerate(masks.items())
            ],
        }
        if labels_format == "base64":
            out["labels_png"] = base64.b64encode(label_png(labels)).decode()
        return out

    def _vote(st: AppState, pixels: np.ndarray, names: list[str]):  # type: ignore[no-untyped-def]
        segmenter, embedder = st.segment_parts()
        with st.model_lock:
            return semantic_segmentation(pixels, names, segmenter, embedder)

    # Web page -------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    return app


def _too_big(request: Request, limit: int) -> bool:
    """Refuse an oversized body from its Content-Length before reading it (multipart overhead allowed)."""
    try:
        return int(request.headers.get("content-length", "0")) > limit + 64 * 1024
    except ValueError:
        return False


def _jsonable(errors: list[Any]) -> list[Any]:
    out = []
    for e in errors:
        e = dict(e)
        e.pop("ctx", None)
        if isinstance(e.get("input"), (bytes, bytearray)):
            e["input"] = None
        out.append(e)
    try:
        import json

        json.dumps(out, default=str)
        return json.loads(json.dumps(out, default=str))
    except (TypeError, ValueError):
        return []


def app_from_env() -> FastAPI:
    """For ``uvicorn --factory use_search.api.app:app_from_env``: settings from env / config file."""
    return create_app(Settings())


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info", **kw: Any) -> None:
    import uvicorn

    uvicorn.run(create_app(settings, **kw), host=host, port=port, log_level=log_level)
