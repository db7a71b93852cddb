"""The cache's pipelined Redis client (gateway/cache/resp.py), proven against redis-py on a real
Redis: same replies for the same commands, in order under concurrency, and recovery from faults."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from gateway.cache.resp import WRITE_BEHIND_BOUND, RespClient, RespError
from tests.jobs_helpers import PrivateRedis

URL = "redis://127.0.0.1:6379/0"
SCRIPT = "return {redis.call('GET', KEYS[1]), false, tonumber(ARGV[1]) + 1, {ARGV[2], 'x'}}"


@pytest.fixture
def prefix() -> str:
    return f"test:resp:{secrets.token_hex(4)}:"


async def test_replies_equal_redis_pys(prefix: str) -> None:
    lib = redis.Redis.from_url(URL)
    ours = RespClient(URL, 2)
    try:
        odd = b"\r\n$3\r\n*1\r\n\x00\xff" * 5
        big = secrets.token_bytes(1024 * 1024)
        assert await ours.call(b"SET", prefix + "a", odd) == b"OK"
        assert lib.set(prefix + "b", odd) is True
        assert await ours.call(b"GET", prefix + "a") == lib.get(prefix + "b") == odd
        await ours.call(b"SET", prefix + "big", big, b"PX", 60000)
        assert lib.get(prefix + "big") == big
        assert await ours.call(b"GET", prefix + "big") == big
        assert await ours.call(b"MGET", prefix + "a", prefix + "missing") == lib.mget(
            [prefix + "a", prefix + "missing"]
        )
        assert await ours.call(b"INCRBY", prefix + "n", 5) == 5 == int(lib.get(prefix + "n") or 0)
        assert await ours.call(b"DEL", prefix + "n") == 1
        sha = hashlib.sha1(SCRIPT.encode()).hexdigest()
        lib.script_flush()
        ours_reply = await ours.evalsha(sha, SCRIPT, [prefix + "a"], [41, "y"])  # NOSCRIPT → EVAL
        assert ours_reply == lib.eval(SCRIPT, 1, prefix + "a", 41, "y") == [odd, None, 42, [b"y", b"x"]]
        assert await ours.evalsha(sha, SCRIPT, [prefix + "a"], [1, "z"]) == [odd, None, 2, [b"z", b"x"]]
        with pytest.raises(RespError, match="WRONGTYPE"):
            await ours.call(b"LPUSH", prefix + "a", b"x")
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            lib.lpush(prefix + "a", b"x")
    finally:
        ours.close()
        for k in lib.scan_iter(match=prefix + "*"):
            lib.delete(k)
        lib.close()


async def test_concurrent_calls_get_their_own_replies(prefix: str) -> None:
    ours = RespClient(URL, 3)
    try:
        await asyncio.gather(*(ours.call(b"SET", f"{prefix}{i}", i * 7) for i in range(500)))
        got = await asyncio.gather(*(ours.call(b"GET", f"{prefix}{i}") for i in range(500)))
        assert got == [str(i * 7).encode() for i in range(500)]
    finally:
        await asyncio.gather(*(ours.call(b"DEL", f"{prefix}{i}") for i in range(500)))
        ours.close()


async def test_database_from_the_url(prefix: str) -> None:
    ours = RespClient("redis://127.0.0.1:6379/3", 1)
    lib = redis.Redis.from_url("redis://127.0.0.1:6379/3")
    try:
        await ours.call(b"SET", prefix + "db", b"three")
        assert lib.get(prefix + "db") == b"three"
        assert redis.Redis.from_url(URL).get(prefix + "db") is None
    finally:
        lib.delete(prefix + "db")
        lib.close()
        ours.close()


async def test_a_lost_redis_fails_calls_and_the_next_connection_recovers(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path)
    server.start()
    ours = RespClient(server.url, 1)
    try:
        assert await ours.call(b"PING") == b"PONG"
        server.stop()
        with pytest.raises((ConnectionError, OSError)):
            await ours.call(b"PING")
        with pytest.raises((ConnectionError, OSError)):  # refused while it is down
            await ours.call(b"PING")
        server.start()
        assert await ours.call(b"PING") == b"PONG"
    finally:
        ours.close()
        server.stop()


async def test_an_abandoned_call_closes_its_connection(tmp_path: Path) -> None:
    """A call cut by its caller's timeout must not leave its late reply for the next caller."""
    server = PrivateRedis(tmp_path)
    server.start()
    ours = RespClient(server.url, 1)
    try:
        await ours.call(b"SET", b"k", b"v")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await ours.call(b"BLPOP", b"nothing", b"0.3")  # Redis answers after 0.3 s
        assert await ours.call(b"GET", b"k") == b"v"  # a fresh connection, its own reply
    finally:
        ours.close()
        server.stop()


