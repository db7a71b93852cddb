"""Adversarial tests of the cache's write-behind connection (gateway/cache/resp.py ``send_noreply``)
and of how the cache counts fills from its replies (gateway/cache/stage.py ``_fill_replied``).

Real Redis servers and real sockets; nothing of the client under test is mocked. Every test runs on
uvloop (the gateway's loop), where ``pause_reading`` and a raising ``data_received`` behave as in
production. Waits are polls of a condition with a deadline.

Written by an adversarial review of the write-behind connection: each ``test_finding_*`` failed
before its fix (their docstrings describe the defect as found); each ``test_holds_*`` probes an
attack the code survived, kept as a regression guard.
"""

from __future__ import annotations

import asyncio
import gc
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis
import uvloop

from gateway.cache.resp import DRAIN_AT, DRAIN_INTERVAL, WRITE_BEHIND_BOUND, RespClient
from tests.jobs_helpers import PrivateRedis, private_redis

URL = "redis://127.0.0.1:6379/0"


def run(fn: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(fn())  # type: ignore[arg-type]


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``cond`` until true or ``timeout`` s; returns whether it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.02)
    return cond()


def behind_laddr(client: RespClient) -> str:
    """``ip:port`` of the write-behind connection's local end (Redis' ``addr`` for it)."""
    conn = client._behind
    assert conn is not None and conn.transport is not None
    host, port = conn.transport.get_extra_info("sockname")[:2]
    return f"{host}:{port}"


def client_addrs(admin: redis.Redis) -> set[str]:
    return {c["addr"] for c in admin.client_list()}


async def open_behind(client: RespClient) -> None:
    client.send_noreply(b"PING")  # on nothing or a lookup connection: opens the write-behind one
    assert await until(lambda: client.write_behind_open), "the write-behind connection opens"
    assert await until(lambda: client.write_behind_due == 0), "its first replies read"


# -- findings ---------------------------------------------------------------------------------------


def test_on_uvloop_the_write_behind_connection_stops_reading_while_replies_are_due() -> None:
    """On uvloop, the gateway's loop (gateway/cli.py): a fill pauses reading until the next drain
    (uvloop turns reading on again after ``connection_made`` returns, so a pause there would not
    hold), and once its replies are read the idle connection reads again, so it sees Redis close
    it. Found on uvloop; asyncio's loop hid it."""

    async def main() -> None:
        replies: list[Any] = []
        ours = RespClient(URL, 1, on_noreply=replies.append)
        try:
            await open_behind(ours)
            conn = ours._behind
            assert conn is not None and conn.transport is not None
            assert conn.transport.is_reading(), "an idle write-behind connection must see Redis go"
            assert ours.send_noreply(b"SET", b"test:resp:adv:paused", b"1")
            assert not conn.transport.is_reading(), "a fill's reply must wait for the drain"
            assert await until(lambda: replies == [b"OK"], DRAIN_INTERVAL * 8)
            assert conn.transport.is_reading()
        finally:
            ours.close()

    run(main)


LOOPS = [
    pytest.param(uvloop.run, 1, id="uvloop-db1"),  # uvloop pauses for real after a set-up (SELECT)
    pytest.param(asyncio.run, 0, id="asyncio-db0"),  # asyncio's loop pauses from the start
]


@pytest.mark.parametrize(("runner", "db"), LOOPS)
def test_finding_a_fill_after_redis_restarted_while_the_connection_idled_vanishes_unreported(
    tmp_path: Path, runner: Callable[[Any], None], db: int
) -> None:
    """Redis restarts while the write-behind connection is idle. The lookup connections read, so
    they see the EOF at once; a paused one does not (wherever the pause is real: see the finding
    above; once that is fixed, on every URL). The next fill is accepted (True), written into the
    dead socket, and is neither stored nor ever reported to ``on_noreply``: the cache counts it
    neither in ``gateway_cache_fills_total`` nor in ``gateway_cache_errors_total``, and the caller
    was told it need not fall back to the awaited fill."""
    server = PrivateRedis(tmp_path)
    server.start()
    url = f"redis://127.0.0.1:{server.port}/{db}"

    async def main() -> None:
        replies: list[Any] = []
        ours = RespClient(url, 1, on_noreply=replies.append)
        lib = redis.Redis.from_url(url)
        try:
            await ours.call(b"PING")  # a lookup connection, for contrast
            await open_behind(ours)
            replies.clear()
            lookup = ours._conns[0]
            assert lookup is not None
            server.stop()
            assert await until(lambda: lookup.closed), "the lookup connection sees Redis go"
            server.start()
            accepted = ours.send_noreply(b"SET", b"after-restart", b"v")
            if not accepted:
                return  # refused: the caller does the awaited fill — the promise holds
            landed = await until(lambda: lib.get(b"after-restart") == b"v" or bool(replies), 3.0)
            assert landed, (
                "send_noreply returned True after a Redis restart, but the write was neither stored "
                f"nor reported to on_noreply (replies seen: {replies})"
            )
        finally:
            lib.close()
            ours.close()

    try:
        runner(main())
    finally:
        server.stop()


