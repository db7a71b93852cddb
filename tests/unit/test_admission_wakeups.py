"""Queued requests go the moment a replica may take them, and admission never promises more than
the router will give (gateway/pipeline/admit.py, route.py, breaker.py), in-process.

Capacity comes back without any request finishing when a breaker's reset time passes (it may take
a trial), when it closes (the health poller readmitted the replica) or when a replica's requests
are stranded on a replica that went down; each must dispatch the queue at once. A half-open replica
takes only its trial requests, so admitting more would end in a 503 from the router.
"""

from __future__ import annotations

from gateway.backends import BackendState
from tests.unit.admission_harness import admission_for, eject, pool_of, settle, start, until

M = "tiny"


async def test_a_breakers_reset_time_passing_dispatches_the_queue() -> None:
    pool = pool_of((1, (M,)), (1, (M,)), reset=0.2)
    a, b = pool.backends
    adm = admission_for(pool)
    eject(a)
    busy = await start(adm, pool, M)
    assert busy.backend is b  # a is ejected
    queued = await start(adm, pool, M)
    assert not queued.over
    assert adm.queues[M].waiting == 1
    # Nothing finishes; only a's reset time passes. The waiter goes to a as its trial.
    await until(lambda: queued.over, "the queued request dispatched after a's reset time")
    assert (queued.backend, queued.error) == (a, None)
    assert a.breaker is not None and a.breaker.state == "half-open"
    await queued.done()
    assert a.breaker.state == "closed"
    await busy.done()


async def test_a_breaker_closed_by_the_health_poller_dispatches_the_queue() -> None:
    pool = pool_of((1, (M,)), (1, (M,)), reset=30.0)
    a, _ = pool.backends
    adm = admission_for(pool)
    eject(a)
    busy = await start(adm, pool, M)
    queued = await start(adm, pool, M)
    assert not queued.over
    assert a.breaker is not None
    a.breaker.reset()  # what the health poller does when it readmits the replica
    await until(lambda: queued.over, "the queued request dispatched after a's breaker closed")
    assert (queued.backend, queued.error) == (a, None)
    await queued.done()
    await busy.done()


async def test_a_trial_that_fails_rearms_the_wakeup_for_the_next_reset() -> None:
    pool = pool_of((1, (M,)), (1, (M,)), reset=0.2)
    a, _ = pool.backends
    adm = admission_for(pool)
    eject(a)
    busy = await start(adm, pool, M)
    first = await start(adm, pool, M)
    second = await start(adm, pool, M)
    await until(lambda: first.over, "the first waiter dispatched as a's trial")
    assert (first.backend, first.error) == (a, None)
    assert not second.over
    await first.done(failed=True)  # the trial fails: a opens again for another reset time
    assert a.breaker is not None and a.breaker.state == "open"
    await settle()
    assert not second.over  # no capacity: a is open, b busy
    await until(lambda: second.over, "the second waiter dispatched after a's next reset time")
    assert (second.backend, second.error) == (a, None)
    await second.done()
    await busy.done()


async def test_a_half_open_replica_is_admitted_only_its_trial_requests() -> None:
    """a (max_in_flight 4) lets one trial through; a second waiter must not be sent to a router
    that would refuse it (503 no_backend_available) but wait for the trial's outcome."""
    pool = pool_of((4, (M,)), (1, (M,)), reset=0.2, trials=1)
    a, _ = pool.backends
    adm = admission_for(pool)
    eject(a)
    busy = await start(adm, pool, M)
    first = await start(adm, pool, M)
    second = await start(adm, pool, M)
    await until(lambda: first.over, "the first waiter dispatched as a's trial")
    assert (first.backend, first.error) == (a, None)
    await settle()
    assert not second.over
    assert adm.queues[M].waiting == 1
    await first.done()  # the trial succeeded: a is closed, all four slots are back
    await until(lambda: second.over, "the second waiter dispatched once a closed")
    assert (second.backend, second.error) == (a, None)
    await second.done()
    await busy.done()


async def test_requests_arriving_after_the_reset_time_queue_behind_the_trial() -> None:
    pool = pool_of((4, (M,)), (1, (M,)), reset=0.05, trials=1)
    a, _ = pool.backends
    adm = admission_for(pool)
    eject(a)
    busy = await start(adm, pool, M)
    assert a.breaker is not None
    breaker = a.breaker
    await until(lambda: breaker.seconds_until_trial() == 0, "a's reset time")
    trial = await start(adm, pool, M)
    assert (trial.backend, trial.error) == (a, None)
    late = await start(adm, pool, M)
    assert (late.over, late.error) == (False, None)  # queued, not a 503 from the router
    await trial.done()
    await until(lambda: late.over, "the late request dispatched once a closed")
    assert (late.backend, late.error) == (a, None)
    await late.done()
    await busy.done()


async def test_a_trial_in_flight_does_not_hide_another_replicas_free_slot() -> None:
    pool = pool_of((1, (M,)), (1, (M,)), reset=0.05, trials=1)
    a, b = pool.backends
    adm = admission_for(pool)
    eject(a)
    first = await start(adm, pool, M)
    assert first.backend is b
    assert a.breaker is not None
    breaker = a.breaker
    await until(lambda: breaker.seconds_until_trial() == 0, "a's reset time")
    trial = await start(adm, pool, M)
    assert trial.backend is a
    await first.done()  # b is free again; a's trial is still running
    after = await start(adm, pool, M)
    assert (after.backend, after.error) == (b, None)
    await after.done()
    await trial.done()


async def test_requests_stranded_on_a_replica_that_went_down_do_not_block_the_ready_ones() -> None:
    pool = pool_of((1, (M,)), (1, (M,)))
    adm = admission_for(pool)
    stranded = await start(adm, pool, M)
    down = stranded.backend
    other = await start(adm, pool, M)
    assert down is not None and other.backend is not None and other.backend is not down
    waiting = await start(adm, pool, M)
    assert not waiting.over  # both slots are taken: the pool is full
    down.state = BackendState.DOWN  # its health checks fail while its request still runs
    adm.dispatch()  # the health poller's call on a state change
    await settle()
    assert not waiting.over  # the ready replica is still busy
    await other.done()  # its slot frees; the stranded request holds none of the ready replica's
    await until(lambda: waiting.over, "the waiter dispatched when the ready replica freed")
    assert (waiting.backend, waiting.error) == (other.backend, None)
    await waiting.done()
    await stranded.done()


async def test_a_release_after_the_reset_time_admits_only_the_trial_and_the_free_slots() -> None:
    """Three waiters; b frees its slot after a's reset time: one goes to b, one to a as its trial,
    the third waits (the router would refuse it: 503 no_backend_available)."""
    pool = pool_of((4, (M,)), (1, (M,)), reset=0.05, trials=1)
    a, b = pool.backends
    adm = admission_for(pool)
    eject(a)
    busy = await start(adm, pool, M)
    assert busy.backend is b
    waiters = [await start(adm, pool, M) for _ in range(3)]
    assert a.breaker is not None
    breaker = a.breaker
    await until(lambda: breaker.seconds_until_trial() == 0, "a's reset time")
    await busy.done()
    await until(lambda: sum(w.over for w in waiters) >= 2, "two waiters dispatched")
    await settle()
    assert [w.error for w in waiters] == [None, None, None]
    assert sorted(w.backend is a for w in waiters[:2]) == [False, True]  # one on each replica
    assert not waiters[2].over
    for w in waiters[:2]:
        await w.done()
    await until(lambda: waiters[2].over, "the third waiter dispatched")
    assert waiters[2].error is None
    await waiters[2].done()
