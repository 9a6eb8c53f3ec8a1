"""The API's outer ASGI layer: metrics, Host and Origin checks, CORS, the API key, the body size limit.

Each request, in this order: the Host header must be one this server answers to (a DNS-rebinding page
cannot reach a loopback server; checked before CORS, so a preflight with a foreign Host is refused
too); CORS, when origins are listed (its refusals are ``{"detail"}`` JSON like every other error); a
state-changing request from another browser origin is refused (a web page cannot make your browser
POST to the local server), and so is a read of a data route that the browser marks as coming from
another site (``Sec-Fetch-Site``): an ``<img>`` on another site could otherwise learn whether a photo
is indexed; data routes need the API key when one is set; the body may not exceed its route's limit,
counted while it streams in (a chunked body has no Content-Length to check up front). Data responses
carry ``Cross-Origin-Resource-Policy: same-origin`` for browsers that send no ``Sec-Fetch-Site``.
Metrics are labelled by route template and a fixed set of methods, so their size stays bounded
whatever paths and methods clients send.
"""

from __future__ import annotations

import asyncio

import hmac
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
HOST_HEADER = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(:[0-9]{1,5})?")  # name or [IPv6], optional port
HEADERS_KEY = "use_search.headers"  # the request's parsed headers, passed from the Host check to the others
CORP = (b"cross-origin-resource-policy", b"same-origin")


class BodyTooLarge(Exception):
    pass


@dataclass
class Policy:
    key: str | None
    body_limit: Callable[[str], int]  # path → byte limit of its body
    is_open: Callable[[str], bool]  # path → needs no key
    allowed_hosts: frozenset[str] | None  # None: any Host header
    cors_origins: frozenset[str] = field(default_factory=frozenset)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "use_search_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry
        )
        self.latency = Histogram(
            "use_search_http_request_seconds", "HTTP request latency", ["method", "route"], registry=registry
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)


def served_routes(router: Router) -> list[Any]:
    """The routes of ``router`` with those of the routers included in it: FastAPI 0.115 copies an included
    router's routes into the app's list, newer versions keep it as one entry (``iter_route_contexts``
    lists its routes, each with ``matches`` and ``path``)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:
        return list(router.routes)
    return list(iter_route_contexts(router.routes))


def route_label(router: Router, scope: Scope) -> str:
    """The template of the route that serves ``scope`` ("/segments/{seg_id}", "/static"), else "unmatched"."""
    partial = None
    for route in served_routes(router):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", "unmatched") or "unmatched"
        if match == Match.PARTIAL and partial is None:
            partial = getattr(route, "path", None)
    return partial or "unmatched"


def host_name(host_header: str) -> str | None:
    """'[::1]:8000' → '::1', 'Example.com:80' → 'example.com'; None when it is not a host and port
    ('127.0.0.1:8000@evil.com')."""
    h = host_header.strip().lower()
    m = HOST_HEADER.fullmatch(h)
    return m.group(1).strip("[]") if m else None


class JsonCORS(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered as ``{"detail"}`` JSON like every other error."""

    def preflight_response(self, request_headers: Any) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        headers = {k: v for k, v in response.headers.items() if k not in ("content-type", "content-length")}
        text = bytes(response.body).decode()
        return JSONResponse({"detail": f"CORS preflight refused: {text} (api.cors_origins)"}, response.status_code, headers)


async def send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": data})


