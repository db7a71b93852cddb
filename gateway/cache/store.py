"""The cache's Redis calls: look up (and take the single-flight lock), fill, release, purge, and
the notices that wake requests waiting on another replica's fill.

Every per-request call is one round trip (a Lua script or one command) under ``timeout`` on the
pipelined client (resp.py). Notices travel on one pub/sub channel, ``{prefix}n``: the message is
``<digest>:<outcome>``: ``1`` stored, ``0`` the fill failed (a waiter takes the lock over), ``2``
nobody's answer would be stored (a 4xx, an answer too large: every waiter asks at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import Callable
from typing import Any, Final

import structlog

from gateway.cache.key import CacheKey
from gateway.cache.resp import RespClient
from gateway.storage_timeout import storage_timeout

# What became of a fill: a notice's outcome, and a local filler's result (stage.py).
FAILED: Final = 0  # not stored for a reason of that attempt's (client gone, backend failure): try again
STORED: Final = 1
UNSTORABLE: Final = 2  # whoever asks again gets no storable answer either (a 4xx, too large)
ALL: Final = "*"  # a notice for every waiter (never a digest: those are hex)

# KEYS: stream entry, plain entry, lock, waiters' mark. ARGV: lock token, lock ms, take the lock
# on a miss (1/0), the mark's ms. A caller that finds the lock held marks it waited: only then do
# fills and releases publish.
_LOOKUP = """
local s = redis.call('GET', KEYS[1])
local j = redis.call('GET', KEYS[2])
if s or j or ARGV[3] == '0' then return {s, j, 0} end
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then return {false, false, 1} end
redis.call('SET', KEYS[4], 1, 'PX', ARGV[4])
return {false, false, 0, redis.call('GET', KEYS[3])}
"""
# KEYS: entry, lock, waiters' mark. ARGV: value, ttl ms, lock token, channel, notice.
_FILL = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
if redis.call('DEL', KEYS[3]) == 1 then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
return 1
"""
# KEYS: lock, waiters' mark. ARGV: lock token, channel, notice.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if redis.call('DEL', KEYS[2]) == 1 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
end
return 1
"""
# KEYS: lock. ARGV: lock token, lease ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class _Script:
    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()


class CacheStore:
    """The cache's storage: one Redis server or primary (not Redis Cluster).

    The per-request calls (``lookup``, ``get``, ``fill``, ``release``) go through the pipelined
    client (``resp.py``), each under ``timeout``; purges, notices and the warm-up through
    redis-py.
    """

    def __init__(
        self,
        url: str,
        prefix: str,
        timeout: float,
        connections: int,
        on_fill_reply: Callable[[Any], None] | None = None,
    ) -> None:
        import redis.asyncio as aioredis

        self.prefix = prefix
        self.channel = prefix + "n"
        self._timeout = timeout
        self.mark_ms = 60_000  # how long a waiters' mark lasts (set from single_flight_wait)
        self.fast = RespClient(url, connections, max(timeout, 1.0), on_fill_reply)
        self.redis = aioredis.Redis.from_url(
            url, socket_timeout=5.0, socket_connect_timeout=2.0, health_check_interval=30, max_connections=8
        )
        self._lookup = _Script(_LOOKUP)
        self._fill = _Script(_FILL)
        self._release = _Script(_RELEASE)
        self._renew = _Script(_RENEW)
        self._listener: asyncio.Task[None] | None = None
        self._warm: asyncio.Task[None] | None = None
        self.log = structlog.get_logger("gateway.cache")

    async def _eval(self, script: _Script, keys: list[str], args: list[bytes | str | int]) -> Any:
        async with storage_timeout(self._timeout):
            return await self.fast.evalsha(script.sha, script.text, keys, args)

    async def lookup(
        self, key: CacheKey, token: str, lock_ms: int, take_lock: bool
    ) -> tuple[bytes | None, bytes | None, bool, bytes | None]:
        """(stored stream, stored plain answer, whether this caller took the single-flight lock,
        the lock's value when another request holds it)."""
        out = await self._eval(
            self._lookup,
            [key.entry + "s", key.entry + "j", key.lock, key.lock + ":w"],
            [token, lock_ms, 1 if take_lock else 0, self.mark_ms],
        )
        return out[0], out[1], bool(out[2]), out[3] if len(out) > 3 else None

    async def peek(self, key: CacheKey) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(stored stream, stored plain answer, the lock's value or None)."""
        async with storage_timeout(self._timeout):
            out = await self.fast.call(b"MGET", key.entry + "s", key.entry + "j", key.lock)
        return out[0], out[1], out[2]

    async def renew(self, key: CacheKey, token: str, lease_ms: int) -> None:
        """Extend the lock's expiry while ``token`` holds it."""
        await self._eval(self._renew, [key.lock], [token, lease_ms])

    def fill_nowait(self, key: CacheKey, kind: bytes, value: bytes, ttl_ms: int, token: str) -> bool:
        """``fill`` written without waiting for Redis' answer (its cost on the request path is
        the write; the reply goes to ``on_fill_reply`` later); False when nothing can take the
        write (then ``fill``)."""
        return self.fast.send_noreply(
            b"EVAL",
            self._fill.text,
            3,
            key.entry + kind.decode(),
            key.lock,
            key.lock + ":w",
            value,
            ttl_ms,
            token,
            self.channel,
            key.digest + ":1",
        )

    async def fill(self, key: CacheKey, kind: bytes, value: bytes, ttl_ms: int, token: str) -> None:
        """Store an entry, release the lock when ``token`` holds it, and wake the waiters."""
        await self._eval(
            self._fill,
            [key.entry + kind.decode(), key.lock, key.lock + ":w"],
            [value, ttl_ms, token, self.channel, key.digest + ":1"],
        )

    async def release(self, key: CacheKey, token: str, outcome: int = FAILED) -> None:
        """Give the lock back without an entry (the answer was not storable) and wake the waiters,
        telling them why: ``FAILED`` (one of them takes the lock over) or ``UNSTORABLE``."""
        await self._eval(
            self._release, [key.lock, key.lock + ":w"], [token, self.channel, f"{key.digest}:{outcome}"]
        )

    async def purge(self, team_seg: str | None, model_seg: str | None) -> int:
        """Delete the entries of a team and/or a model (all entries when both are None); returns
        how many. SCAN in batches with UNLINK: Redis is never blocked for long; not under the
        lookup timeout (an admin call may take seconds on a large cache)."""
        pattern = f"{_glob_escape(self.prefix)}e:{team_seg or '*'}:{model_seg or '*'}:*"
        deleted = 0
        batch: list[bytes] = []
        async for k in self.redis.scan_iter(match=pattern, count=1000):
            batch.append(k)
            if len(batch) >= 500:
                deleted += int(await self.redis.unlink(*batch))
                batch.clear()
        if batch:
            deleted += int(await self.redis.unlink(*batch))
        return deleted

    def listen(self, on_notice: Callable[[str, int], None]) -> None:
        """Start the notices' subscriber (reconnects with backoff while Redis is away) and warm
        the connections up (a first burst of lookups would otherwise open them all at once and
        load the scripts, and time out)."""
        loop = asyncio.get_running_loop()
        self._listener = loop.create_task(self._listen(on_notice))
        self._warm = loop.create_task(self._warm_up())

    async def _warm_up(self) -> None:
        try:
            async with asyncio.timeout(5.0):
                for script in (self._lookup, self._fill, self._release, self._renew):
                    await self.redis.script_load(script.text)
                for _ in range(len(self.fast._conns)):
                    await self.fast.call(b"PING")
        except Exception as exc:  # Redis away at start: lookups bypass until it answers
            self.log.info("cache warm-up skipped", cause=type(exc).__name__)

    async def _listen(self, on_notice: Callable[[str, int], None]) -> None:
        pause = 0.1
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                pause = 0.1
                while True:
                    msg = await pubsub.get_message(timeout=30.0)
                    if msg is None:
                        continue
                    data = msg.get("data")
                    if isinstance(data, bytes):
                        digest, _, outcome = data.decode("ascii", "replace").partition(":")
                        on_notice(
                            digest, STORED if outcome == "1" else UNSTORABLE if outcome == "2" else FAILED
                        )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: no notice can come, so no waiter waits for one
                self.log.info("cache notices interrupted", cause=type(exc).__name__)
                on_notice(ALL, FAILED)
                await asyncio.sleep(pause)
                pause = min(5.0, pause * 2)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        for task in (self._listener, self._warm):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self.fast.close()
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