@pytest.mark.parametrize(("runner", "db"), LOOPS)
def test_finding_redis_idle_timeout_silently_eats_the_first_fill_after_each_quiet_spell(
    runner: Callable[[Any], None], db: int, tmp_path: Path
) -> None:
    """Redis' ``timeout`` setting (common on managed Redis) closes an idle client. A paused
    connection never reads the EOF, so after every quiet spell the first fill goes into a closed
    socket: accepted, not stored, not reported, not counted."""
    with private_redis(tmp_path, "--appendonly", "no", "--timeout", "1") as server:
        url = f"redis://127.0.0.1:{server.port}/{db}"
        admin = redis.Redis(port=server.port, db=db)

        async def main() -> None:
            replies: list[Any] = []
            ours = RespClient(url, 1, on_noreply=replies.append)
            try:
                await open_behind(ours)
                addr = behind_laddr(ours)
                assert await until(lambda: addr not in client_addrs(admin), 10.0), (
                    "Redis drops the idle client"
                )
                replies.clear()
                if not ours.send_noreply(b"SET", b"after-idle", b"v"):
                    return
                landed = await until(lambda: admin.get(b"after-idle") == b"v" or bool(replies), 3.0)
                assert landed, (
                    "a fill accepted after Redis closed the idle connection was lost without a report"
                )
            finally:
                ours.close()

        try:
            runner(main())
        finally:
            admin.close()


def test_finding_every_accepted_fill_is_reported_even_when_redis_dies_mid_batch(tmp_path: Path) -> None:
    """Redis stops in the middle of a batch. Every ``send_noreply`` that returned True must end up
    either stored-and-reported or reported as failed, or the fills/errors counters drift: today the
    ``None`` placeholders are dropped by ``_fail`` without a word to ``on_noreply``."""
    server = PrivateRedis(tmp_path)
    server.start()

    async def main() -> None:
        replies: list[Any] = []
        ours = RespClient(server.url, 1, on_noreply=replies.append)
        try:
            await open_behind(ours)
            replies.clear()
            accepted = 0
            for i in range(20):
                accepted += ours.send_noreply(b"SET", f"k{i}", b"v")
            server.stop()
            for i in range(20, 40):
                accepted += ours.send_noreply(b"SET", f"k{i}", b"v")
                await asyncio.sleep(0)
            await until(lambda: not ours.write_behind_open and ours.write_behind_due == 0, 3.0)
            await asyncio.sleep(2 * DRAIN_INTERVAL)  # nothing more can come; the assertion is exact
            assert len(replies) == accepted, (
                f"{accepted} writes accepted, {len(replies)} reported to on_noreply: "
                f"{accepted - len(replies)} fills counted neither as fills nor as errors"
            )
        finally:
            ours.close()

    try:
        run(main)
    finally:
        server.stop()


def test_finding_a_raising_on_noreply_fails_a_lookup_on_the_same_connection() -> None:
    """Before the write-behind connection opens, fills go on the lookup connections and their
    replies go to ``on_noreply`` inside ``data_received``. If the callback raises (a metrics or
    logging hiccup), uvloop treats it as a fatal protocol error and aborts the connection: a
    lookup in flight on it fails with ConnectionError (the cache then bypasses for
    ``retry_interval``) though Redis answered it."""
    prefix = f"test:resp-adv:{secrets.token_hex(4)}:"

    def boom(_: Any) -> None:
        raise RuntimeError("callback failed")

    async def main() -> None:
        ours = RespClient(URL, 1, on_noreply=boom)
        try:
            await ours.call(b"SET", prefix + "t", b"mine")  # the lookup connection is open
            assert ours.send_noreply(b"SET", prefix + "u", b"1")  # no write-behind yet: on it
            assert not ours.write_behind_open
            got = await ours.call(b"GET", prefix + "t")
            assert got == b"mine"
        finally:
            ours.close()
            lib = redis.Redis.from_url(URL)
            lib.delete(prefix + "t", prefix + "u")
            lib.close()

    run(main)


