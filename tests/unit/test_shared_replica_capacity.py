"""A replica's capacity is shared by every model it serves (gateway/pipeline/admit.py), in-process.

One vLLM serving a base model and LoRA adapters (or several served names) runs ``max_num_seqs``
sequences in all, whichever model they are for. A request that finds the shared replica full
waits in the queue and goes when any of its requests ends; it is never refused with 503 while the
replica is healthy. Pools that share no replica do not hold each other up.
"""

from __future__ import annotations

from gateway.pipeline.admit import Admission
from tests.unit.admission_harness import FAR, admission_for, pool_of, settle, start, until

TIERS = {"interactive": 0, "batch": 20}  # default_priority (10) sits between them


async def test_a_request_for_another_model_of_a_full_replica_waits_and_is_served() -> None:
    pool = pool_of((1, ("a", "b")))
    replica = pool.backends[0]
    adm = admission_for(pool)
    first = await start(adm, pool, "a")
    assert first.backend is replica
    second = await start(adm, pool, "b")
    assert (second.over, second.error) == (False, None)  # queued, not 503 no_backend_available
    assert adm.queues["b"].waiting == 1
    await first.done()  # model a's request frees the slot model b's waiter gets
    await until(lambda: second.over, "b's waiter dispatched when a's request ended")
    assert (second.backend, second.error) == (replica, None)
    third = await start(adm, pool, "a")
    assert not third.over  # and the other way round
    await second.done()
    await until(lambda: third.over, "a's waiter dispatched when b's request ended")
    assert (third.backend, third.error) == (replica, None)
    await third.done()
    assert replica.outstanding == 0
    assert (adm.queues["a"].in_flight, adm.queues["b"].in_flight) == (0, 0)


async def test_a_shared_replica_never_runs_more_than_its_max_in_flight() -> None:
    pool = pool_of((2, ("base", "lora-1", "lora-2")))
    replica = pool.backends[0]
    adm = admission_for(pool)
    requests = [await start(adm, pool, m) for m in ("base", "lora-1", "lora-2") * 3]
    assert [r.error for r in requests] == [None] * 9
    assert sum(r.over for r in requests) == 2
    assert replica.outstanding == 2
    served = 2
    while served < 9:
        running = [r for r in requests if r.routed and not r.task.done()]
        await running[0].done()
        served += 1
        await until(lambda n=served: sum(r.routed for r in requests) == n, "the next waiter dispatched")
        assert replica.outstanding <= 2
    for r in requests:
        await r.done()
    assert [r.error for r in requests] == [None] * 9


async def test_waiters_of_the_models_sharing_a_replica_go_by_priority_then_arrival() -> None:
    pool = pool_of((1, ("a", "b")))
    adm = admission_for(pool, TIERS)
    order: list[str] = []
    holder = await start(adm, pool, "a")
    waiters = [
        await start(adm, pool, "b", tier="batch", order=order, name="b-batch"),
        await start(adm, pool, "a", order=order, name="a-default"),
        await start(adm, pool, "b", order=order, name="b-default"),
        await start(adm, pool, "a", tier="interactive", order=order, name="a-interactive"),
    ]
    await holder.done()
    for _ in waiters:
        await until(lambda: any(w.routed and not w.task.done() for w in waiters), "a waiter dispatched")
        running = next(w for w in waiters if w.routed and not w.task.done())
        await running.done()
    assert order == ["a-interactive", "a-default", "b-default", "b-batch"]


async def test_replicas_serving_different_sets_of_models_are_never_overcommitted() -> None:
    """r1 serves a and b, r2 only b: a b request that finds both full waits (r1's spare capacity
    counted for model b is the one a's request holds)."""
    pool = pool_of((1, ("a", "b")), (1, ("b",)))
    r1, r2 = pool.backends
    adm = admission_for(pool)
    on_r1 = await start(adm, pool, "a")
    assert on_r1.backend is r1
    on_r2 = await start(adm, pool, "b")
    assert on_r2.backend is r2
    waiting_b = await start(adm, pool, "b")
    waiting_a = await start(adm, pool, "a")
    assert [w.over for w in (waiting_b, waiting_a)] == [False, False]
    await on_r2.done()  # r2 frees: only the b waiter can use it
    await until(lambda: waiting_b.over, "b's waiter dispatched to r2")
    assert (waiting_b.backend, waiting_b.error) == (r2, None)
    assert not waiting_a.over
    await on_r1.done()
    await until(lambda: waiting_a.over, "a's waiter dispatched to r1")
    assert (waiting_a.backend, waiting_a.error) == (r1, None)
    await waiting_a.done()
    await waiting_b.done()


