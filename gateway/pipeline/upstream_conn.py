"""One keep-alive HTTP/1.1 connection to a backend and the exchange running on it.

The protocol half of the upstream client (gateway/pipeline/upstream.py): an asyncio
protocol feeding httptools' response parser, a fresh parser per exchange, 1xx
interim responses skipped (RFC 9110 §15.2), and the reuse rule of RFC 9112 §9.3 as
h11 applies it: a connection is pooled only when its response ended exactly at the
last byte received; any byte or EOF while no exchange runs closes it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

import httptools

from gateway.errors import UpstreamError

if TYPE_CHECKING:
    from gateway.pipeline.upstream import _Target

HIGH_WATER = 256 * 1024  # stop reading from vLLM while this much is buffered and unread
# A stream relayed to its `data: [DONE]` waits this long for the zero-length chunk that ends the
# HTTP message before its connection is dropped instead of pooled.
END_WAIT_SECONDS = 2.0

BROKE_OFF = "The backend closed the connection before finishing its response."


class _Closed(Exception):
    """The connection ended before the response did; the message is plain English."""


class _Stop(Exception):
    """Raised by a parser callback to stop parsing; the callback has recorded the outcome."""


class _Conn(asyncio.Protocol):
    """One keep-alive connection and the exchange currently running on it.

    Life of an exchange: ``begin()`` (fresh parser, ``reading``), the final response's
    headers resolve ``headers``, body bytes fill ``chunks``, ``on_message_complete`` sets
    ``complete`` and ``_settle`` decides ``reusable`` (the message ended exactly at the last
    byte received, on a keep-alive connection). Bytes or EOF while not ``reading`` close it.
    """

    __slots__ = (
        "_paused",
        "_waiter",
        "answered",
        "buffered",
        "chunked",
        "chunks",
        "complete",
        "connection_header",
        "content_type",
        "end_timer",
        "exc",
        "fd",
        "final",
        "headers",
        "idle_since",
        "interim",
        "keep_alive",
        "parser",
        "reading",
        "release_to",
        "reusable",
        "status",
        "transport",
        "until_close",
        "used",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.fd = -1  # the socket, for the pending-bytes check on reuse (plain TCP only)
        self.parser = httptools.HttpResponseParser(self)  # replaced by a fresh one per exchange
        self.idle_since = 0.0
        self.used = False  # has carried a request before: a failure before any byte may be a stale close
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.reading = False  # an exchange is waiting for its response's bytes
        self.answered = False  # the current exchange received at least one byte
        self.complete = False
        self.reusable = False
        self.exc: BaseException | None = None
        self.headers: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.release_to: _Target | None = None  # released at the body's end: pool it when the message ends
        self.end_timer: asyncio.TimerHandle | None = None
        self._message_begin()

    def begin(self) -> asyncio.Future[None]:
        """Start an exchange: a fresh parser; the future resolves when the final headers are in."""
        self.parser = httptools.HttpResponseParser(self)
        self.reading = True
        self.answered = self.complete = self.reusable = self.final = False
        self.exc = None
        self.headers = fut = asyncio.get_running_loop().create_future()
        return fut

    # ------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.reading:
            # Between exchanges, or after the response ended: nothing may arrive now. A late
            # second response must never become the next request's answer.
            self._poison()
            return
        self.answered = True
        c = data[0]
        if (c == 13 or c == 10) and not data.strip(b"\r\n"):
            # Only line ends (rare: a split right before a message's end). The parser skips
            # line ends after a message silently, so feed them one at a time to see where it ends.
            for i in range(len(data)):
                self._feed(data[i : i + 1])
                if not self.reading:
                    return
                if self.complete:
                    self._settle(i + 1 == len(data))
                    return
            return
        self._feed(data)
        if self.complete and self.reading:
            # After the message, any byte but a line end starts a second one, which
            # on_message_begin refuses (settled above as not exact); line ends the parser skips
            # silently, so count them. This packet holds a byte of the message that is not a
            # line end, so the line ends the message itself ends with are all in it.
            self._settle(_line_end_run(data) == self._own_line_ends())

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("The backend switched protocols, which the gateway does not support."))
        except httptools.HttpParserError as exc:
            if self.complete:
                self._settle(False)  # bytes after the end of the response
            elif self.exc is None:
                self._fail(UpstreamError(f"The backend sent an invalid HTTP response ({exc})."))

    def _own_line_ends(self) -> int:
        """How many CR/LF bytes end the message just completed.

        A chunked message ends with the last-chunk or trailer line's CRLF and the final CRLF; a
        message without a body with the header block's CRLF CRLF. A Content-Length body ends
        with its last byte: its own run of line ends, plus the header block's if the whole body
        is line ends (then it all arrived in this packet, so it is all in ``chunks``).
        """
        if self.chunked or not self.chunks:
            return 4
        n = 0
        for piece in reversed(self.chunks):
            k = _line_end_run(piece)
            n += k
            if k < len(piece):
                return n
        return n + 4

    def _settle(self, exact: bool) -> None:
        """The response is complete: reusable only if it ended exactly at the last byte received."""
        self.reading = False
        self.reusable = exact and self.keep_alive
        if not exact and self.transport is not None:
            self.transport.close()  # bytes after the end: the stream is out of step, never reuse it
        target = self.release_to
        if target is not None:
            self._stop_end_wait()
            if self.reusable and not self.chunks:
                target.put(self)
            else:
                self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.reusable = False
        if self.reading:
            if self.final and self.until_close and exc is None and self.exc is None:
                self.reading = False
                self.complete = True  # a close-delimited body ended normally
                self._stop_end_wait()
                self._wake()
                return
            self._fail(_Closed(BROKE_OFF))  # closed or reset: the same to the client
        self._stop_end_wait()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost decides what it meant

    def _poison(self) -> None:
        self.reading = self.reusable = False
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------ httptools callbacks
    def _message_begin(self) -> None:
        self.status = 0
        self.content_type = b""
        self.until_close = True  # no Content-Length and not chunked: the body ends with the connection
        self.chunked = self.connection_header = False
        self.keep_alive = False
        self.interim = False
        self.final = False

    def on_message_begin(self) -> None:
        if self.complete:
            raise _Stop  # a second message after the response: data_received settles it as poisoned
        self._message_begin()  # the first message, or the final one after a 1xx

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.final:
            return  # trailer fields: they never change framing or reuse (as h11)
        n = name.lower()
        if n == b"content-type":
            self.content_type = value
        elif n == b"content-length":
            self.until_close = False
        elif n == b"transfer-encoding":
            self.until_close = False
            self.chunked = True
        elif n == b"connection":
            self.connection_header = True

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                self._fail(
                    UpstreamError("The backend switched protocols, which the gateway does not support.")
                )
                raise _Stop
            self.interim = True  # RFC 9110 §15.2: skip interim responses, the final one follows
            return
        self.status = status
        self.final = True
        # RFC 9112 §9.3: persistent only on HTTP/1.1 without "Connection: close" (h11's rule).
        # llhttp also keeps HTTP/1.0 with "Connection: keep-alive"; the version costs 0.3 µs
        # to read, so only when there was a Connection header.
        keep_alive = parser.should_keep_alive()
        if keep_alive and self.connection_header:
            keep_alive = parser.get_http_version() == "1.1"
        self.keep_alive = keep_alive
        if status == 204 or status == 304:
            self.until_close = False
        h = self.headers
        if h is not None and not h.done():
            h.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.complete = True  # data_received settles whether the connection may be reused
        self._wake()

    # ------------------------------------------------------------ the response side
    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self.reading = self.reusable = False
        if self.exc is None:
            self.exc = exc
        h = self.headers
        if h is not None and not h.done():
            h.set_exception(exc)
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    async def next_chunk(self) -> bytes:
        """Whatever body bytes have arrived (at least one); b"" at the end of the body."""
        while True:
            if self.chunks:
                data = b"".join(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
                self.chunks.clear()
                self.buffered = 0
                if self._paused and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return data
            if self.complete:
                return b""
            if self.exc is not None:
                raise self.exc
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def release(self, target: _Target, at_end: bool) -> None:
        if self.complete and not self.reading:
            if self.reusable and not self.chunks:
                target.put(self)
            else:
                self.close()
        elif at_end and self.reading and self.final and not self.chunks and self.release_to is None:
            # The body was read to its end (vLLM's [DONE]); the zero-length chunk that ends the
            # message is still on its way: pooled if exactly that arrives, closed otherwise.
            self.release_to = target
            self.end_timer = asyncio.get_running_loop().call_later(END_WAIT_SECONDS, self.close)
        else:
            self.close()

    def _stop_end_wait(self) -> None:
        self.release_to = None
        if self.end_timer is not None:
            self.end_timer.cancel()
            self.end_timer = None

    def close(self) -> None:
        """Drop the connection (an unfinished response: vLLM aborts the generation)."""
        self._stop_end_wait()
        if self.transport is not None:
            self.transport.close()
        self._fail(_Closed("The gateway closed the connection to the backend."))


def _line_end_run(data: bytes) -> int:
    """How many CR/LF bytes end ``data`` (no copy when none do)."""
    return len(data) - len(data.rstrip(b"\r\n"))