def test_finding_a_raising_on_noreply_loses_the_rest_of_the_batch() -> None:
    """One raising callback call aborts the write-behind connection mid-batch: the replies after it
    (already received) are never delivered, so those fills are never counted."""
    prefix = f"test:resp-adv:{secrets.token_hex(4)}:"
    seen: list[Any] = []

    def flaky(reply: Any) -> None:
        seen.append(reply)
        if len(seen) == 1:
            raise RuntimeError("first call fails")

    async def main() -> None:
        ours = RespClient(URL, 1, on_noreply=flaky)
        try:
            ours.send_noreply(b"PING")
            assert await until(lambda: ours.write_behind_open)
            assert await until(lambda: ours.write_behind_due == 0)
            seen.clear()
            for i in range(10):
                assert ours.send_noreply(b"SET", f"{prefix}{i}", b"v")
            await until(lambda: len(seen) == 10, 3.0)
            assert len(seen) == 10, f"10 replies due, {len(seen)} delivered to on_noreply"
        finally:
            ours.close()
            lib = redis.Redis.from_url(URL)
            lib.delete(*(f"{prefix}{i}" for i in range(10)))
            lib.close()

    run(main)


def test_finding_a_redis_that_reads_but_does_not_answer_takes_fills_without_bound(tmp_path: Path) -> None:
    """``CLIENT PAUSE ... WRITE`` (what ``FAILOVER`` and manual fail-overs do) makes Redis keep
    reading a client's commands into its query buffer without running or answering them. The
    write-behind bound is on *our unsent* bytes, so it never trips: ``send_noreply`` accepts
    without end, ``pending`` grows by one per fill, and Redis' memory grows by every fill's size
    (up to its 1 GB client-query-buffer-limit, then the connection is killed and all is lost)."""
    with private_redis(tmp_path, "--appendonly", "no") as server:
        url = f"redis://127.0.0.1:{server.port}/0"
        admin = redis.Redis(port=server.port)

        async def main() -> None:
            ours = RespClient(url, 1)
            try:
                await open_behind(ours)
                admin.execute_command("CLIENT", "PAUSE", 20000, "WRITE")  # type: ignore[no-untyped-call]
                value = b"v" * 2048  # a typical cached answer
                written = 0
                deadline = time.monotonic() + 10
                while written < 16 * WRITE_BEHIND_BOUND and time.monotonic() < deadline:
                    if not ours.send_noreply(b"SET", b"k", value):
                        break
                    written += len(value)
                    if written % (50 * len(value)) == 0:
                        await asyncio.sleep(0.005)  # a paced stream of fills; Redis reads them meanwhile
                qbuf = max(int(c.get("qbuf", 0)) for c in admin.client_list())
                assert written < 4 * WRITE_BEHIND_BOUND, (
                    f"{written >> 20} MiB of fills accepted while Redis answered none "
                    f"({ours.write_behind_due} replies due; Redis holds {qbuf >> 20} MiB in a query buffer)"
                )
            finally:
                admin.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
                ours.close()

        try:
            run(main)
        finally:
            admin.close()