async def test_a_waiter_that_cannot_use_the_free_replica_does_not_block_one_that_can() -> None:
    pool = pool_of((1, ("a", "b")), (1, ("b",)))
    r1, r2 = pool.backends
    adm = admission_for(pool)
    on_r1 = await start(adm, pool, "a")
    on_r2 = await start(adm, pool, "b")
    waiting_a = await start(adm, pool, "a")  # first in line, but only r1 serves a
    waiting_b = await start(adm, pool, "b")
    await on_r2.done()
    await until(lambda: waiting_b.over, "b's waiter dispatched to r2")
    assert (waiting_b.backend, waiting_a.over) == (r2, False)
    await on_r1.done()
    await until(lambda: waiting_a.over, "a's waiter dispatched to r1")
    assert waiting_a.backend is r1
    await waiting_a.done()
    await waiting_b.done()


async def test_a_replica_that_starts_serving_another_model_shares_its_slots_with_it() -> None:
    """vLLM loads a LoRA adapter at runtime: the health poller sees r1 list b too (and calls
    dispatch); from then on a and b share r1's slot."""
    pool = pool_of((1, ("a",)), (1, ("b",)))
    r1, r2 = pool.backends
    adm = admission_for(pool)
    on_r2 = await start(adm, pool, "b")  # b's pool exists, with r2 only
    assert on_r2.backend is r2
    r1.models = {"a": {"id": "a"}, "b": {"id": "b"}}
    adm.dispatch()  # the health poller's call when a replica's models change
    on_r1 = await start(adm, pool, "a")
    assert on_r1.backend is r1
    waiting_b = await start(adm, pool, "b")
    assert (waiting_b.over, waiting_b.error) == (False, None)  # both replicas full: it waits
    await on_r1.done()  # a's request ends: the b waiter may have r1's slot
    await until(lambda: waiting_b.over, "b's waiter dispatched to r1")
    assert (waiting_b.backend, waiting_b.error) == (r1, None)
    await waiting_b.done()
    await on_r2.done()


async def test_pools_sharing_no_replica_do_not_hold_each_other_up() -> None:
    """A request of pool a admitted but not on a replica yet (between retries) leaves pool b alone."""
    pool = pool_of((1, ("a",)), (1, ("b",)))
    adm = admission_for(pool)
    between = await adm.admit("a", None, None, FAR)  # admitted, not routed (a retry's backoff)
    b_request = await start(adm, pool, "b")
    assert (b_request.backend, b_request.error) == (pool.backends[1], None)
    a_request = await start(adm, pool, "a")
    assert not a_request.over  # a's only slot is the admitted request's
    adm.release(between, 0.1)
    await until(lambda: a_request.over, "a's waiter dispatched")
    assert a_request.backend is pool.backends[0]
    await a_request.done()
    await b_request.done()


async def test_the_common_case_one_model_per_replica_keeps_its_numbers() -> None:
    pool = pool_of((2, ("tiny",)), (2, ("tiny",)))
    adm: Admission = admission_for(pool)
    requests = [await start(adm, pool, "tiny") for _ in range(5)]
    assert sum(r.routed for r in requests) == 4
    assert adm.capacity("tiny") == 4
    assert (adm.queues["tiny"].in_flight, adm.queues["tiny"].waiting) == (4, 1)
    await requests[0].done()
    await settle()
    assert requests[4].routed
    for r in requests:
        await r.done()
    assert adm.queues["tiny"].in_flight == 0
