"""The uvicorn server the gateway runs in (one worker; with several, uvicorn's own), and the
HTTP protocol with the listener's own limits (every worker)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import error_body


class QuietServer(uvicorn.Server):
    """uvicorn's server with its housekeeping tick once a second instead of ten times.

    uvicorn's main loop wakes every 0.1 s to refresh the Date header (which changes once a
    second) and to look for a stop request; on an idle gateway those wake-ups were most of
    its CPU (docs/benchmarks.md, idle burn). Here it sleeps a second, or until a stop is asked.
    """

    _wake: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        counter = 0
        while not await self.on_tick(counter):
            # on_tick refreshes the Date header when counter % 10 == 0
            counter = (counter + 10) % 864000
            try:
                async with asyncio.timeout(1.0):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self.wake()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, without re-raising the caught SIGTERM/SIGINT once shut down.

        Re-raised, the signal kills the process (status 143) before its atexit handlers run:
        the log writer's last lines and coverage data are lost. A stop asked for by a signal
        (before the drain takes signals over at start-up, or after it hands them back) is a
        clean exit here.
        """
        with super().capture_signals():
            yield
            self._captured_signals.clear()

    def wake(self) -> None:
        """Look at ``should_exit`` now rather than at the next tick (any thread)."""
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """What one client connection may cost (``server.*`` settings); bytes and seconds."""

    max_header_bytes: int
    header_timeout: float
    body_timeout: float
    max_connections: int


MAX_PIPELINED = 16  # requests queued behind the one in progress on one connection


def _response(status: bytes, message: str, code: str, extra: bytes = b"") -> bytes:
    body = error_body(message, "invalid_request_error", None, code)
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n"
        + extra
        + b"connection: close\r\n\r\n"
        + body
    )


_TOO_LARGE = b"431 Request Header Fields Too Large"
_TIMEOUT = b"408 Request Timeout"
_BUSY = b"503 Service Unavailable"
_BAD_REQUEST = b"400 Bad Request"


