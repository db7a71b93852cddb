"""Counters for the limit stage: in this process's memory, or in Redis.

Two kinds of counter, each kept so that no lost or replayed update can make it drift:

* **fixed windows** (requests and tokens per minute): a number that starts at
  the window's first hit and lasts the window. A correction (refund, extra
  charge) only lands in the window it was reserved in: once the window is gone
  it is dropped, and a counter never goes below zero nor above ``CAP``;
* **leases** (requests in flight): a set of per-request leases, each with its
  own expiry. A slot is held by a lease, freed by releasing that lease, and
  freed anyway when the lease expires (a crashed replica, a lost release). A
  release is idempotent, so a replayed or late one cannot free someone else's
  slot, and a storage restart loses leases instead of leaving a negative count.

Two operations, each one call (one Redis round trip, as one Lua script, so it
is atomic across workers and replicas):

* ``take``: add each window cost in order and then take each lease; at the
  first one over its limit, take back what this call added and report it;
* ``settle``: add window corrections and release leases.

Not the ``limits`` package: its in-memory storage took an asyncio lock, two
background tasks and a dozen ``time.time()`` calls per request, about a sixth
of the gateway's CPU per request (docs/benchmarks.md); its Redis storage took
one round trip per counter (seven per request) where a script takes one.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from gateway.storage_timeout import storage_timeout

# Largest value a window counter holds, and the largest single cost or correction. Lua numbers
# are doubles (exact to 2**53) and Redis' INCRBY fails beyond int64: values stay far below both.
CAP = 2**50

# (key, cost, limit, window seconds)
TakeItem = tuple[str, int, int, float]
# (key, limit): a lease in this set of requests in flight
LeaseItem = tuple[str, int]
# (key, amount): a correction of a window counter, negative for refunds
AddItem = tuple[str, int]
# (key, lease id): a lease to release
ReleaseItem = tuple[str, int]


def clamp(value: int) -> int:
    """``value`` bounded to [-CAP, CAP]."""
    return -CAP if value < -CAP else CAP if value > CAP else value


class Taken(Protocol):
    failed: int  # index (windows first, then leases) of the one over its limit; -1: all taken
    counts: list[int]  # each counter's value after the call (leases: held); up to the failed one
    ttls: list[float]  # seconds left in each window (leases: the lease length)


class _Taken:
    __slots__ = ("counts", "failed", "ttls")

    def __init__(self, failed: int, counts: list[int], ttls: list[float]) -> None:
        self.failed, self.counts, self.ttls = failed, counts, ttls


class Counters(Protocol):
    slack: float  # seconds of rounding in reported windows

    async def take(self, items: Sequence[TakeItem], leases: Sequence[LeaseItem], lease: int) -> Taken:
        """Take every window cost and a lease ``lease`` in every lease set, or nothing."""
        ...

    async def settle(self, corrections: Sequence[AddItem], releases: Sequence[ReleaseItem]) -> None:
        """Apply corrections to windows that still exist and release leases (idempotent)."""
        ...

    async def close(self) -> None: ...


class MemoryCounters:
    """Counters in dicts, swept once a minute.

    Windows: ``{key: [count, window end]}``; leases: ``{key: {lease id: expiry}}``. Times come
    from ``clock`` (seconds, monotonic; injectable for tests).
    """

    slack = 0.0

    def __init__(
        self,
        lease_seconds: float,
        sweep_every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._d: dict[str, list[Any]] = {}
        self._leases: dict[str, dict[int, float]] = {}
        self._lease_seconds = lease_seconds
        self._clock = clock
        self._sweep_every = sweep_every
        self._next_sweep = clock() + sweep_every

    def _entry(self, key: str, window: float, now: float) -> list[Any]:
        e = self._d.get(key)
        if e is None or e[1] <= now:
            e = self._d[key] = [0, now + window]
        return e

    async def take(self, items: Sequence[TakeItem], leases: Sequence[LeaseItem], lease: int) -> Taken:
        return self.take_now(items, leases, lease)

    def take_now(self, items: Sequence[TakeItem], leases: Sequence[LeaseItem], lease: int) -> Taken:
        """``take`` without a coroutine (the same dict work; for tests and callers off the loop)."""
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        counts: list[int] = []
        ttls: list[float] = []
        for i, (key, cost, limit, window) in enumerate(items):
            e = self._entry(key, window, now)
            e[0] += cost
            counts.append(e[0])
            ttls.append(e[1] - now)
            if e[0] > limit:
                self._undo(items[: i + 1], (), lease, now)
                return _Taken(i, counts, ttls)
        expiry = now + self._lease_seconds
        for j, (key, limit) in enumerate(leases):
            held = self._leases.get(key)
            if held is None:
                held = self._leases[key] = {}
            elif len(held) >= limit:
                # Leases of one key share a length, so insertion order is expiry order.
                while held:
                    first = next(iter(held))
                    if held[first] > now:
                        break
                    del held[first]
            if len(held) >= limit:
                counts.append(len(held))
                ttls.append(self._lease_seconds)
                self._undo(items, leases[:j], lease, now)
                return _Taken(len(items) + j, counts, ttls)
            held[lease] = expiry
            counts.append(len(held))
            ttls.append(self._lease_seconds)
        return _Taken(-1, counts, ttls)

    def _undo(self, items: Sequence[TakeItem], leases: Sequence[LeaseItem], lease: int, now: float) -> None:
        for k, c, _, w in items:
            self._entry(k, w, now)[0] -= c
        for k, _ in leases:
            self._leases[k].pop(lease, None)

    async def settle(self, corrections: Sequence[AddItem], releases: Sequence[ReleaseItem]) -> None:
        self.settle_now(corrections, releases)

    def settle_now(self, corrections: Sequence[AddItem], releases: Sequence[ReleaseItem]) -> None:
        now = self._clock()
        for key, amount in corrections:
            e = self._d.get(key)
            if e is None or e[1] <= now:
                continue  # the window it was reserved in is over
            v = e[0] + amount
            e[0] = 0 if v < 0 else CAP if v > CAP else v
        for key, lease in releases:
            held = self._leases.get(key)
            if held is not None:
                held.pop(lease, None)

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self._sweep_every
        for key in [k for k, e in self._d.items() if e[1] <= now]:
            del self._d[key]
        for key, held in list(self._leases.items()):
            for lease in [x for x, until in held.items() if until <= now]:
                del held[lease]
            if not held:
                del self._leases[key]

    def held(self, key: str) -> int:
        """Leases of ``key`` not yet expired (for tests and introspection)."""
        now = self._clock()
        return sum(1 for until in self._leases.get(key, {}).values() if until > now)

    async def close(self) -> None:
        self._d.clear()
        self._leases.clear()


# KEYS: the window counters, then the lease sets. ARGV[1]: number of windows; ARGV[2]: lease
# member; ARGV[3]: lease length (ms); then cost, limit, window (ms) per window; then the limit
# per lease set. Lease scores are Redis' own clock (ms), shared by every replica. Returns
# {0, count1, pttl1, ...} or {i, count, pttl} for the i-th (1-based) one over its limit.
_TAKE = """
local n = tonumber(ARGV[1])
local member = ARGV[2]
local lease_ms = tonumber(ARGV[3])
local out = {0}
for i = 1, n do
  local key = KEYS[i]
  local cost = tonumber(ARGV[3 * i + 1])
  local window = tonumber(ARGV[3 * i + 3])
  local v = redis.call('INCRBY', key, cost)
  local t = redis.call('PTTL', key)
  if t < 0 then
    redis.call('PEXPIRE', key, window)
    t = window
  end
  if v > tonumber(ARGV[3 * i + 2]) then
    for j = 1, i do
      redis.call('DECRBY', KEYS[j], tonumber(ARGV[3 * j + 1]))
    end
    return {i, v, t}
  end
  out[2 * i] = v
  out[2 * i + 1] = t