def test_finding_a_write_behind_connection_that_gets_no_answers_is_never_given_up() -> None:
    """A peer that holds the connection but never answers (a Redis behind a half-open TCP path
    after a fail-over, a wedged proxy): lookups time out and close their connections, so they
    recover on new ones; the write-behind connection has no deadline of its own. Once its bound is
    reached every fill falls back to the awaited path for as long as the socket lives (until the
    kernel gives up retransmitting, ~15 min) — the write-behind path is lost meanwhile, and the
    fills in it are never reported. Expected: replies overdue by more than a few drain intervals
    close it (its fills reported as failed), so the next fill opens a fresh one."""
    stalled: list[asyncio.StreamWriter] = []

    async def main() -> None:
        async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            stalled.append(writer)  # never reads, never answers

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        ours = RespClient(f"redis://127.0.0.1:{port}/0", 1, connect_timeout=0.5)
        try:
            ours.send_noreply(b"PING")
            assert await until(lambda: ours.write_behind_open)
            first = ours._behind
            value = b"v" * 65536
            for _ in range(512):
                if not ours.send_noreply(b"SET", b"k", value):
                    break
                await asyncio.sleep(0)
            given_up = await until(lambda: ours._behind is not first or not ours.write_behind_open, 5.0)
            assert given_up, (
                f"after 5 s (20 drain intervals) with {ours.write_behind_due} replies overdue, the "
                "write-behind connection is still in use"
            )
        finally:
            ours.close()
            for w in stalled:
                w.close()
            server.close()
            await server.wait_closed()

    run(main)


# -- attacks the code survives (regression guards) -------------------------------------------------


def test_holds_replies_are_never_misattributed_across_the_switch_to_write_behind() -> None:
    """Fills before (on lookup connections), during and after the write-behind connection opens,
    interleaved with calls: each call gets its own reply; ``on_noreply`` sees every fill's reply,
    in order per connection, and never a call's."""
    replies: list[Any] = []

    async def main() -> None:
        ours = RespClient(URL, 2, on_noreply=replies.append)
        try:
            await asyncio.gather(ours.call(b"PING"), ours.call(b"PING"))
            sent: list[bytes] = []
            calls = []
            for i in range(3000):
                tag = f"fill-{i}".encode()
                if ours.send_noreply(b"ECHO", tag):
                    sent.append(tag)
                calls.append(asyncio.ensure_future(ours.call(b"ECHO", f"call-{i}")))
                if i % 50 == 0:
                    await asyncio.sleep(0)
            got = await asyncio.gather(*calls)
            assert got == [f"call-{i}".encode() for i in range(3000)]
            assert await until(lambda: len(replies) == len(sent) and ours.write_behind_due == 0, 5.0)
            assert sorted(replies) == sorted(sent)
            behind = [r for r in replies if r in set(sent[-100:])]
            assert behind == sent[-100:]  # the last ones all went on the write-behind connection, in order
        finally:
            ours.close()

    run(main)


def test_holds_the_drain_timer_survives_drain_at_and_a_replaced_connection() -> None:
    """DRAIN_AT triggers a drain while a timer is pending; then the connection is killed by Redis
    with replies due and a timer pending; a fresh connection's writes are still all read."""
    prefix = f"test:resp-adv:{secrets.token_hex(4)}:"
    admin = redis.Redis.from_url(URL)

    async def main() -> None:
        replies: list[Any] = []
        ours = RespClient(URL, 1, on_noreply=replies.append)
        try:
            await open_behind(ours)
            for i in range(DRAIN_AT + 10):
                assert ours.send_noreply(b"SET", f"{prefix}a", i)
            assert await until(lambda: ours.write_behind_due == 0, 3.0)
            assert ours.send_noreply(b"SET", f"{prefix}b", 1)  # a lone write after the big batch
            assert await until(lambda: ours.write_behind_due == 0, 3.0), "the lone write's reply is read"
            first = ours._behind
            ours.send_noreply(b"SET", f"{prefix}c", 1)  # a timer pending, then the connection dies
            admin.client_kill(behind_laddr(ours))
            assert await until(lambda: (ours.send_noreply(b"PING"), ours._behind is not first)[1], 5.0)
            assert await until(lambda: ours.write_behind_open and ours.write_behind_due == 0, 5.0)
            replies.clear()
            for _ in range(5):
                assert ours.send_noreply(b"SET", f"{prefix}d", 1)
            assert await until(lambda: ours.write_behind_due == 0 and len(replies) == 5, 3.0), (
                ours.write_behind_due,
                replies,
            )
        finally:
            ours.close()
            admin.delete(f"{prefix}a", f"{prefix}b", f"{prefix}c", f"{prefix}d")

    try:
        run(main)
    finally:
        admin.close()


