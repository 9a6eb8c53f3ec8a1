"""Running the server: health, Prometheus metrics, the web page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from use_search.api.errors import errors
from use_search.api.forms import StrictJSONRoute
from use_search.api.schemas import HealthOut
from use_search.api.state import Config, State

STATIC = Path(__file__).parents[1] / "static"

router = APIRouter(route_class=StrictJSONRoute)


@router.get("/health", response_model=HealthOut, operation_id="health")
def health(st: State, config: Config) -> dict[str, Any]:
    return {"status": "ok", "preset": st.runtime.preset.name, "untrained": st.runtime.preset.untrained,
            "store": "closed" if st.store is None else "read-only" if st.read_only else "open", "auth": bool(config.key),
            "worker": st.worker.state, "worker_jobs": st.worker.load}


@router.get(
    "/metrics", response_class=Response, operation_id="metrics",
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Metrics"},
               **errors(401, 403)},
    description="Prometheus metrics (text exposition format).",
)
def get_metrics(st: State, config: Config) -> Response:
    with st.store_lock:
        store = st.require_store()
        config.images.set(store.count_images() if store.dim is not None else 0)
        config.segments.set(store.count_segments() if store.dim is not None else 0)
    config.jobs.set(st.worker.load)
    return Response(generate_latest(config.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")