end
if #KEYS > n then
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  for i = n + 1, #KEYS do
    local key = KEYS[i]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local held = redis.call('ZCARD', key)
    if held >= tonumber(ARGV[3 * n + 3 + i - n]) then
      for j = 1, n do
        redis.call('DECRBY', KEYS[j], tonumber(ARGV[3 * j + 1]))
      end
      for j = n + 1, i - 1 do
        redis.call('ZREM', KEYS[j], member)
      end
      return {i, held, lease_ms}
    end
    redis.call('ZADD', key, now + lease_ms, member)
    redis.call('PEXPIRE', key, lease_ms)
    out[2 * i] = held + 1
    out[2 * i + 1] = lease_ms
  end
end
return out
"""

# KEYS: the window counters to correct, then the lease sets. ARGV[1]: number of corrections;
# then the amount per correction; then the lease member per lease set. A window that is gone
# (over, or lost with a Redis restart) is not recreated; values stay within [0, CAP].
_SETTLE = """
local n = tonumber(ARGV[1])
local cap = tonumber(ARGV[n + 2])
for i = 1, n do
  local key = KEYS[i]
  if redis.call('EXISTS', key) == 1 then
    local v = redis.call('INCRBY', key, tonumber(ARGV[i + 1]))
    if v < 0 then
      redis.call('SET', key, 0, 'KEEPTTL')
    elseif v > cap then
      redis.call('SET', key, cap, 'KEEPTTL')
    end
  end