def test_holds_auth_and_select_on_the_lazy_connection(tmp_path: Path) -> None:
    """A password and a database number in the URL: the write-behind connection's set-up is read
    (it is paused otherwise) and its fills land in that database."""
    with private_redis(tmp_path, "--appendonly", "no", "--requirepass", "s3cret") as server:
        admin = redis.Redis(port=server.port, password="s3cret", db=5)

        async def main() -> None:
            errors: list[dict[str, Any]] = []
            asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
            for url in (
                f"redis://:s3cret@127.0.0.1:{server.port}/5",
                f"redis://default:s3cret@127.0.0.1:{server.port}/5",
            ):
                replies: list[Any] = []
                ours = RespClient(url, 1, on_noreply=replies.append)
                try:
                    await open_behind(ours)
                    replies.clear()
                    assert ours.send_noreply(b"SET", b"filled", url)
                    got = replies
                    assert await until(lambda: got == [b"OK"], 3.0)  # noqa: B023 (awaited here)
                    assert admin.get(b"filled") == url.encode()
                finally:
                    ours.close()
            await asyncio.sleep(0.1)
            gc.collect()
            assert errors == []

        try:
            run(main)
        finally:
            admin.close()


def test_finding_a_wrong_password_logs_future_exception_never_retrieved_per_fill(tmp_path: Path) -> None:
    """A password and a db in the URL, the password wrong: ``_connect`` awaits AUTH's future, which
    fails, and leaves SELECT's future failed (NOAUTH, or the connection's close) and never
    retrieved. Each attempt logs "Future exception was never retrieved" at ERROR through the
    loop's handler, and while the write-behind connection cannot open, *every* fill starts an
    attempt: the log fills with asyncio tracebacks instead of one cache warning. Nothing else
    is accepted (correctly)."""
    with private_redis(tmp_path, "--appendonly", "no", "--requirepass", "s3cret") as server:

        async def main() -> None:
            errors: list[dict[str, Any]] = []
            asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
            wrong = RespClient(f"redis://:nope@127.0.0.1:{server.port}/5", 1)
            try:
                for _ in range(20):
                    assert not wrong.send_noreply(b"SET", b"x", b"1")
                    await asyncio.sleep(0.02)  # paced fills
                assert not wrong.write_behind_open
            finally:
                wrong.close()
            await asyncio.sleep(0)
            gc.collect()
            never = [e for e in errors if "never retrieved" in str(e.get("message"))]
            assert never == [], f"{len(never)} x {never[0]['message']}: {never[0].get('exception')!r}"

        run(main)


def test_holds_close_while_opening_or_with_a_drain_scheduled_leaks_nothing(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path)
    server.start()
    admin = redis.Redis(port=server.port)

    async def main() -> None:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        for steps in range(6):  # close() at successive points of the opening
            ours = RespClient(server.url, 1)
            ours.send_noreply(b"PING")
            for _ in range(steps):
                await asyncio.sleep(0)
            ours.close()
        ours = RespClient(server.url, 1)
        await open_behind(ours)
        ours.send_noreply(b"SET", b"k", b"v")  # a drain scheduled
        ours.close()
        await asyncio.sleep(2 * DRAIN_INTERVAL)
        assert await until(lambda: len(admin.client_list()) == 1, 3.0), admin.client_list()
        assert errors == []

    try:
        run(main)
    finally:
        admin.close()
        server.stop()


def test_holds_stage_counts_refusals_as_errors_and_other_replies_as_fills() -> None:
    """``ResponseCache._fill_replied`` on the replies hiredis really produces."""
    from gateway.cache.stage import ResponseCache

    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def inc(self) -> None:
            self.n += 1

    class Metrics:
        fills = Counter()
        errors = Counter()

    cache = ResponseCache.__new__(ResponseCache)
    cache.metrics = Metrics()  # type: ignore[assignment]
    cache._refused_logged = -1e9
    import structlog

    cache.log = structlog.get_logger("test")
    reader = hiredis.Reader()
    reader.feed(b":1\r\n-OOM command not allowed when used memory > 'maxmemory'.\r\n$-1\r\n")
    for _ in range(3):
        cache._fill_replied(reader.gets())
    assert (Metrics.fills.n, Metrics.errors.n) == (2, 1)
    cache._fill_replied(ConnectionError("connection to Redis lost"))  # a fill lost with its connection
    assert (Metrics.fills.n, Metrics.errors.n) == (2, 2)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
