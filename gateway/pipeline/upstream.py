"""Stage 6, call upstream: the only module that knows how the gateway speaks HTTP to vLLM.

A small HTTP/1.1 client on asyncio protocols with httptools' response parser
(the parser uvicorn uses), keep-alive connections pooled per backend. Not
httpx: its pure-Python stack (h11, httpcore, anyio) costs 2-3x aiohttp's CPU per
relayed chunk; not aiohttp any more either: its request set-up (a ClientRequest,
a writer task, multidicts, yarl, traces) was ~30 % of the gateway's CPU per
plain request (docs/benchmarks.md). Here a request is one pre-built header
block and one write; the response is the parser's callbacks filling a buffer.

It speaks only what a gateway needs from vLLM and OpenAI-compatible providers:
POST and GET (never HEAD), bodies by Content-Length, chunked or until the
connection closes, TLS for https:// URLs. Interim 1xx responses are skipped
(RFC 9110 §15.2); a 101 is an error. No redirects, cookies, proxies or
decompression (Accept-Encoding is not sent).

Connection reuse follows RFC 9112 §9.3 the way h11 does, and is proven against h11
(tests/security/test_upstream_parser_differential.py): a connection goes back to
the pool only when its response ended exactly at the last byte received, on
HTTP/1.1 without ``Connection: close``. Each exchange gets a fresh parser, and a
connection that receives anything (a byte or EOF) while no exchange is running on
it is closed: a backend that writes a stray response can never have it read as
the next request's answer.

The rest of the gateway sees ``UpstreamClient`` and ``UpstreamResponse``:
swapping the client means rewriting this module only.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from collections import deque
from typing import Protocol
from urllib.parse import urlsplit

from gateway.backends import Backend
from gateway.config import DEFAULT_MAX_RESPONSE_BYTES, TimeoutSettings
from gateway.errors import UpstreamError, UpstreamResponseTooLarge, UpstreamTimeout, UpstreamUnavailable
from gateway.pipeline.upstream_conn import BROKE_OFF, _Closed, _Conn

try:  # bytes waiting in the kernel for a pooled connection: a plain-TCP check, POSIX only
    import fcntl
    import termios

    _FIONREAD: int | None = termios.FIONREAD
except ImportError:  # pragma: no cover - Windows
    _FIONREAD = None

# vLLM (uvicorn) closes idle keep-alive connections after 5 s: reuse ours for less than that,
# so a request never races the server's close of the connection it picked.
IDLE_REUSE_SECONDS = 4.0
MAX_IDLE_PER_TARGET = 256
_NO_BYTES = b"\0\0\0\0"
# What is read of a backend's error body (4xx/5xx): its message is in the first few hundred bytes.
MAX_ERROR_BODY_BYTES = 64 * 1024
# What the health poller reads of one answer: vLLM's /metrics is ~52 KB per engine and model
# (0.32, one engine), /v1/models ~0.5 KB per model; 4 MiB is 80 such engines' pages.
MAX_PROBE_BYTES = 4 * 1024 * 1024


class ProbeFailed(Exception):
    """A poller GET that got no HTTP answer."""


class ChunkSource(Protocol):
    """A response body read chunk by chunk (``UpstreamResponse``, egress's ``ResponseStream``)."""

    async def read_chunk(self) -> bytes: ...

    def close(self) -> None: ...


async def read_bounded(source: ChunkSource, limit: int, who: str) -> bytes:
    """The whole body, at most ``limit`` bytes; past it the connection is closed (the rest is
    never read) and UpstreamResponseTooLarge names ``who`` ("The backend"). Counting costs an
    addition per chunk."""
    parts: list[bytes] = []
    size = 0
    while chunk := await source.read_chunk():
        size += len(chunk)
        if size > limit:
            source.close()
            raise UpstreamResponseTooLarge(
                f"{who} sent a response larger than the gateway's limit ({limit} bytes)."
            )
        parts.append(chunk)
    return b"".join(parts)


async def read_head(source: ChunkSource, limit: int) -> bytes:
    """At most the first ``limit`` bytes of the body (an error body's message); a longer body is
    not read further and its connection is closed."""
    parts: list[bytes] = []
    size = 0
    while chunk := await source.read_chunk():
        room = limit - size
        if len(chunk) > room:
            parts.append(chunk[:room])
            source.close()
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


class UpstreamResponse:
    """A started upstream response: status and content type known, body not yet read.

    End it with exactly one of ``release()`` (the exchange succeeded) or ``close()``.
    """

    __slots__ = ("_at_end", "_conn", "_ended", "_pool", "content_type", "status")

    def __init__(self, conn: _Conn, pool: _Target) -> None:
        self._conn = conn
        self._pool = pool
        self._at_end = False
        self._ended = False  # released or closed: the connection may carry someone else's exchange now
        self.status = conn.status
        self.content_type = conn.content_type.decode("latin-1") or "application/json"

    async def read(self, limit: int = DEFAULT_MAX_RESPONSE_BYTES) -> bytes:
        """The whole body, at most ``limit`` bytes (``streaming.max_response_bytes``).

        Raises UpstreamResponseTooLarge once more than ``limit`` bytes arrived (the connection
        is then closed: the rest of the body is never read, and never reaches the pool), or
        UpstreamError if the connection ends first. Counting costs an addition per chunk
        (a chunk is whatever arrived, up to ``HIGH_WATER`` buffered plus one packet).
        """
        return await read_bounded(self, limit, "The backend")

    async def read_prefix(self, limit: int = MAX_ERROR_BODY_BYTES) -> bytes:
        """At most the first ``limit`` bytes of the body: enough of an error body for its message.

        A longer body is not read further: the connection is closed (``release()`` then does
        nothing), so a backend's endless error page costs ``limit`` bytes. Raises UpstreamError
        if the connection ends before the body (or the prefix) does.
        """
        return await read_head(self, limit)

    async def read_chunk(self) -> bytes:
        """Whatever bytes have arrived (at least one); b"" at end of body.

        Raises UpstreamError (plain-English message) when the connection ends first.
        """
        try:
            return await self._conn.next_chunk()
        except _Closed as exc:
            raise UpstreamError(str(exc)) from None
        except OSError:
            raise UpstreamError(BROKE_OFF) from None

    def body_consumed(self) -> None:
        """Declare the body read to the end its payload defines (an SSE stream's ``data: [DONE]``).

        ``release()`` may then pool a connection whose HTTP message has not ended yet: when the
        message's remaining framing (the zero-length chunk) arrives, and nothing else with it.
        """
        self._at_end = True

    def close(self) -> None:
        # Closing (not releasing) an unfinished response drops the connection,
        # which is how vLLM learns to abort the generation.
        if not self._ended:
            self._ended = True
            self._conn.close()

    def release(self) -> None:
        """End a successful exchange: the connection goes back to the pool only if the response
        ended cleanly (complete, exactly at its last byte, keep-alive), or, after
        ``body_consumed()``, when its last framing bytes arrive; otherwise it is closed.
        """
        if not self._ended:
            self._ended = True
            self._conn.release(self._pool, self._at_end)


def _plain(exc: BaseException) -> str:
    """A connection failure in words, without Python class names."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or 'handshake failed'}"
    if isinstance(exc, socket.gaierror):
        return f"name resolution failed: {exc.strerror}"
    if isinstance(exc, OSError):
        if isinstance(exc.errno, int) and exc.errno > 0:
            return os.strerror(exc.errno).lower()
        return str(exc) or "connection failed"
    return "connection failed"


def _bytes_waiting(fd: int) -> bool:
    """Bytes the kernel holds for a socket that the event loop has not read yet."""
    if fd < 0 or _FIONREAD is None:
        return False
    try:
        return fcntl.ioctl(fd, _FIONREAD, _NO_BYTES) != _NO_BYTES
    except OSError:
        return True


class _Target:
    """One backend URL: where to connect, the request line's prefix, idle connections."""

    __slots__ = ("_posts", "base", "headers", "host", "idle", "port", "server_hostname", "ssl")

    def __init__(self, url: str, auth_header: str | None, ssl_context: ssl.SSLContext | None) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {url}")
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.ssl = ssl_context if u.scheme == "https" else None
        self.server_hostname = self.host if self.ssl is not None else None
        self.base = u.path.rstrip("/").encode()
        netloc = self.host if u.port is None else f"{self.host}:{u.port}"
        if ":" in self.host:  # IPv6 literal
            netloc = f"[{self.host}]" + ("" if u.port is None else f":{u.port}")
        head = f"Host: {netloc}\r\n"
        if auth_header is not None:
            head += f"Authorization: {auth_header}\r\n"
        self.headers = head.encode("latin-1")
        self.idle: deque[_Conn] = deque()
        self._posts: dict[bytes, bytes] = {}

    def post_head(self, path: bytes) -> bytes:
        """The fixed start of a POST to ``path``, up to the request id's value (built once per path)."""
        head = self._posts.get(path)
        if head is None:
            head = self._posts[path] = (
                b"POST "
                + self.base
                + path
                + b" HTTP/1.1\r\n"
                + self.headers
                + b"Content-Type: application/json\r\nX-Request-Id: "
            )
        return head

    def take(self, now: float) -> _Conn | None:
        idle = self.idle
        while idle:
            conn = idle.pop()  # the most recently used: the one least likely closed by the server
            t = conn.transport
            if t is not None and not t.is_closing():
                # Bytes already waiting (a stray response the loop has not read yet) disqualify it
                # too: they would be read as this request's answer.
                if now - conn.idle_since < IDLE_REUSE_SECONDS and not _bytes_waiting(conn.fd):
                    return conn
                t.close()
        return None

    def put(self, conn: _Conn) -> None:
        """Pool a connection whose response ended cleanly (``_Conn.release`` checked that)."""
        t = conn.transport
        if t is None or t.is_closing() or len(self.idle) >= MAX_IDLE_PER_TARGET:
            conn.close()
            return
        conn.headers = conn.exc = None
        conn.used = True
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


class UpstreamClient:
    def __init__(self, timeouts: TimeoutSettings) -> None:
        self._timeouts = timeouts
        self._targets: dict[tuple[str, str | None], _Target] = {}
        self._ssl: ssl.SSLContext | None = None

    async def start(self) -> None:
        pass  # connections open on first use

    async def close(self) -> None:
        for target in self._targets.values():
            target.close()
        self._targets.clear()

    def _target(self, backend: Backend) -> _Target:
        key = (backend.url, backend.auth_header)
        t = self._targets.get(key)
        if t is None:
            if backend.url.startswith("https:") and self._ssl is None:
                self._ssl = ssl.create_default_context()
            t = self._targets[key] = _Target(backend.url, backend.auth_header, self._ssl)
        return t

    async def _connect(self, target: _Target) -> _Conn:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._timeouts.connect):
            transport, conn = await loop.create_connection(
                _Conn, target.host, target.port, ssl=target.ssl, server_hostname=target.server_hostname
            )
        if target.ssl is None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                conn.fd = sock.fileno()
        return conn

    async def _exchange(self, target: _Target, request: list[bytes]) -> _Conn:
        """Write the request on a pooled or new connection; return once the final headers are in.

        A reused connection that ends before a single response byte arrived was most likely
        closed by the server as idle just as it was picked: the request goes once more on a
        new connection. After any byte it never does: the backend may have acted on it.
        Raises _Closed (no byte on a fresh connection), UpstreamError (the backend answered
        part of a response, or an invalid one), OSError, TimeoutError.
        """
        conn = target.take(time.monotonic())
        while True:
            if conn is None:
                conn = await self._connect(target)
            assert conn.transport is not None
            headers = conn.begin()
            try:
                conn.transport.writelines(request)
                await headers
                return conn
            except _Closed:
                if conn.answered:
                    raise UpstreamError(BROKE_OFF) from None
                if not conn.used:
                    raise
                conn = None  # stale keep-alive connection: once more on a fresh one
            except BaseException:
                conn.close()  # cancelled (timeout, client gone) or broken: never reused
                raise

    async def get(
        self, backend: Backend, path: str, timeout: float, limit: int = MAX_PROBE_BYTES
    ) -> tuple[int, bytes]:
        """A small GET for the background poller (health, models, metrics): (status, body).

        Raises ProbeFailed (plain-English reason) when no complete answer of at most ``limit``
        bytes came within ``timeout`` seconds; the connection is then closed, never pooled.
        """
        target = self._target(backend)
        request = [b"GET " + target.base + path.encode() + b" HTTP/1.1\r\n" + target.headers + b"\r\n"]
        resp: UpstreamResponse | None = None
        try:
            async with asyncio.timeout(timeout):
                resp = UpstreamResponse(await self._exchange(target, request), target)
                body = await resp.read(limit)
        except TimeoutError:
            failure = f"timed out after {timeout:g}s"
        except UpstreamResponseTooLarge:
            failure = f"answered more than {limit} bytes"
        except OSError as exc:
            failure = f"could not connect ({_plain(exc)})"
        except _Closed:
            failure = "closed the connection without answering"
        except UpstreamError as exc:
            failure = exc.message
        except BaseException:
            if resp is not None:
                resp.close()
            raise
        else:
            resp.release()
            return resp.status, body
        if resp is not None:
            resp.close()
        raise ProbeFailed(failure)

    async def post(
        self,
        backend: Backend,
        path: bytes,
        body: bytes,
        request_id: str,
        extra_headers: dict[str, str] | None = None,
    ) -> UpstreamResponse:
        """Send the request; return once the final response headers have arrived.

        Raises UpstreamTimeout (connect), UpstreamUnavailable (no connection, or closed
        without a byte of answer: retryable), UpstreamError (a partial or invalid answer).
        """
        target = self._target(backend)
        extra = "".join(f"\r\n{k}: {v}" for k, v in extra_headers.items()) if extra_headers else ""
        head = b"".join(
            (
                target.post_head(path),
                f"{request_id}{extra}\r\nContent-Length: {len(body)}\r\n\r\n".encode("latin-1"),
            )
        )
        try:
            conn = await self._exchange(target, [head, body])
        except TimeoutError:
            err = UpstreamTimeout(
                f"Connecting to backend {backend.label} took longer than {self._timeouts.connect:g}s.",
                code="upstream_connect_timeout",
            )
            err.retryable = True  # nothing was sent: another replica may take it
            raise err from None
        except _Closed:
            raise UpstreamUnavailable(
                f"Backend {backend.label} closed the connection before answering.", retry_after=1
            ) from None
        except OSError as exc:
            raise UpstreamUnavailable(
                f"Could not connect to backend {backend.label}: {_plain(exc)}.", retry_after=1
            ) from None
        return UpstreamResponse(conn, target)
