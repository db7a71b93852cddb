"""The limit stage's counters in-process: fixed windows and in-flight leases, on memory and Redis.

Memory counters run on an injected clock (milliseconds per test). The Redis counters run the
same cases against the real Redis at 127.0.0.1:6379 (db 9, keys unique to this run), so the
Lua scripts and the dict code are held to one behaviour.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator

import pytest

from gateway.pipeline.counters import CAP, Counters, MemoryCounters, RedisCounters
from tests.test_limits import REDIS_DB, REDIS_HOST, REDIS_PORT, require_redis

UID = secrets.token_hex(4)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(name: str) -> str:
    return f"gw:test:{UID}:{name}:{secrets.token_hex(3)}"


# ----------------------------------------------------------------------------- memory, pure


def test_window_takes_until_the_limit_and_a_refusal_leaves_no_trace() -> None:
    c = MemoryCounters(10, clock=Clock())
    rpm, tpm = key("rpm"), key("tpm")
    for i in range(3):
        got = c.take_now([(rpm, 1, 3, 60), (tpm, 100, 1000, 60)], (), 0)
        assert got.failed == -1 and got.counts == [i + 1, 100 * (i + 1)]
    got = c.take_now([(rpm, 1, 5, 60), (tpm, 800, 1000, 60)], (), 0)
    assert got.failed == 1 and got.counts[-1] == 1100
    # the refused call took nothing back from anyone else: rpm is still 3, tpm 300
    assert c.take_now([(rpm, 1, 4, 60), (tpm, 700, 1000, 60)], (), 0).counts == [4, 1000]


def test_window_ttl_never_exceeds_the_window() -> None:
    clock = Clock()
    clock.now = 1e6 + 0.1  # where now + 60 - now is not exactly 60 in floats
    c = MemoryCounters(10, clock=clock)
    got = c.take_now([(key("w"), 1, 5, 60.0)], (), 0)
    assert got.ttls[0] <= 60.0 + 1e-9
    clock.now += 59.5
    assert c.take_now([(key("w2"), 1, 5, 60.0)], (), 0).ttls[0] == pytest.approx(60.0)


def test_corrections_never_go_below_zero_or_above_cap() -> None:
    c = MemoryCounters(10, clock=Clock())
    k = key("tpm")
    c.take_now([(k, 100, 10**6, 60)], (), 0)
    c.settle_now([(k, -(10**18))], ())
    assert c.take_now([(k, 1, 10**6, 60)], (), 0).counts == [1]
    c.settle_now([(k, 10**30)], ())
    assert c.take_now([(k, 0, CAP, 60)], (), 0).counts == [CAP]


def test_a_correction_for_a_window_that_is_over_is_dropped() -> None:
    clock = Clock()
    c = MemoryCounters(10, clock=clock)
    k = key("tpm")
    c.take_now([(k, 500, 1000, 60)], (), 0)
    clock.now += 61
    c.settle_now([(k, -400)], ())  # the refund of the old window must not credit the new one
    assert c.take_now([(k, 1000, 1000, 60)], (), 0).failed == -1


def test_leases_cap_requests_in_flight_and_a_release_frees_one() -> None:
    c = MemoryCounters(10, clock=Clock())
    k = key("inflight")
    assert [c.take_now((), [(k, 2)], lease).failed for lease in (1, 2, 3)] == [-1, -1, 0]
    c.settle_now((), [(k, 1)])
    assert c.take_now((), [(k, 2)], 4).failed == -1
    assert c.held(k) == 2


def test_a_release_is_idempotent_and_never_frees_another_slot() -> None:
    c = MemoryCounters(10, clock=Clock())
    k = key("inflight")
    c.take_now((), [(k, 2)], 1)
    c.take_now((), [(k, 2)], 2)
    for _ in range(5):  # replayed releases of one lease
        c.settle_now((), [(k, 1)])
    c.settle_now((), [(k, 99)])  # a release of a lease this set never had
    assert c.held(k) == 1
    assert [c.take_now((), [(k, 2)], lease).failed for lease in (3, 4)] == [-1, 0]


def test_a_lease_expires_on_its_own_whatever_the_windows_do() -> None:
    """The drift of a shared in-flight number: leases outlive window expiry without going off."""
    clock = Clock()
    c = MemoryCounters(5, clock=clock)  # lease: 5 s (timeouts.total + grace, shortened)
    k = key("inflight")
    for minute in range(3):  # several windows and lease lifetimes go by
        held = [c.take_now((), [(k, 4)], 100 * minute + i) for i in range(8)]
        assert [h.failed for h in held] == [-1] * 4 + [0] * 4, minute
        for i in range(4):
            c.settle_now((), [(k, 100 * minute + i)])
        for i in range(4):  # late and replayed releases, after the slots were freed
            c.settle_now((), [(k, 100 * minute + i)])
        assert c.held(k) == 0
        clock.now += 66
    # a lost release: the slot frees itself when the lease expires, not before
    c.take_now((), [(k, 1)], 1000)
    clock.now += 4.9
    assert c.take_now((), [(k, 1)], 1001).failed == 0
    clock.now += 0.2
    assert c.take_now((), [(k, 1)], 1002).failed == -1


def test_a_refused_lease_rolls_back_the_windows() -> None:
    c = MemoryCounters(10, clock=Clock())
    rpm, k = key("rpm"), key("inflight")
    c.take_now([(rpm, 1, 10, 60)], [(k, 1)], 1)
    got = c.take_now([(rpm, 1, 10, 60)], [(k, 1)], 2)
    assert got.failed == 1
    assert c.take_now([(rpm, 1, 10, 60)], (), 0).counts == [2]


def test_sweep_drops_expired_windows_and_leases() -> None:
    clock = Clock()
    c = MemoryCounters(5, sweep_every=1, clock=clock)
    c.take_now([(key("a"), 1, 5, 60)], [(key("b"), 5)], 1)
    clock.now += 100
    c.take_now((), (), 0)
    assert not c._d and not c._leases


# ----------------------------------------------------------------------------- both storages


@pytest.fixture(params=["memory", "redis"])
async def counters(request: pytest.FixtureRequest) -> AsyncIterator[Counters]:
    if request.param == "memory":
        yield MemoryCounters(0.5)
        return
    require_redis()
    r = RedisCounters(f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}", 1.0, 0.5)
    yield r
    await r.close()


async def test_storages_agree_on_windows_refusals_and_clamping(counters: Counters) -> None:
    rpm, tpm = key("rpm"), key("tpm")
    got = await counters.take([(rpm, 1, 2, 60), (tpm, 10, 100, 60)], (), 0)
    assert got.failed == -1 and got.counts == [1, 10]
    assert 59 < got.ttls[0] <= 60
    got = await counters.take([(rpm, 1, 2, 60), (tpm, 91, 100, 60)], (), 0)
    assert got.failed == 1 and got.counts[-1] == 101
    await counters.settle([(tpm, -(10**30))], ())  # clamped: no storage error, no negative count
    got = await counters.take([(rpm, 1, 2, 60), (tpm, 100, 100, 60)], (), 0)
    assert got.failed == -1 and got.counts == [2, 100]
    await counters.settle([(tpm, 10**30)], ())  # beyond int64: clamped to CAP, not an error
    got = await counters.take([(tpm, 0, CAP, 60)], (), 0)
    assert got.failed == -1 and got.counts == [CAP]
    assert (await counters.take([(tpm, 1, CAP, 60)], (), 0)).failed == 0
    await counters.settle([(key("gone"), 500)], ())  # a window that does not exist stays so
    assert (await counters.take([(key("gone"), 1, 1, 60)], (), 0)).counts == [1]


async def test_storages_agree_on_leases(counters: Counters) -> None:
    k = key("inflight")
    assert [(await counters.take((), [(k, 2)], i)).failed for i in (1, 2, 3)] == [-1, -1, 0]
    await counters.settle((), [(k, 1), (k, 1)])
    await counters.settle((), [(k, 1)])
    assert [(await counters.take((), [(k, 2)], i)).failed for i in (4, 5)] == [-1, 0]
    deadline = asyncio.get_running_loop().time() + 5
    while (await counters.take((), [(k, 2)], 6)).failed != -1:  # leases of 0.5 s expire
        assert asyncio.get_running_loop().time() < deadline, "leases never expired"
        await asyncio.sleep(0.05)


# ----------------------------------------------------------------------------- Redis call deadline


async def test_an_answer_delayed_only_by_our_own_busy_loop_is_not_a_timeout() -> None:
    """A burst keeps the loop busy past the timeout while Redis' answer waits in the socket."""
    loop = asyncio.get_running_loop()
    r = RedisCounters("redis://127.0.0.1:1/0", 0.1, 5)  # never connects: the script is a stand-in
    answer: asyncio.Future[int] = loop.create_future()
    loop.call_later(0.01, time.sleep, 0.3)  # the loop is blocked for 3 timeouts...
    loop.call_later(0.02, answer.set_result, 7)  # ...while the answer is already there

    async def script(keys: list[str], args: list[object]) -> int:
        return await answer

    assert await r._call(script, [], []) == 7
    await r.close()


async def test_a_redis_that_does_not_answer_is_a_timeout() -> None:
    r = RedisCounters("redis://127.0.0.1:1/0", 0.1, 5)
    never: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def script(keys: list[str], args: list[object]) -> int:
        return await never

    with pytest.raises(TimeoutError):
        await r._call(script, [], [])
    await r.close()
