"""Stage 6, call upstream: the only module that knows how the gateway speaks HTTP to vLLM.

A small HTTP/1.1 client on asyncio protocols with httptools' response parser
(the parser uvicorn uses), keep-alive connections pooled per backend. Not
httpx: its pure-Python stack (h11, httpcore, anyio) costs 2-3x aiohttp's CPU per
relayed chunk; not aiohttp any more either: its request set-up (a ClientRequest,
a writer task, multidicts, yarl, traces) was ~30 % of the gateway's CPU per
plain request (docs/benchmarks.md). Here a request is one pre-built header
block and one write; the response is the parser's callbacks filling a buffer.

It speaks only what a gateway needs from vLLM and OpenAI-compatible providers:
POST and GET, bodies by Content-Length or chunked, TLS for https:// URLs. No
redirects, cookies, proxies or decompression (Accept-Encoding is not sent).

The rest of the gateway sees ``UpstreamClient`` and ``UpstreamResponse``:
swapping the client means rewriting this module only.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from urllib.parse import urlsplit

import httptools

from gateway.backends import Backend
from gateway.config import TimeoutSettings
from gateway.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable

# vLLM (uvicorn) closes idle keep-alive connections after 5 s: reuse ours for less than that,
# so a request never races the server's close of the connection it picked.
IDLE_REUSE_SECONDS = 4.0
HIGH_WATER = 256 * 1024  # stop reading from vLLM while this much is buffered and unread
MAX_IDLE_PER_TARGET = 256


class ProbeFailed(Exception):
    """A poller GET that got no HTTP answer."""


class _Closed(Exception):
    """The connection ended before the response did."""


class _Conn(asyncio.Protocol):
    """One keep-alive connection and the response currently arriving on it."""

    __slots__ = (
        "_paused",
        "_waiter",
        "buffered",
        "chunks",
        "complete",
        "content_type",
        "exc",
        "headers",
        "idle_since",
        "keep_alive",
        "parser",
        "release_to",
        "status",
        "transport",
        "until_close",
        "used",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.idle_since = 0.0
        self.used = False  # has carried a request before: a failure before any byte may be a stale close
        self.chunks: deque[bytes] = deque()
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.content_type = b""
        self.chunks.clear()  # empty already when pooled (put() checks): kept, not re-allocated
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.until_close = True  # no Content-Length and not chunked: the body ends with the connection
        self.exc: BaseException | None = None
        self.headers: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.release_to: _Target | None = None  # released before its last bytes came: pool it then

    # ------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("The backend switched protocols."))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"The backend sent an invalid HTTP response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.complete:
            return
        if self.headers is not None and self.headers.done() and self.until_close and exc is None:
            self.complete = True  # a close-delimited body ended normally
            self._wake()
            return
        self._fail(_Closed(_describe(exc) if exc else "connection closed"))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost decides what it meant

    # ------------------------------------------------------------ httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        n = name.lower()
        if n == b"content-type":
            self.content_type = value
        elif n in (b"content-length", b"transfer-encoding"):
            self.until_close = False

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status in (204, 304) or 100 <= self.status < 200:
            self.until_close = False
        if self.headers is not None and not self.headers.done():
            self.headers.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()
        if self.release_to is not None:
            self.release_to.put(self)

    # ------------------------------------------------------------ the response side
    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def _fail(self, exc: BaseException) -> None:
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

    def close(self) -> None:
        """Drop the connection (an unfinished response: vLLM aborts the generation)."""
        if self.transport is not None:
            self.transport.close()
        self._fail(_Closed("closed by the gateway"))


class UpstreamResponse:
    """A started upstream response: status and content type known, body not yet read."""

    __slots__ = ("_conn", "_pool", "content_type", "status")

    def __init__(self, conn: _Conn, pool: _Target) -> None:
        self._conn = conn
        self._pool = pool
        self.status = conn.status
        self.content_type = conn.content_type.decode("latin-1") or "application/json"

    async def read(self) -> bytes:
        parts: list[bytes] = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return b"".join(parts)

    async def read_chunk(self) -> bytes:
        """Whatever bytes have arrived (at least one); b"" at end of stream."""
        try:
            return await self._conn.next_chunk()
        except (_Closed, OSError) as exc:
            raise UpstreamError(f"The backend broke off its response: {_describe(exc)}") from None

    def close(self) -> None:
        # Closing (not releasing) an unfinished response drops the connection,
        # which is how vLLM learns to abort the generation.
        self._conn.close()

    def release(self) -> None:
        """Back to the pool if the response was read to its end on a reusable connection."""
        self._pool.put(self._conn)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
            if conn.transport is not None and not conn.transport.is_closing():
                if now - conn.idle_since < IDLE_REUSE_SECONDS:
                    return conn
                conn.transport.close()
        return None

    def put(self, conn: _Conn) -> None:
        t = conn.transport
        if not conn.complete and conn.release_to is None and not conn.chunks and conn.exc is None:
            # A stream relayed up to vLLM's [DONE] whose closing chunk is still on its way: pooled
            # when it arrives (on_message_complete), instead of dropping the connection.
            conn.release_to = self
            return
        if (
            t is None
            or t.is_closing()
            or not conn.complete
            or not conn.keep_alive
            or conn.chunks
            or len(self.idle) >= MAX_IDLE_PER_TARGET
        ):
            conn.close()
            return
        conn._reset()
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
            _, conn = await loop.create_connection(
                _Conn, target.host, target.port, ssl=target.ssl, server_hostname=target.server_hostname
            )
        return conn

    async def _exchange(self, target: _Target, request: list[bytes]) -> _Conn:
        """Write the request on a pooled or new connection; return once the headers are in.

        A reused connection that dies before any response byte was most likely closed by the
        server as idle just as it was picked: the request goes once more on a new connection.
        """
        loop = asyncio.get_running_loop()
        conn = target.take(time.monotonic())
        while True:
            if conn is None:
                conn = await self._connect(target)
            assert conn.transport is not None
            conn.headers = loop.create_future()
            try:
                conn.transport.writelines(request)
                await conn.headers
                return conn
            except _Closed:
                if not conn.used or conn.status:
                    raise
                conn = None  # stale keep-alive connection: once more on a fresh one
            except BaseException:
                conn.close()  # cancelled (timeout, client gone) or broken: never reused
                raise

    async def get(self, backend: Backend, path: str, timeout: float) -> tuple[int, bytes]:
        """A small GET for the background poller (health, models, metrics). Raises ProbeFailed."""
        target = self._target(backend)
        request = [b"GET " + target.base + path.encode() + b" HTTP/1.1\r\n" + target.headers + b"\r\n"]
        try:
            async with asyncio.timeout(timeout):
                conn = await self._exchange(target, request)
                resp = UpstreamResponse(conn, target)
                body = await resp.read()
        except TimeoutError:
            raise ProbeFailed(f"timed out after {timeout:g}s") from None
        except OSError as exc:
            raise ProbeFailed(_describe(exc)) from None
        except _Closed as exc:
            raise ProbeFailed(f"closed the connection without answering ({exc})") from None
        except UpstreamError as exc:
            raise ProbeFailed(exc.message) from None
        resp.release()
        return resp.status, body

    async def post(
        self,
        backend: Backend,
        path: bytes,
        body: bytes,
        request_id: str,
        extra_headers: dict[str, str] | None = None,
    ) -> UpstreamResponse:
        """Send the request; return once the response headers have arrived."""
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
            raise UpstreamTimeout(
                f"Connecting to backend {backend.label} took longer than {self._timeouts.connect:g}s.",
                code="upstream_connect_timeout",
            ) from None
        except _Closed as exc:
            raise UpstreamUnavailable(
                f"Backend {backend.label} closed the connection before answering: {exc}",
                retry_after=1,
            ) from None
        except OSError as exc:
            raise UpstreamUnavailable(
                f"Could not connect to backend {backend.label}: {_describe(exc)}", retry_after=1
            ) from None
        return UpstreamResponse(conn, target)
