"""Stage 5, admit: keep each pool within its capacity; queue the excess instead of failing.

A pool is the set of ready replicas serving one model; a request is admitted while one of them
has a slot the router (``route.choose_backend``) will give it: a replica's ``max_in_flight``
(vLLM's ``--max-num-seqs``) minus its requests in flight, only trial slots while its breaker is
half-open, none while open (unless every replica of the pool is: panic routing). A replica's
slots are shared by every model it serves (a vLLM serving LoRA adapters or several names runs
``max_num_seqs`` sequences in all), so models that share replicas are counted together: admitted
requests not on a replica yet (just dispatched, or between retries) hold a slot of that group.

A request that finds no slot waits in a bounded priority queue: lower tier ``priority`` first,
and within a priority the teams of a model take turns, so one team's burst cannot starve
another; models sharing replicas go by priority, then arrival. Waiters are dispatched whenever
capacity may have come back: a request of the group ended, a replica became ready, a breaker
reached its reset time or closed. Every waiter has a deadline. A full queue answers 429, a
passed deadline 503, both with a Retry-After computed from the queue. While no replica is ready
at all (deploy, scale from zero), requests wait up to ``cold_start_wait`` instead of failing.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.backends import Backend, BackendPool
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
    seq: int  # arrival order across the models of a group


@dataclass(eq=False)
class PoolQueue:
    model: str
    in_flight: int = 0  # admitted and not released (on a replica, or about to be)
    waiting: int = 0
    # priority → team → FIFO of waiters; dict order is the teams' turn order
    lanes: dict[int, dict[str, deque[_Waiter]]] = field(default_factory=dict)
    served: int = 0
    busy_seconds: float = 0.0  # summed service time of finished requests, for Retry-After
    group: _Group | None = None  # the models it shares replicas with (set by Admission)

    def depth(self, priority: int) -> int:
        return sum(len(q) for q in self.lanes.get(priority, {}).values())


@dataclass(eq=False)
class _Group:
    """Models that share replicas (directly or through others), and those replicas."""

    queues: list[PoolQueue] = field(default_factory=list)
    replicas: list[Backend] = field(default_factory=list)
    waiting: int = 0  # summed over its queues: zero means release() has nobody to wake


class Admission:
    def __init__(self, pool: BackendPool, settings: AdmissionSettings, tier_priority: dict[str, int]) -> None:
        self._pool = pool
        self._s = settings
        self._priority = tier_priority
        self.queues: dict[str, PoolQueue] = {}
        self._seq = 0
        self._groups: dict[str, _Group] = {}  # model → its group, rebuilt by _regroup()
        self.on_release: Callable[[], None] | None = None  # capacity freed (job workers look again)
        self._regroup()

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

    def _room(self, g: _Group, model: str) -> int:
        """Requests for ``model`` that may be admitted now, or -1 while no replica is ready for it.

        The slots ``route.choose_backend`` would find free on ``model``'s replicas, less the
        group's admitted requests that are not on a replica yet (each will take one of the
        group's slots, maybe one of these).
        """
        placed = free = panic = ready = ejected = 0
        for b in g.replicas:
            out = b.outstanding
            placed += out
            if not (b.ready and model in b.models):
                continue
            ready += 1
            room = b.settings.max_in_flight - out
            if room < 0:
                room = 0
            panic += room
            br = b.breaker
            allowed = br.allowance() if br is not None else None
            if allowed is None:
                free += room
            elif allowed:
                free += room if room < allowed else allowed
            else:
                ejected += 1
        if not ready:
            return -1
        if ejected == ready:
            free = panic  # panic routing: the router ignores the breakers
        admitted = 0
        for q in g.queues:
            admitted += q.in_flight
        room = free - (admitted - placed if admitted > placed else 0)
        return room if room > 0 else 0

    @property
    def job_priority(self) -> int:
        """The priority of job lines (gateway/jobs): after every interactive tier's."""
        return max((*self._priority.values(), self._s.default_priority)) + 1

    def has_room(self, model: str) -> bool:
        """Whether a request for ``model`` would be admitted at once, with nobody waiting."""
        q = self.queues.get(model)
        if q is not None and q.waiting:
            return False
        g = q.group if q is not None else self._groups.get(model)
        if g is None:
            return any(b.ready and model in b.models for b in self._pool.backends)
        return self._room(g, model) > 0

    async def admit(
        self, model: str, tier: str | None, team: str | None, deadline: float, priority: int | None = None
    ) -> PoolQueue:
        """Return once the request may go upstream (the caller must call release()).

        Lower priority values go first: the tier's (``priority_of(tier)``) unless ``priority``
        says otherwise (job lines: ``job_priority``).
        """
        q = self.queues.get(model)
        if q is None:
            q = self.queues[model] = PoolQueue(model)
            self._regroup()
        g = q.group
        assert g is not None
        room = self._room(g, model)
        if q.waiting == 0 and room > 0:
            q.in_flight += 1
            return q
        cold = self._pool.cold_for(model)
        if room < 0 and not cold:
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
        self._seq += 1
        waiter = _Waiter(
            loop.create_future(),
            self.priority_of(tier) if priority is None else priority,
            team or "",
            self._seq,
        )
        q.lanes.setdefault(waiter.priority, {}).setdefault(waiter.team, deque()).append(waiter)
        q.waiting += 1
        g.waiting += 1
        try:
            async with asyncio.timeout_at(until):
                await waiter.future
        except BaseException as exc:
            if waiter.future.done() and not waiter.future.cancelled():
                q.in_flight -= 1  # granted at the last moment: hand the slot on
                self._dispatch_group(q)
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
        g = q.group
        if g is not None and g.waiting:
            # Dispatch counted the requests it let go as holding a slot of the group until they
            # are on a replica; once this one is (the caller routes it before it next awaits),
            # look again: the others' slots may have been elsewhere.
            loop.call_soon(self._dispatch_group, q)
        return q

    def release(self, q: PoolQueue, service_seconds: float) -> None:
        q.in_flight -= 1
        q.served += 1
        q.busy_seconds += service_seconds
        g = q.group
        if g is not None and g.waiting:  # the common case: nobody to hand a slot to
            self._dispatch_group(q)
        elif self.on_release is not None:
            self.on_release()

    def dispatch(self, model: str | None = None) -> None:
        """Hand free capacity to waiters: when replicas become ready or change their models (the
        health poller), and when a breaker lets requests in again (its reset time, or closed)."""
        if model is None:
            self._regroup()
            for g in {id(g): g for g in self._groups.values()}.values():
                if g.waiting and g.queues:
                    self._dispatch_group(g.queues[0])
        elif model in self.queues:
            self._dispatch_group(self.queues[model])

    def _dispatch_group(self, q: PoolQueue) -> None:
        """Grant waiters of ``q``'s group while their models have room: by priority, then arrival."""
        g = q.group
        if g is None:
            return
        while g.waiting:
            best: _Waiter | None = None
            best_q: PoolQueue | None = None
            for cand in g.queues:
                if not cand.waiting:
                    continue
                w = self._peek(cand)
                if w is None or (best is not None and (w.priority, w.seq) >= (best.priority, best.seq)):
                    continue
                if self._room(g, cand.model) > 0:
                    best, best_q = w, cand
            if best_q is None:
                return
            w2 = self._next(best_q)
            if w2 is None:
                return
            best_q.in_flight += 1
            w2.future.set_result(None)

    def _peek(self, q: PoolQueue) -> _Waiter | None:
        """The waiter _next() would return, left in place."""
        for priority in sorted(q.lanes):
            for lane in q.lanes[priority].values():
                for w in lane:
                    if not w.future.done():
                        return w
        return None

    def _next(self, q: PoolQueue) -> _Waiter | None:
        g = q.group
        for priority in sorted(q.lanes):
            teams = q.lanes[priority]
            while teams:
                team, lane = next(iter(teams.items()))
                del teams[team]
                while lane:
                    w = lane.popleft()
                    q.waiting -= 1  # counted off by whoever takes it out of its lane
                    if g is not None:
                        g.waiting -= 1
                    if not w.future.done():
                        if lane:
                            teams[team] = lane  # back of the line: the next team goes first
                        return w
            del q.lanes[priority]
        return None

    def _remove(self, q: PoolQueue, w: _Waiter) -> None:
        lane = q.lanes.get(w.priority, {}).get(w.team)
        if lane is not None and w in lane:
            lane.remove(w)
            q.waiting -= 1
            if q.group is not None:
                q.group.waiting -= 1
            if not lane:
                del q.lanes[w.priority][w.team]

    def _regroup(self) -> None:
        """Group the models that share replicas (connected components over every replica's
        listed and configured models), and give each queue its group."""
        parent: dict[str, str] = {}

        def find(x: str) -> str:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        served: list[tuple[Backend, list[str]]] = []
        for b in self._pool.backends:
            names = list(dict.fromkeys([*b.models, *b.settings.models]))
            if not names:
                continue
            served.append((b, names))
            for n in names:
                parent.setdefault(n, n)
            root = find(names[0])
            for n in names[1:]:
                r = find(n)
                if r != root:
                    parent[r] = root
        roots: dict[str, _Group] = {}
        for b, names in served:
            roots.setdefault(find(names[0]), _Group()).replicas.append(b)
        groups: dict[str, _Group] = {m: roots[find(m)] for m in parent}
        for q in self.queues.values():
            g = groups.get(q.model)
            if g is None:
                g = groups[q.model] = _Group()  # no replica serves it (yet): a group of its own
            g.queues.append(q)
            g.waiting += q.waiting
            q.group = g
        self._groups = groups

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
