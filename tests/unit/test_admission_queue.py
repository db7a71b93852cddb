"""The admission queue in-process (gateway/pipeline/admit.py): who goes next, and when waiting ends.

Lower tier priority first; within a priority the teams take turns (FIFO within a team); every
waiter has a deadline (the earlier of the request's and ``queue_timeout``); a full queue is 429 and
a passed deadline 503, both with a Retry-After from the observed service rate. No processes: a real
``BackendPool`` with its replicas marked healthy, as the health poller would.
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.backends import BackendPool, BackendState
from gateway.config import load_settings
from gateway.errors import NoBackendAvailable
from gateway.pipeline.admit import Admission, PoolQueue, QueueFull, QueueTimeout

MODEL = "tiny"
FAR = 1e9  # a request deadline that never comes first (loop time)
TIERS = {"interactive": 0, "batch": 20}  # default_priority (10) sits between them


def admission(
    capacity: int = 1,
    *,
    max_queue: int = 100,
    queue_timeout: float = 30.0,
    state: BackendState = BackendState.HEALTHY,
) -> Admission:
    settings = load_settings(
        backends=[{"url": "http://127.0.0.1:9", "models": [MODEL], "max_in_flight": capacity}],
        admission={"max_queue": max_queue, "queue_timeout": queue_timeout},
    )
    pool = BackendPool(settings.backends, settings.resilience)
    backend = pool.backends[0]
    backend.state = state
    if state is BackendState.HEALTHY:
        backend.models = {MODEL: {"id": MODEL}}
    return Admission(pool, settings.admission, TIERS)


async def settle() -> None:
    """Let every task that can run, run (waiters enqueue, granted ones wake)."""
    for _ in range(5):
        await asyncio.sleep(0)


class Waiters:
    """Admission requests as tasks, recording the order in which they were let through."""

    def __init__(self, adm: Admission) -> None:
        self.adm = adm
        self.order: list[str] = []
        self.tasks: list[asyncio.Task[PoolQueue]] = []

    async def add(self, name: str, tier: str | None = None, team: str | None = None) -> None:
        async def run() -> PoolQueue:
            q = await self.adm.admit(MODEL, tier, team, FAR)
            self.order.append(name)
            return q

        self.tasks.append(asyncio.create_task(run()))
        await settle()  # enqueued now: arrival order is the order of add()

    async def release_all(self, holder: PoolQueue) -> list[str]:
        """Free the held slot, then each granted waiter's in turn, until the queue is empty."""
        self.adm.release(holder, 0.1)
        for _ in self.tasks:
            await settle()
            self.adm.release(holder, 0.1)
        await asyncio.gather(*self.tasks)
        return self.order


async def test_free_capacity_is_granted_at_once() -> None:
    adm = admission(capacity=2)
    q1 = await adm.admit(MODEL, None, None, FAR)
    q2 = await adm.admit(MODEL, None, None, FAR)
    assert q1 is q2
    assert (q1.in_flight, q1.waiting) == (2, 0)
    adm.release(q1, 0.5)
    assert (q1.in_flight, q1.served, q1.busy_seconds) == (1, 1, 0.5)


async def test_lower_priority_value_goes_first_whatever_the_arrival_order() -> None:
    adm = admission()
    holder = await adm.admit(MODEL, None, None, FAR)
    w = Waiters(adm)
    await w.add("batch", tier="batch")
    await w.add("default")  # no tier: default_priority
    await w.add("unknown-tier", tier="no-such-tier")  # a tier without a priority: the default
    await w.add("interactive", tier="interactive")
    assert holder.waiting == 4
    assert await w.release_all(holder) == ["interactive", "default", "unknown-tier", "batch"]


async def test_teams_take_turns_within_a_priority() -> None:
    adm = admission()
    holder = await adm.admit(MODEL, None, None, FAR)
    w = Waiters(adm)
    for name in ("a1", "a2", "a3"):
        await w.add(name, team="a")
    for name in ("b1", "b2"):
        await w.add(name, team="b")
    await w.add("none1")  # no team: a team of its own
    assert await w.release_all(holder) == ["a1", "b1", "none1", "a2", "b2", "a3"]