end
for i = n + 1, #KEYS do
  redis.call('ZREM', KEYS[i], ARGV[i + 2])
end
return 0
"""


class RedisCounters:
    """Counters in Redis (one server or a primary; not Redis Cluster: a request's counters
    live under different keys that one script must reach together).

    At most ``max_connections`` calls run at once; the others wait for a turn without a
    timer: running out of local connections under a burst is back-pressure, not a storage
    outage (which would let every waiting request through when failing open). ``timeout``
    bounds each call once it has its turn, so a turn comes within (calls ahead /
    ``max_connections``) x ``timeout`` even when Redis hangs.
    """

    slack = 0.001  # PTTL reports whole milliseconds

    def __init__(self, url: str, timeout: float, lease_seconds: float, max_connections: int = 64) -> None:
        import redis.asyncio as aioredis

        self._timeout = timeout
        # The semaphore is the bounded wait for a connection: at most `max_connections` calls
        # hold one, so the pool (with room to spare) never raises "Too many connections".
        # redis-py's BlockingConnectionPool does the same with an asyncio.Condition, measured
        # at 6.6 µs more CPU per call.
        pool = aioredis.ConnectionPool.from_url(
            url,
            max_connections=2 * max_connections,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=30,
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._slots = asyncio.Semaphore(max_connections)
        self._take = self._redis.register_script(_TAKE)
        self._settle = self._redis.register_script(_SETTLE)
        self._lease_ms = max(1, int(lease_seconds * 1000))
        # Lease members are unique across replicas: this process's random prefix + its lease id.
        self._member = secrets.token_hex(6) + ":"

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        async with self._slots, storage_timeout(self._timeout):
            return await script(keys=keys, args=args)

    async def take(self, items: Sequence[TakeItem], leases: Sequence[LeaseItem], lease: int) -> Taken:
        keys = [k for k, _, _, _ in items]
        args: list[Any] = [len(items), self._member + str(lease), self._lease_ms]
        for _, cost, limit, window in items:
            args += (clamp(cost), min(limit, CAP), int(window * 1000))
        for key, limit in leases:
            keys.append(key)
            args.append(min(limit, CAP))
        out = await self._call(self._take, keys, args)
        first = int(out[0])
        if first:  # Lua's 1-based index of the counter over its limit
            pad = first - 1
            return _Taken(pad, [0] * pad + [int(out[1])], [0.0] * pad + [out[2] / 1000])
        return _Taken(-1, [int(v) for v in out[1::2]], [t / 1000 for t in out[2::2]])

    async def settle(self, corrections: Sequence[AddItem], releases: Sequence[ReleaseItem]) -> None:
        if not corrections and not releases:
            return
        keys = [k for k, _ in corrections]
        args: list[Any] = [len(corrections), *(clamp(a) for _, a in corrections), CAP]
        for key, lease in releases:
            keys.append(key)
            args.append(self._member + str(lease))
        await self._call(self._settle, keys, args)

    async def close(self) -> None:
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()


def counters_from_url(url: str, timeout: float, lease_seconds: float) -> Counters:
    """Memory counters for ``memory://``, else Redis; leases last ``lease_seconds``."""
    if url.startswith("memory://"):
        return MemoryCounters(lease_seconds)
    return RedisCounters(url, timeout, lease_seconds)