class Guard:
    def __init__(self, app: ASGIApp, *, policy: Policy, metrics: Metrics, router: Router) -> None:
        self.app = app
        self.policy = policy
        self.metrics = metrics
        self.router = router
        self.inner: ASGIApp = self.checked
        if policy.cors_origins:
            self.inner = JsonCORS(self.checked, allow_origins=sorted(policy.cors_origins), allow_methods=["GET", "POST"],
                                  allow_headers=["X-API-Key", "Content-Type"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        method = scope["method"] if scope["method"] in METHODS else "other"
        route = route_label(self.router, scope)  # before routing, which rewrites the scope (mounts)

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            headers = _headers(scope)
            host = headers.get("host", "")
            hosts = self.policy.allowed_hosts
            if hosts is not None and host_name(host) not in hosts:
                await send_json(send_counted, 400, {"detail": (
                    f"Host {host[:100]!r} is not served here (api.allowed_hosts: {', '.join(sorted(hosts))})")})
            else:
                scope[HEADERS_KEY] = headers
                await self.inner(scope, receive, send_counted)
        finally:
            self.metrics.observe(method, route, status, time.perf_counter() - started)

    async def checked(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Everything after the Host check and CORS: origin, API key, body limit, then the app."""
        headers = scope.pop(HEADERS_KEY)
        data = not self.policy.is_open(scope["path"])

        async def send_marked(message: Message) -> None:
            if data and message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), CORP]
            await send(message)

        refusal = self.refusal(scope, headers)
        if refusal is not None:
            await send_json(send_marked, refusal[0], {"detail": refusal[1]})
        else:
            await self.limited(scope, headers, receive, send_marked)

    def refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        p = self.policy
        path = scope["path"]
        origin = headers.get("origin")
        site = headers.get("sec-fetch-site")
        if scope["method"] not in SAFE_METHODS:
            if origin is not None:
                ours = f"{scope.get('scheme', 'http')}://{headers.get('host', '')}".lower()
                if origin.lower() != ours and origin not in p.cors_origins:
                    return 403, (
                        f"cross-origin request refused: origin {origin[:100]!r} is not this server ({ours[:100]}); "
                        "list it in api.cors_origins (USE_SEARCH_API__CORS_ORIGINS) to allow it"
                    )
            elif site in ("cross-site", "same-site"):
                return 403, f"request from another page refused (Sec-Fetch-Site: {site})"
        elif site in ("cross-site", "same-site") and not p.is_open(path) and origin not in p.cors_origins:
            return 403, (
                f"request from another page refused (Sec-Fetch-Site: {site}): data routes answer this server's "
                "pages and the origins in api.cors_origins (USE_SEARCH_API__CORS_ORIGINS)"
            )
        if p.key and not p.is_open(path):
            given = headers.get("x-api-key")
            if not given:
                return 401, "missing API key (header X-API-Key)"
            if not hmac.compare_digest(given.encode("latin-1"), p.key.encode()):
                return 401, "wrong API key"
        return None

    async def limited(self, scope: Scope, headers: dict[str, str], receive: Receive, send: Send) -> None:
        """Run the app with the body capped at the route's limit: up front from Content-Length, and
        while the body streams in (chunked uploads); past the limit the request ends with 413."""
        limit = self.policy.body_limit(scope["path"])
        detail = {"detail": f"request body over the {limit:,}-byte limit for {scope['path'][:100]}"}
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await send_json(send, 400, {"detail": "malformed Content-Length header"})
                return
            if int(declared) > limit:
                if int(declared) <= limit + drain_budget(limit):
                    await drain(receive, limit)
                await send_json(send, 413, detail, [(b"connection", b"close")])
                return
        received = 0
        over = False
        response_started = False

        async def receive_counted() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise BodyTooLarge()
            return message

        async def send_unless_over(message: Message) -> None:
            nonlocal response_started
            if over and not response_started:
                return  # whatever the app made of the cut body, the answer is 413 (sent below)
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive_counted, send_unless_over)
        except Exception:
            if not over:
                raise
        if over and not response_started:
            await drain(receive, limit)
            await send_json(send, 413, detail, [(b"connection", b"close")])


DRAIN_S = 2.0


def drain_budget(limit: int) -> int:
    return max(limit, 16 << 20)


async def drain(receive: Receive, limit: int) -> None:
    """Read and drop what the client is still sending before a 413, up to ``drain_budget`` bytes and
    ``DRAIN_S`` seconds. Closing a connection with unread data makes the kernel answer with a reset,
    and a client still sending then never reads the 413 (it sees "connection reset"). A body declared
    bigger than that is answered at once: its sender is cut off either way."""

    async def read() -> None:
        left = drain_budget(limit)
        while left > 0:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            left -= len(message.get("body", b""))

    try:
        await asyncio.wait_for(read(), DRAIN_S)
    except asyncio.TimeoutError:
        pass


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}

