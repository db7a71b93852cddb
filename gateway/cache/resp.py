"""A pipelined Redis client for the cache's per-request calls (lookup, get, fill, release).

Why not redis-py here: measured on this machine (uvloop, one Redis on loopback), redis-py's asyncio
client costs 167 µs of CPU per ``EVALSHA`` (120 µs with hiredis' parser) — two calls per cache
miss would cost a fifth of a whole proxied request, and the issue bounds a miss at 10 %. Most of
that is per-call machinery (connection pool checkout, locks, command packing, response dispatch),
not the protocol. This client keeps a few connections open and writes each command without waiting
for the previous reply (Redis answers a connection's commands in order), parses replies with
hiredis' ``Reader`` (the C parser redis-py itself uses) and hands each to its caller in FIFO order.
Writes nobody awaits (fills) go on one more connection whose replies are read in batches
(``send_noreply``): each costs a write, not a wake-up of the process.
It is proven against redis-py in tests/unit/test_cache_resp.py and measured in docs/benchmarks.md.
redis-py still does everything else the cache needs (pub/sub notices, purges, warm-up).

Only ``redis://`` and ``rediss://`` URLs (redis-py parses them: host, port, db, username,
password, TLS). A connection that fails, or on which a call times out, is closed with every call
pending on it failed; the next call opens a new one.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import hiredis
import structlog
from redis.asyncio.connection import SSLConnection, parse_url


class RespError(Exception):
    """An error reply from Redis (``NOSCRIPT ...``, ``WRONGTYPE ...``)."""


def encode(args: tuple[bytes | str | int, ...]) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n" % len(b))
        out.append(b)
        out.append(b"\r\n")
    return b"".join(out)


DRAIN_INTERVAL = 0.25  # seconds: how often the write-behind connection's replies are read
DRAIN_AT = 512  # ... or as soon as this many are due
WRITE_BEHIND_BOUND = 1 << 20  # bytes written on it and not answered yet, beyond which writes are refused
WRITE_BEHIND_DUE = 4 * DRAIN_AT  # ... or replies due
WRITE_BEHIND_DEADLINE = 2.0  # seconds without a reply while some are due: the connection is given up

log = structlog.get_logger("gateway.cache")


class _Connection(asyncio.Protocol):
    __slots__ = ("closed", "due_bytes", "on_noreply", "paused", "pending", "progress", "reader", "transport")

    def __init__(self, on_noreply: Callable[[Any], None] | None = None) -> None:
        self.reader = hiredis.Reader()
        # each call's future, or for a write nobody awaits (a fill) its size in bytes
        self.pending: deque[asyncio.Future[Any] | int] = deque()
        self.due_bytes = 0  # bytes of the writes nobody awaits, written and not answered yet
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.paused = False  # reading paused: replies wait in the kernel for the next drain
        self.progress = 0.0  # monotonic time of the last reply, or of a write when none was due
        # told each reply of a write nobody awaits (an error reply, or the exception that lost it)
        self.on_noreply = on_noreply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def pause(self) -> None:
        """Stop reading until ``drain`` (a write-behind connection with replies due). Not in
        ``connection_made``: uvloop turns reading on again when that returns."""
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def drain(self) -> None:
        """Read again: the replies due now, then whatever comes (a connection that reads while
        idle sees Redis close it, and the next write opens a new one instead of being lost)."""
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        pending = self.pending
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError:
                self.close(ConnectionError("Redis sent a reply this client cannot parse"))
                return
            if reply is False:
                return
            if not pending:
                self.close(ConnectionError("Redis sent a reply nobody asked for"))
                return
            fut = pending.popleft()
            if isinstance(fut, int):  # a write nobody awaits (a fill)
                self.due_bytes -= fut
                self.progress = time.monotonic()
                self._tell(reply)
                continue
            if fut.done():
                continue  # its caller timed out: dropped
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(RespError(str(reply)))
            else:
                fut.set_result(reply)

    def _tell(self, outcome: Any) -> None:
        if self.on_noreply is None:
            return
        try:
            self.on_noreply(outcome)
        except Exception:  # a bug in the callback must not take the connection (and its calls) down
            log.exception("cache: a no-reply callback failed")

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def close(self, exc: Exception) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        self.transport = None
        while self.pending:
            fut = self.pending.popleft()
            if isinstance(fut, int):
                self._tell(exc)  # a write that may not have landed: reported, not silently lost
            elif not fut.done():
                fut.set_exception(exc)


class RespClient:
    """``connections`` pipelined connections to one Redis; calls are spread round-robin.

    ``call(*args)`` sends one command and returns its reply (bytes, int, list, None); raises
    RespError for an error reply, ConnectionError / OSError when Redis cannot be reached. The
    caller bounds the wait (``asyncio.timeout``); a call cancelled by it closes its connection
    (``abandon``), since a Redis that does not answer one call will not answer the next.
    """

    def __init__(
        self,
        url: str,
        connections: int = 2,
        connect_timeout: float = 1.0,
        on_noreply: Callable[[Any], None] | None = None,
    ) -> None:
        if not url.startswith(("redis://", "rediss://")):
            raise ValueError("the cache's storage must be a redis:// or rediss:// URL")
        opts = parse_url(url)
        self._host = str(opts.get("host", "127.0.0.1"))
        self._port = int(opts.get("port", 6379))
        self._db = int(opts.get("db", 0) or 0)
        self._username = opts.get("username")
        self._password = opts.get("password")
        self._ssl = ssl.create_default_context() if opts.get("connection_class") is SSLConnection else None
        self._connect_timeout = connect_timeout
        self._on_noreply = on_noreply  # each reply to ``send_noreply`` (``hiredis.ReplyError`` or a value)
        self._conns: list[_Connection | None] = [None] * max(1, connections)
        self._opening: list[asyncio.Future[_Connection] | None] = [None] * len(self._conns)
        self._next = 0
        self._behind: _Connection | None = None  # write-behind connection (``send_noreply``)
        self._behind_opening: asyncio.Task[None] | None = None
        self._drain: asyncio.TimerHandle | None = None

    async def call(self, *args: bytes | str | int) -> Any:
        i = self._next = (self._next + 1) % len(self._conns)
        conn = self._conns[i]
        if conn is None or conn.closed:
            conn = await self._open(i)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        conn.pending.append(fut)
        assert conn.transport is not None
        conn.transport.write(encode(args))
        try:
            return await fut
        except asyncio.CancelledError:
            conn.close(ConnectionError("a call to Redis was abandoned"))
            raise

    def send_noreply(self, *args: bytes | str | int) -> bool:
        """Write one command without waiting for its reply. Only for writes whose loss is
        harmless (a cache fill): its reply, an error reply, or the exception that lost it, goes to
        ``on_noreply`` when known.

        It goes on a connection of its own that stops reading while replies are due and reads
        them in batches, every ``DRAIN_INTERVAL`` s or ``DRAIN_AT`` replies (each held in order by
        its size), so no task, timer or wake-up serves one write. Until that connection is open, on
        a pipelined one. Returns False when nothing can take the write: no connection open, or
        ``WRITE_BEHIND_BOUND`` bytes or ``WRITE_BEHIND_DUE`` replies outstanding (a Redis that
        does not read, or reads and does not answer, as under ``CLIENT PAUSE``); the
        caller does it the awaited way, under its timeout. A connection with replies due and
        none for ``WRITE_BEHIND_DEADLINE`` s is closed, its writes reported lost.
        """
        conn = self._behind
        if conn is not None and not conn.closed and conn.transport is not None:
            pending = conn.pending
            if len(pending) >= WRITE_BEHIND_DUE or conn.due_bytes > WRITE_BEHIND_BOUND:
                return False
            if not pending:
                conn.progress = time.monotonic()
            data = encode(args)
            pending.append(len(data))
            conn.due_bytes += len(data)
            conn.transport.write(data)
            if len(pending) >= DRAIN_AT or conn.due_bytes > WRITE_BEHIND_BOUND // 2:
                conn.drain()
            else:
                conn.pause()
                if self._drain is None:
                    self._drain = asyncio.get_running_loop().call_later(DRAIN_INTERVAL, self._drain_behind)
            return True
        if self._behind_opening is None:
            self._behind_opening = asyncio.get_running_loop().create_task(self._open_behind())
        for _ in range(len(self._conns)):
            i = self._next = (self._next + 1) % len(self._conns)
            conn = self._conns[i]
            if conn is not None and not conn.closed and conn.transport is not None:
                data = encode(args)
                conn.pending.append(len(data))  # a reply nobody waits for
                conn.due_bytes += len(data)
                conn.transport.write(data)
                return True
        return False

    @property
    def write_behind_open(self) -> bool:
        """Whether ``send_noreply`` writes on its own connection (opened by the first write)."""
        conn = self._behind
        return conn is not None and not conn.closed

    @property
    def write_behind_due(self) -> int:
        """Replies of ``send_noreply`` writes not read yet."""
        return len(self._behind.pending) if self._behind is not None else 0

    def _drain_behind(self) -> None:
        self._drain = None
        conn = self._behind
        if conn is None or conn.closed or not conn.pending:
            return
        if time.monotonic() - conn.progress > WRITE_BEHIND_DEADLINE:
            conn.close(ConnectionError("Redis stopped answering the cache's fills"))
            return
        conn.drain()
        # Looked at again while replies are due, new writes or not (a Redis gone quiet is seen).
        self._drain = asyncio.get_running_loop().call_later(DRAIN_INTERVAL, self._drain_behind)

    async def _open_behind(self) -> None:
        try:
            self._behind = await self._connect()
        except Exception:
            pass  # Redis unreachable: the next write tries again; the lookups report the outage
        finally:
            self._behind_opening = None

    async def evalsha(self, sha: str, script: str, keys: list[str], args: list[bytes | str | int]) -> Any:
        """A Lua script by its SHA1, sent in full once when Redis does not have it (NOSCRIPT)."""
        try:
            return await self.call(b"EVALSHA", sha, len(keys), *keys, *args)
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            return await self.call(b"EVAL", script, len(keys), *keys, *args)

    async def _open(self, i: int) -> _Connection:
        opening = self._opening[i]
        if opening is not None:  # another call is already connecting this slot
            return await asyncio.shield(opening)
        fut: asyncio.Future[_Connection] = asyncio.get_running_loop().create_future()
        self._opening[i] = fut
        try:
            conn = await self._connect()
            self._conns[i] = conn
            fut.set_result(conn)
            return conn
        except BaseException as exc:
            fut.set_exception(exc if isinstance(exc, Exception) else ConnectionError("cancelled"))
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            self._opening[i] = None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            _, conn = await loop.create_connection(
                lambda: _Connection(self._on_noreply),
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl else None,
            )
            setup: list[tuple[bytes | str | int, ...]] = []
            if self._password is not None:
                auth: tuple[bytes | str | int, ...] = (b"AUTH", self._password)
                setup.append(auth if self._username is None else (b"AUTH", self._username, self._password))
            if self._db:
                setup.append((b"SELECT", self._db))
            futs = []
            for cmd in setup:
                f: asyncio.Future[Any] = loop.create_future()
                conn.pending.append(f)
                assert conn.transport is not None
                conn.transport.write(encode(cmd))
                futs.append(f)
            try:
                for f in futs:
                    await f
            except BaseException:
                conn.close(ConnectionError("Redis refused the connection's set-up"))
                for f in futs:  # each failed: retrieved, or the loop logs each as never retrieved
                    if f.done() and not f.cancelled():
                        f.exception()
                raise
        return conn

    def close(self) -> None:
        for conn in [*self._conns, self._behind]:
            if conn is not None:
                conn.close(ConnectionError("client closed"))
        self._conns = [None] * len(self._conns)
        self._behind = None
        if self._drain is not None:
            self._drain.cancel()
            self._drain = None
        if self._behind_opening is not None:
            self._behind_opening.cancel()
            self._behind_opening = None
