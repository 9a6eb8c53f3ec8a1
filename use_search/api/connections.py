"""The server's connections: read deadlines, a cap on open connections, a log that cannot flood.

uvicorn closes a kept-alive connection that stays idle after a response (``timeout_keep_alive``) but
has no deadline before the first request, for a request line or headers that never finish, or for a
body that stops: each such connection held a file handle (and an upload its spooled temp file) for as
long as the client kept it. An ASGI middleware cannot help with the first three, because the app only
sees a request once its headers are complete; so the deadlines live in the HTTP protocol: a subclass
of uvicorn's own h11 protocol (``uvicorn.Config(http=...)`` takes a protocol class) that keeps its
parsing and only adds timers:

- the request line and headers must arrive within ``header_timeout_s`` of the connection opening
  (or of the previous response): one deadline for all of it, so sending a byte at a time gains nothing;
- while a body streams in, each piece must follow the previous one within ``body_timeout_s``;
  closing the connection then ends the request (the multipart parser closes its temp files);
- at ``limit_concurrency`` open connections a new one replaces the connection that has waited
  longest for its request headers (a stalled or idle client), else it is closed at once: the count
  stays below uvicorn's ``limit_concurrency``, which answers 503 to requests beyond it.
"""

from __future__ import annotations

import logging
import resource
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class DeadlineH11Protocol(H11Protocol):
    header_timeout_s = 10.0
    body_timeout_s = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: Any = None  # asyncio.TimerHandle
        self.waiting_since: float | None = None  # waiting for a request's headers since (loop time)

    @classmethod
    def with_timeouts(cls, header_s: float, body_s: float) -> type[DeadlineH11Protocol]:
        return type(cls.__name__, (cls,), {"header_timeout_s": header_s, "body_timeout_s": body_s})

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()
        limit = self.limit_concurrency
        if limit is not None and len(self.connections) >= limit:
            waiting = [c for c in self.connections if c is not self and getattr(c, "waiting_since", None) is not None]
            min(waiting, key=lambda c: c.waiting_since, default=self).close_now("over the connection limit")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            if self.conn.their_state is h11.IDLE:
                self._await_headers()  # the next request's headers (uvicorn's keep-alive timer runs too)
            else:
                self._follow_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.waiting_since = None
        super().connection_lost(exc)

    def close_now(self, why: str) -> None:
        self._disarm()
        self.waiting_since = None
        self.connections.discard(self)  # counted out at once, not when the loop gets to connection_lost
        if not self.transport.is_closing():
            self.logger.debug("closing a connection: %s", why)
            self.transport.close()

    def _await_headers(self) -> None:
        self.waiting_since = self.loop.time()
        self._arm(self.header_timeout_s, "no complete request headers")

    def _follow_request(self) -> None:
        state = self.conn.their_state
        if state is h11.IDLE:  # waiting for headers: their deadline keeps running, or starts (a
            if self.waiting_since is None:  # request body that ended after its early response)
                self._await_headers()
            return
        self.waiting_since = None
        if state is h11.SEND_BODY:
            self._arm(self.body_timeout_s, "the request body stalled")  # from the last piece received
        else:
            self._disarm()

    def _arm(self, seconds: float, why: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire, seconds, why)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self, seconds: float, why: str) -> None:
        self._deadline = None
        if self.flow.read_paused:  # the app is not reading (its buffer is full): not the client's stall
            self._arm(seconds, why)
            return
        self.close_now(why)


class OncePer(logging.Filter):
    """Let a message through at most once per ``seconds`` (keyed by its first line's start), and say
    how many like it were dropped. Loop-level errors (``socket.accept() out of system resource`` when
    file handles run out) and per-request warnings otherwise write one log entry per attempt."""

    def __init__(self, seconds: float, only: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.seconds = seconds
        self.only = only  # limit only messages starting with one of these ("": all)
        self.last: dict[str, float] = {}
        self.dropped: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if self.only and not text.startswith(self.only):
            return True
        key = text.split("\n", 1)[0][:60]
        now = time.monotonic()
        if now - self.last.get(key, -self.seconds) < self.seconds:
            self.dropped[key] = self.dropped.get(key, 0) + 1
            return False
        self.last[key] = now
        dropped = self.dropped.pop(key, 0)
        if dropped:
            record.msg, record.args = f"{text}\n({dropped} more like this in the last {self.seconds:.0f} s not logged)", ()
        return True


QUIET_S = 10.0


def quiet_logs() -> None:
    """Rate-limit the log lines a hostile client can make the server write once per attempt."""
    logging.getLogger("asyncio").addFilter(OncePer(QUIET_S))
    logging.getLogger("uvicorn.error").addFilter(
        OncePer(QUIET_S, only=("Exceeded concurrency limit", "Invalid HTTP request received")))


FILE_RESERVE = 128  # file handles besides connections: the store, model files, the worker's pipes


def raise_file_limit(connections: int) -> str | None:
    """Raise this process's open-file limit (the soft one, up to the hard one) to hold ``connections``
    and the reserve; a warning when even the hard limit is lower (then file handles can run out before
    the connection limit is reached)."""
    wanted = connections + FILE_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < wanted:
        return (f"the open-file limit ({soft}) is below api.limit_concurrency ({connections}) + {FILE_RESERVE}: "
                "raise it (ulimit -n) or lower api.limit_concurrency")
    return None