class _Sweeper:
    """Closes the server's connections whose head or body deadline has passed, once a second.

    One timer for all connections of a server, running only while there are connections,
    rather than a timer armed and cancelled per request phase: per request the protocol then
    only writes a deadline. Deadlines are met within a second, which is all a defence against
    slow clients needs.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, connections: set[Any]) -> None:
        self._loop = loop
        self._connections = connections
        self._handle: asyncio.TimerHandle | None = None

    def watch(self) -> None:
        if self._handle is None:
            self._handle = self._loop.call_later(SWEEP_SECONDS, self._sweep)

    def _sweep(self) -> None:
        now = self._loop.time()
        for conn in list(self._connections):
            deadline = getattr(conn, "deadline", None)
            if deadline is not None and now >= deadline:
                conn.deadline_passed()
        self._handle = None
        if self._connections:
            self.watch()


SWEEP_SECONDS = 1.0


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with limits of its own on what a client may hold.

    httptools (llhttp) has no limit on the size of a request head: it accumulates a header
    value across reads for as long as the client sends, and uvicorn has no timeout for a head
    or body that never completes (its keep-alive timer is cancelled by the first byte). So 40
    connections each sending an endless header held 600 MB before any authentication. Here:

    * the bytes read while a head is incomplete are counted; past ``max_header_bytes`` the
      client gets 431 and the connection is closed (memory per connection: the limit plus one
      read, at most 256 KiB with uvloop);
    * a head must be complete within ``header_timeout`` of its first byte (or of the connection
      opening), else 408 and close; a body within ``body_timeout`` of its head, else close (the
      application then sees ``http.disconnect``); checked once a second by a ``_Sweeper``;
    * beyond ``max_connections`` open connections, a new one is answered 503 and closed.

    Per request this costs a few attribute writes, two reads of the loop's clock and an integer
    add per read (about a microsecond, measured); nothing runs per header.
    """

    def __init__(self, *args: Any, limits: ListenerLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits
        self._head_bytes = 0
        self._in_head = True
        self.deadline: float | None = None  # loop time by which the current head/body must be in
        self._refused = False  # answered and closing: ignore the rest of what was read
        state = self.server_state
        sweeper = getattr(state, "gateway_sweeper", None)
        if sweeper is None:
            # One per server (its connection set lives in uvicorn's ServerState).
            sweeper = _Sweeper(self.loop, self.connections)
            state.gateway_sweeper = sweeper  # type: ignore[attr-defined]
        self._sweeper: _Sweeper = sweeper

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self._limits.max_connections:
            transport.write(
                _response(
                    _BUSY,
                    "Too many open connections to this gateway; retry shortly.",
                    "too_many_connections",
                    b"retry-after: 1\r\n",
                )
            )
            transport.close()
            return
        self.deadline = self.loop.time() + self._limits.header_timeout
        self._sweeper.watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadline = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._in_head:
            super().data_received(data)
            return
        self._head_bytes += len(data)
        super().data_received(data)
        if (
            self._in_head
            and self._head_bytes > self._limits.max_header_bytes
            and not self.transport.is_closing()
        ):
            self._refuse(
                _TOO_LARGE,
                f"The request head exceeds {self._limits.max_header_bytes} bytes.",
                "request_header_fields_too_large",
            )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.deadline is None:  # the first byte of a request on a kept-alive connection
            self.deadline = self.loop.time() + self._limits.header_timeout

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head = False
        # A head that ended inside the read that crossed the limit: measure the head itself (a
        # body may share that read). Only then: nothing per header on the usual path.
        limit = self._limits.max_header_bytes
        if self._head_bytes > limit and self._head_size() > limit:
            self._refuse(
                _TOO_LARGE, f"The request head exceeds {limit} bytes.", "request_header_fields_too_large"
            )
            return
        super().on_headers_complete()
        if len(self.pipeline) > MAX_PIPELINED:
            # A client that sends requests back to back without reading the answers: each queued
            # one holds a request cycle, and one read can carry thousands. No honest client
            # pipelines this deep (browsers do not pipeline at all): drop the connection.
            self._refused = True
            self._in_head = False
            self.deadline = None
            self.pipeline.clear()
            self.transport.close()
            return
        # A queued (pipelined) request's body is not read until its turn comes: no deadline.
        self.deadline = None if self.pipeline else self.loop.time() + self._limits.body_timeout

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        super().on_message_complete()
        self.deadline = None
        self._in_head = True
        self._head_bytes = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.pipeline and not self.transport.is_closing():
            # uvicorn resumes reading after every response; with requests still queued that would
            # let the client add more before the queue drains.
            self.flow.pause_reading()

    def deadline_passed(self) -> None:
        """The sweeper's call: the head or body did not arrive in time."""
        self.deadline = None
        if self.transport.is_closing():
            return
        if self._in_head and self._head_bytes:
            self._refuse(_TIMEOUT, "The request head was not received in time.", "request_timeout")
        else:
            # Never said anything (nothing to answer), or the app is reading the body: it sees
            # http.disconnect.
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """What uvicorn answers to bytes httptools cannot parse (a control character in a
        header, a body longer than its ``Content-Length`` read as a next request), in OpenAI's
        error shape instead of uvicorn's plain text; the connection is closed."""
        if self.transport.is_closing():
            return
        self._refuse(
            _BAD_REQUEST,
            "The request is not valid HTTP: a malformed request line, header or framing.",
            "invalid_http_request",
        )

    def _head_size(self) -> int:
        # request line and `name: value\r\n` per header, as received (names lower-cased, same length)
        return len(self.url) + 16 + sum(len(n) + len(v) + 4 for n, v in self.headers)

    def _refuse(self, status: bytes, message: str, code: str) -> None:
        self.deadline = None
        self._refused = True
        self._in_head = False
        self.transport.write(_response(status, message, code))
        self.transport.close()


def http_protocol(limits: ListenerLimits) -> Callable[..., GuardedHttpToolsProtocol]:
    """uvicorn's ``http=`` value: the guarded protocol with these limits (picklable for workers)."""
    return functools.partial(GuardedHttpToolsProtocol, limits=limits)