def test_only_redis_urls() -> None:
    with pytest.raises(ValueError, match="redis://"):
        RespClient("unix:///tmp/redis.sock")


async def test_a_reply_nobody_waits_for_keeps_the_order(prefix: str) -> None:
    """A fill written without waiting (its error reply included) never shifts another call's reply."""
    ours = RespClient(URL, 1)
    try:
        await ours.call(b"SET", prefix + "s", b"string")
        await ours.call(b"SET", prefix + "t", b"mine")
        for _ in range(3):
            assert ours.send_noreply(b"LPUSH", prefix + "s", b"x")  # WRONGTYPE: an error reply
            assert ours.send_noreply(b"SET", prefix + "u", b"1")
        got = await asyncio.gather(ours.call(b"GET", prefix + "t"), ours.call(b"GET", prefix + "missing"))
        assert got == [b"mine", None]
    finally:
        for k in ("s", "t", "u"):
            await ours.call(b"DEL", prefix + k)
        ours.close()


async def _until(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll ``cond`` until true (a condition, not a fixed sleep)."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)
    assert cond(), what


async def test_write_behind_writes_land_and_their_replies_are_all_read(prefix: str) -> None:
    """Fills go on a connection of their own whose replies are read in batches (no wake-up per
    write); every write lands, in order, and no reply is left unread."""
    ours = RespClient(URL, 1)
    lib = redis.Redis.from_url(URL)
    try:
        assert not ours.send_noreply(b"SET", prefix + "early", b"x")  # nothing open yet: refused
        await _until(lambda: ours.write_behind_open, "the write-behind connection opens")
        for i in range(2000):  # past DRAIN_AT: read mid-way, the rest at the interval
            assert ours.send_noreply(b"SET", prefix + "k", str(i))
            assert ours.send_noreply(b"LPUSH", prefix + "k", b"x")  # WRONGTYPE: an error reply
            if i % 100 == 99:
                await asyncio.sleep(0)  # fills come from many requests, not one loop iteration
        # Two more, with no await since: their replies cannot have been read (a drain that ran
        # meanwhile may have read all the others, on a slow runner).
        assert ours.send_noreply(b"SET", prefix + "k", b"1999")
        assert ours.send_noreply(b"LPUSH", prefix + "k", b"x")
        assert ours.write_behind_due >= 2  # not read as they come
        await _until(lambda: ours.write_behind_due == 0, "every reply read within the interval")
        assert lib.get(prefix + "k") == b"1999"
        assert await ours.call(b"GET", prefix + "k") == b"1999"  # the pipelined connection unaffected
    finally:
        lib.delete(prefix + "k")
        lib.close()
        ours.close()


async def test_write_behind_refuses_writes_a_redis_does_not_take() -> None:
    """A Redis that stops reading (stalled, or a proxy in between) costs a bounded buffer: past
    ``WRITE_BEHIND_BOUND`` pending bytes the write is refused (the caller does it the awaited
    way, under its timeout), never buffered without end."""
    stalled: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stalled.append(writer)  # never reads, never answers

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ours = RespClient(f"redis://127.0.0.1:{port}/0", 1)
    try:
        ours.send_noreply(b"PING")
        await _until(lambda: ours.write_behind_open, "the write-behind connection opens")
        value = b"v" * 65536
        written = 0
        while ours.send_noreply(b"SET", b"k", value):
            written += len(value)
            assert written < 256 * WRITE_BEHIND_BOUND, "never refused"
            if written % (16 * len(value)) == 0:
                await asyncio.sleep(0)  # let the loop move bytes into the kernel's buffers
        assert written >= WRITE_BEHIND_BOUND
    finally:
        ours.close()
        for w in stalled:
            w.close()
        server.close()
        await server.wait_closed()


async def test_write_behind_recovers_after_redis_restarts(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path)
    server.start()
    ours = RespClient(server.url, 1)
    try:
        ours.send_noreply(b"PING")
        await _until(lambda: ours.write_behind_open, "the write-behind connection opens")
        assert ours.send_noreply(b"SET", b"k", b"before")
        server.stop()
        # The paused connection learns of the loss at its next drain or write.
        await _until(lambda: (ours.send_noreply(b"PING"), not ours.write_behind_open)[1], "loss seen")
        server.start()
        lib = redis.Redis.from_url(server.url)
        try:
            await _until(
                lambda: ours.send_noreply(b"SET", b"k", b"after") and lib.get(b"k") == b"after",
                "writes land again once Redis is back",
            )
        finally:
            lib.close()
    finally:
        ours.close()
        server.stop()
