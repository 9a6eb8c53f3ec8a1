"""HTTP API (FastAPI) over one store: search, segments, masks, overlays, upload+index, voting, metrics.

One process owns the embedded store (it is locked): the app opens it once in its lifespan.
Two paths that never wait for each other:
- search (and the other reads): the text tower under its own lock, the store lock held only for the
  store call itself;
- heavy work (``POST /segment``, ``POST /images``): a bounded queue into one worker process that owns
  SAM and the image embedder (``worker.py``); uploads are decoded at the segmenter's working size.
  Full: 503 at once; too slow: 503 and the worker is restarted.
The outer ASGI layer (``guard.py``) checks Host, Origin, API key and body size and keeps the metrics.
The routes are one router per concern (``routes/``); they get the configuration and the open resources
as dependencies (``state.py``).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from use_search.api.connections import DeadlineH11Protocol, quiet_logs, raise_file_limit
from use_search.api.errors import add_error_handlers
from use_search.api.guard import LOOPBACK_HOSTS, Guard, Policy
from use_search.api.openapi import OPEN_PATHS, document
from use_search.api.routes import ROUTERS
from use_search.api.routes.ops import STATIC
from use_search.api.state import AppConfig, AppState
from use_search.api.uploads import repair_uploads
from use_search.config import Settings

DOCS_ASSETS = "/docs-assets"  # Swagger UI and ReDoc, as the fastapi-offline package ships them (no CDN)
OPEN_PREFIXES = ("/static/", DOCS_ASSETS + "/")  # the page and docs hold no data (their data calls need the key)
PAGE_PATHS = ("/", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc", "/favicon.ico")
UPLOAD_ROUTES = ("/images", "/segment", "/search/image")
MULTIPART_OVERHEAD = 64 * 1024  # form fields and part headers around an upload


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
    config = AppConfig(settings, key, max_upload_bytes or settings.max_upload_bytes)
    app = FastAPIOffline(
        title="use-search", version="0.1.0", lifespan=lifespan, static_url=DOCS_ASSETS,
        description="Search image segments by text (USE: SAM segments, CLIP embeddings, Qdrant). "
        "When the server has an API key, every route but /health needs the header X-API-Key.",
    )
    app.state.config = config
    app.add_middleware(Guard, policy=policy(config, bind_host), metrics=config.http, router=app.router)  # CORS is inside it
    add_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app, bool(key))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


@asynccontextmanager
async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
    config: AppConfig = app.state.config
    st = AppState(config.settings)
    log = logging.getLogger("uvicorn.error")
    st.read_only = not st.runtime.store_writable()
    st.store = st.runtime.store(writable=not st.read_only)  # the exclusive lock (read-only: a copy) is taken here, once
    if st.read_only:  # a private copy is searched; unfinished uploads wait for a server that can write
        log.warning("the store at %s is read-only for this process: serving search only, uploads are refused (503)",
                    config.settings.store_path)
    else:
        for path in repair_uploads(st.store, config.uploads):
            log.warning("undid the unfinished upload %s (the server stopped during it)", path)
    app.state.use = st
    try:
        yield
    finally:
        await run_in_threadpool(st.worker.close)
        with st.store_lock:
            st.store.close()
            st.store = None


def policy(config: AppConfig, bind_host: str | None) -> Policy:
    """What the guard lets through: Host names, origins, the key, the body size of each path."""
    api, limit = config.settings.api, config.upload_limit
    if api.allowed_hosts is not None:
        hosts: frozenset[str] | None = frozenset(h.lower().strip("[]") for h in api.allowed_hosts)
        if "*" in hosts:
            hosts = None
    else:
        loopback = bind_host is not None and is_loopback(bind_host)
        hosts = frozenset((*LOOPBACK_HOSTS, bind_host.strip("[]").lower())) if loopback else None
    return Policy(
        key=config.key,
        body_limit=lambda path: limit + MULTIPART_OVERHEAD if path in UPLOAD_ROUTES else api.max_body_bytes,
        is_open=lambda path: path in OPEN_PATHS or path in PAGE_PATHS or path.startswith(OPEN_PREFIXES),
        allowed_hosts=hosts,
        cors_origins=frozenset(api.cors_origins),
    )


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
    api = settings.api
    config = uvicorn.Config(
        create_app(settings, bind_host=host, **kw), host=host, port=port, log_level=log_level,
        http=DeadlineH11Protocol.with_timeouts(api.header_timeout_s, api.body_timeout_s),
        limit_concurrency=api.limit_concurrency, timeout_keep_alive=api.timeout_keep_alive_s,
    )
    quiet_logs()
    short = raise_file_limit(api.limit_concurrency)
    if short:
        print(f"warning: {short}", file=sys.stderr, flush=True)
    shown = f"[{host}]" if ":" in host else host
    # uvicorn names the address only for sockets it binds itself
    print(f"serving on http://{shown}:{port} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    uvicorn.Server(config).run(sockets=[sock])
