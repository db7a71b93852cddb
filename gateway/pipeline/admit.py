"""Stage 5, admit: keep each pool within its capacity; queue the excess instead of failing.

A pool is the set of ready replicas serving one model; its capacity is the
sum of their ``max_in_flight`` (vLLM's ``--max-num-seqs``). A request that
finds the pool full waits in a bounded priority queue: lower tier
``priority`` first, and within a priority the teams take turns, so one
team's burst cannot starve another. Every waiter has a deadline. A full queue
answers 429, a passed deadline 503, both with a Retry-After computed from
the queue. While no replica is ready at all (deploy, scale from zero),
requests wait up to ``cold_start_wait`` instead of failing.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass, field

from gateway.backends import BackendPool
from gateway.config import AdmissionSettings
from gateway.errors import GatewayError, NoBackendAvailable


class QueueFull(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"
    reason = "shed"
    limit = ("queue", "pool")


class QueueTimeout(GatewayError):
    status = 503
    type = "server_error"
    code = "queue_timeout"
    reason = "shed"


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[None]
    priority: int
    team: str


@dataclass
class PoolQueue:
    model: str
    in_flight: int = 0
    waiting: int = 0
    # priority → team → FIFO of waiters; dict order is the teams' turn order
    lanes: dict[int, dict[str, deque[_Waiter]]] = field(default_factory=dict)
    served: int = 0
    busy_seconds: float = 0.0  # summed service time of finished requests, for Retry-After

    def depth(self, priority: int) -> int:
        return sum(len(q) for q in self.lanes.get(priority, {}).values())


class Admission:
    def __init__(self, pool: BackendPool, settings: AdmissionSettings, tier_priority: dict[str, int]) -> None:
        self._pool = pool
        self._s = settings
        self._priority = tier_priority
        self.queues: dict[str, PoolQueue] = {}

    def capacity(self, model: str) -> int:
        """Requests the pool may run at once: its ready replicas whose breakers let requests in.

        When every ready replica's breaker is open, all of them count: the router then routes
        to them anyway (panic routing, route.choose_backend), so the pool is not dark.
        """
        total = ejected = 0
        for b in self._pool.backends:
            if b.ready and model in b.models:
                total += b.settings.max_in_flight
                if b.breaker is not None and not b.breaker.available():
                    ejected += b.settings.max_in_flight
        return total - ejected if ejected < total else total

    def priority_of(self, tier: str | None) -> int:
        return (
            self._priority.get(tier, self._s.default_priority)
            if tier is not None
            else self._s.default_priority
        )

    async def admit(self, model: str, tier: str | None, team: str | None, deadline: float) -> PoolQueue:
        """Return once the request may go upstream (the caller must call release())."""
        q = self.queues.get(model)
        if q is None:
            q = self.queues[model] = PoolQueue(model)
        cap = self.capacity(model)
        if q.waiting == 0 and q.in_flight < cap:
            q.in_flight += 1
            return q
        cold = self._pool.cold_for(model)
        if cap == 0 and not cold:
            raise NoBackendAvailable(
                f"No backend is ready to serve `{model}` right now; retry shortly.",
                param="model",
                retry_after=self._pool.retry_after(model),
            )
        if q.waiting >= self._s.max_queue:
            raise QueueFull(
                f"The queue for `{model}` is full ({q.waiting} waiting); retry later.",
                retry_after=self._retry_after(q, model),
            )
        wait = self._s.cold_start_wait if cold else self._s.queue_timeout
        loop = asyncio.get_running_loop()
        until = min(deadline, loop.time() + wait)
        waiter = _Waiter(loop.create_future(), self.priority_of(tier), team or "")
        q.lanes.setdefault(waiter.priority, {}).setdefault(waiter.team, deque()).append(waiter)
        q.waiting += 1
        try:
            async with asyncio.timeout_at(until):
                await waiter.future
        except BaseException as exc:
            if waiter.future.done() and not waiter.future.cancelled():
                q.in_flight -= 1  # granted at the last moment: hand the slot on
                self.dispatch(model)
            else:
                self._remove(q, waiter)
            if isinstance(exc, TimeoutError):
                raise QueueTimeout(
                    f"No capacity for `{model}` within {wait:g}s"
                    + (" (no replica has finished loading)" if cold else "")
                    + "; retry later.",
                    retry_after=self._retry_after(q, model),
                ) from None
            raise
        return q

    def release(self, q: PoolQueue, service_seconds: float) -> None:
        q.in_flight -= 1
        q.served += 1
        q.busy_seconds += service_seconds
        self.dispatch(q.model)

    def dispatch(self, model: str | None = None) -> None:
        """Hand free capacity to waiters; called on release and when replicas become ready."""
        queues = [self.queues[model]] if model is not None and model in self.queues else self.queues.values()
        for q in queues:
            if not q.waiting:
                continue  # the common case on release: nobody to hand a slot to
            cap = self.capacity(q.model)
            while q.waiting and q.in_flight < cap:
                w = self._next(q)
                if w is None:
                    break
                q.in_flight += 1
                w.future.set_result(None)

    def _next(self, q: PoolQueue) -> _Waiter | None:
        for priority in sorted(q.lanes):
            teams = q.lanes[priority]
            while teams:
                team, lane = next(iter(teams.items()))
                del teams[team]
                while lane:
                    w = lane.popleft()
                    if not w.future.done():
                        if lane:
                            teams[team] = lane  # back of the line: the next team goes first
                        q.waiting -= 1
                        return w
            del q.lanes[priority]
        return None

    def _remove(self, q: PoolQueue, w: _Waiter) -> None:
        lane = q.lanes.get(w.priority, {}).get(w.team)
        if lane is not None and w in lane:
            lane.remove(w)
            q.waiting -= 1
            if not lane:
                del q.lanes[w.priority][w.team]

    def _retry_after(self, q: PoolQueue, model: str) -> int:
        """Seconds until the queue ahead would drain at the observed service rate."""
        cap = max(1, self.capacity(model))
        mean = q.busy_seconds / q.served if q.served else 1.0
        return max(1, min(300, math.ceil((q.waiting + 1) * mean / cap)))

    def snapshot(self, models: list[str]) -> list[tuple[str, int, int]]:
        """(model, priority, depth) for every model and every known priority, zeros included."""
        priorities = sorted({*self._priority.values(), self._s.default_priority})
        out = []
        for model in sorted({*models, *self.queues}):
            q = self.queues.get(model)
            for p in sorted({*priorities, *(q.lanes if q is not None else ())}):
                out.append((model, p, q.depth(p) if q is not None else 0))
        return out