async def test_waiting_requests_keep_their_turn_when_capacity_frees() -> None:
    """A newcomer does not overtake the queue even when a slot is free at that moment."""
    adm = admission()
    holder = await adm.admit(MODEL, None, None, FAR)
    w = Waiters(adm)
    await w.add("first")
    adm.release(holder, 0.1)  # the slot goes to "first" ...
    await w.add("second")  # ... so "second" queues behind it
    assert w.order == ["first"]
    assert holder.waiting == 1
    await w.release_all(holder)
    assert w.order == ["first", "second"]


async def test_queue_timeout_is_503_with_retry_after_and_leaves_no_trace() -> None:
    adm = admission(queue_timeout=0.02)
    holder = await adm.admit(MODEL, None, None, FAR)
    with pytest.raises(QueueTimeout) as info:
        await adm.admit(MODEL, "batch", "a", FAR)
    err = info.value
    assert (err.status, err.code, err.type) == (503, "queue_timeout", "server_error")
    assert err.retry_after == 1  # (0 left waiting + 1) x 1 s assumed per request (none served yet) / 1 slot
    assert (holder.waiting, holder.in_flight, holder.depth(20)) == (0, 1, 0)


async def test_the_requests_own_deadline_ends_the_wait_when_it_comes_first() -> None:
    adm = admission(queue_timeout=30)
    holder = await adm.admit(MODEL, None, None, FAR)
    deadline = asyncio.get_running_loop().time() + 0.02
    with pytest.raises(QueueTimeout):
        await asyncio.wait_for(adm.admit(MODEL, None, None, deadline), timeout=5)
    assert holder.waiting == 0


async def test_full_queue_is_429_with_retry_after_from_the_service_rate() -> None:
    adm = admission(max_queue=2)
    holder = await adm.admit(MODEL, None, None, FAR)
    adm.release(holder, 4.0)  # one request served in 4 s: the observed mean
    holder = await adm.admit(MODEL, None, None, FAR)
    w = Waiters(adm)
    await w.add("w1")
    await w.add("w2")
    with pytest.raises(QueueFull) as info:
        await adm.admit(MODEL, None, None, FAR)
    err = info.value
    assert (err.status, err.code, err.type) == (429, "queue_full", "rate_limit_error")
    assert err.retry_after == 12  # (2 waiting + 1) x 4 s / 1 slot
    await w.release_all(holder)


async def test_a_cancelled_waiter_leaves_its_place_to_the_next() -> None:
    """A client that disconnects while queued: its slot is never granted to a dead request."""
    adm = admission()
    holder = await adm.admit(MODEL, None, None, FAR)
    w = Waiters(adm)
    await w.add("gone")
    await w.add("next")
    w.tasks[0].cancel()
    await settle()
    assert holder.waiting == 1
    adm.release(holder, 0.1)
    await settle()
    assert w.order == ["next"]
    assert holder.in_flight == 1


async def test_no_ready_replica_and_none_loading_is_no_backend_available() -> None:
    adm = admission(state=BackendState.DOWN)
    with pytest.raises(NoBackendAvailable):
        await adm.admit(MODEL, None, None, FAR)


async def test_while_the_only_replica_loads_requests_wait_for_it() -> None:
    adm = admission(state=BackendState.LOADING)
    w = Waiters(adm)
    await w.add("early")
    assert adm.queues[MODEL].waiting == 1
    backend = adm._pool.backends[0]
    backend.state, backend.models = BackendState.HEALTHY, {MODEL: {"id": MODEL}}
    adm.dispatch()  # the health poller's call when a replica becomes ready
    await settle()
    assert w.order == ["early"]


def test_snapshot_reports_every_model_and_priority_with_zeros() -> None:
    adm = admission()
    assert adm.snapshot([MODEL]) == [(MODEL, 0, 0), (MODEL, 10, 0), (MODEL, 20, 0)]


async def test_snapshot_counts_waiters_per_priority() -> None:
    adm = admission()
    holder = await adm.admit(MODEL, None, None, FAR)
    w = Waiters(adm)
    await w.add("b1", tier="batch")
    await w.add("b2", tier="batch", team="t")
    await w.add("i1", tier="interactive")
    assert adm.snapshot([MODEL]) == [(MODEL, 0, 1), (MODEL, 10, 0), (MODEL, 20, 2)]
    await w.release_all(holder)
    assert adm.snapshot([MODEL]) == [(MODEL, 0, 0), (MODEL, 10, 0), (MODEL, 20, 0)]
