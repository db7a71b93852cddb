"""The deadline of a call to Redis (gateway/storage_timeout.py: the limiter's and the cache's) on a real event
loop: a loop that lags turn after turn is not a slow Redis, and a Redis that never answers is still
given up on. The "answer" is a byte on a real socket pair, written by a thread while the loop is
busy (as Redis' reply lands while the gateway's loop runs other requests)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from gateway.storage_timeout import storage_timeout

TIMEOUT = 0.2  # the call's deadline, seconds
TURN = 0.4  # how long each turn of the busy loop blocks: twice the deadline


async def _busy(turns: int) -> None:
    """Block the loop for TURN seconds, ``turns`` times, yielding between (requests the loop runs)."""
    for _ in range(turns):
        time.sleep(TURN)  # noqa: ASYNC251 - the point: a turn that holds the loop
        await asyncio.sleep(0)


async def _call(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    async with storage_timeout(TIMEOUT):
        return await loop.sock_recv(sock, 1)


async def test_an_answer_that_lands_during_sustained_loop_lag_is_read_not_timed_out() -> None:
    """The deadline (0.2 s) fires late, turn after turn of a loop busy for 0.4 s each: first while
    the answer has not come (the loop was busy, not Redis), then at the end of the turn during
    which the answer arrived. Extended once only, that second late fire gave up on the call in
    the very turn its answer became readable: a limiter that fails open admitted it uncounted."""
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        busy = asyncio.create_task(_busy(6))
        writer = threading.Timer(3.5 * TURN, b.send, args=(b"+",))  # inside the fourth busy turn
        writer.start()
        try:
            assert await _call(a) == b"+"
        finally:
            writer.cancel()
            await busy
    finally:
        a.close()
        b.close()


async def test_a_redis_that_never_answers_is_given_up_on_even_while_the_loop_lags() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        busy = asyncio.create_task(_busy(8))
        with pytest.raises(TimeoutError):
            await _call(a)
        await busy
    finally:
        a.close()
        b.close()
