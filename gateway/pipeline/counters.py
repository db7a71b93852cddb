"""Fixed-window counters for the limit stage: in this process's memory, or in Redis.

Each counter is a fixed window that starts at its first hit and lasts its
expiry. Two operations, each one call (one Redis round trip, as one Lua
script, so it is atomic across workers and replicas):

* ``take``: add each cost to its counter in order; at the first counter that
  goes over its limit, take back what this call added and report which one;
* ``add``: add amounts (negative for refunds and releases) without a limit.

Not the ``limits`` package: its in-memory storage took an asyncio lock, two
background tasks and a dozen ``time.time()`` calls per request, about a sixth
of the gateway's CPU per request (docs/benchmarks.md); its Redis storage took
one round trip per counter (seven per request) where a script takes one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

# (key, cost, limit, expiry seconds)
TakeItem = tuple[str, int, int, int]
# (key, amount, expiry seconds)
AddItem = tuple[str, int, int]


class Taken(Protocol):
    failed: int  # index of the counter over its limit, -1 when all were taken
    counts: list[int]  # each counter's value after the call (up to the failed one)
    ttls: list[float]  # seconds left in each counter's window


class _Taken:
    __slots__ = ("counts", "failed", "ttls")

    def __init__(self, failed: int, counts: list[int], ttls: list[float]) -> None:
        self.failed, self.counts, self.ttls = failed, counts, ttls


class Counters(Protocol):
    slack: float  # seconds of rounding in reported windows (Redis TTLs)

    async def take(self, items: Sequence[TakeItem]) -> Taken: ...

    async def add(self, items: Sequence[AddItem]) -> None: ...

    async def close(self) -> None: ...


class MemoryCounters:
    """Counters in a dict: {key: [count, window end (monotonic)]}, swept once a minute."""

    slack = 0.0

    def __init__(self, sweep_every: float = 60.0) -> None:
        self._d: dict[str, list[Any]] = {}
        self._sweep_every = sweep_every
        self._next_sweep = time.monotonic() + sweep_every

    def _entry(self, key: str, expiry: int, now: float) -> list[Any]:
        e = self._d.get(key)
        if e is None or e[1] <= now:
            e = self._d[key] = [0, now + expiry]
        return e

    async def take(self, items: Sequence[TakeItem]) -> Taken:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._sweep(now)
        counts: list[int] = []
        ttls: list[float] = []
        for i, (key, cost, limit, expiry) in enumerate(items):
            e = self._entry(key, expiry, now)
            e[0] += cost
            counts.append(e[0])
            ttls.append(e[1] - now)
            if e[0] > limit:
                for k, c, _, x in items[: i + 1]:
                    self._entry(k, x, now)[0] -= c
                return _Taken(i, counts, ttls)
        return _Taken(-1, counts, ttls)

    async def add(self, items: Sequence[AddItem]) -> None:
        now = time.monotonic()
        for key, amount, expiry in items:
            self._entry(key, expiry, now)[0] += amount

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self._sweep_every
        for key in [k for k, e in self._d.items() if e[1] <= now]:
            del self._d[key]

    async def close(self) -> None:
        self._d.clear()


# KEYS: the counters; ARGV: cost, limit, expiry per key. A key without a TTL (new, or left by
# something else) gets the window's expiry. Returns {0, count1, pttl1, ...} or {i, count, pttl}.
_TAKE = """
local out = {0}
for i, key in ipairs(KEYS) do
  local cost = tonumber(ARGV[3 * i - 2])
  local v = redis.call('INCRBY', key, cost)
  local t = redis.call('PTTL', key)
  if t < 0 then
    redis.call('EXPIRE', key, ARGV[3 * i])
    t = tonumber(ARGV[3 * i]) * 1000
  end
  if v > tonumber(ARGV[3 * i - 1]) then
    for j = 1, i do
      redis.call('DECRBY', KEYS[j], tonumber(ARGV[3 * j - 2]))
    end
    return {i, v, t}
  end
  out[2 * i] = v
  out[2 * i + 1] = t
end
return out
"""

# KEYS: the counters; ARGV: amount, expiry per key.
_ADD = """
for i, key in ipairs(KEYS) do
  redis.call('INCRBY', key, tonumber(ARGV[2 * i - 1]))
  if redis.call('PTTL', key) < 0 then
    redis.call('EXPIRE', key, ARGV[2 * i])
  end
end
return 0
"""


class RedisCounters:
    """Counters in Redis (one server or a primary; not Redis Cluster: a request's counters
    live under different keys that one script must reach together)."""

    slack = 1.0  # EXPIRE works in whole seconds

    def __init__(self, url: str, timeout: float) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30
        )
        self._take = self._redis.register_script(_TAKE)
        self._add = self._redis.register_script(_ADD)

    async def take(self, items: Sequence[TakeItem]) -> Taken:
        keys = [k for k, _, _, _ in items]
        args: list[int] = []
        for _, cost, limit, expiry in items:
            args += (cost, limit, expiry)
        out = await self._take(keys=keys, args=args)
        first = int(out[0])
        if first:  # Lua's 1-based index of the counter over its limit
            return _Taken(first - 1, [0] * (first - 1) + [int(out[1])], [0.0] * (first - 1) + [out[2] / 1000])
        return _Taken(-1, [int(v) for v in out[1::2]], [t / 1000 for t in out[2::2]])

    async def add(self, items: Sequence[AddItem]) -> None:
        if not items:
            return
        keys = [k for k, _, _ in items]
        args: list[int] = []
        for _, amount, expiry in items:
            args += (amount, expiry)
        await self._add(keys=keys, args=args)

    async def close(self) -> None:
        await self._redis.aclose()


def counters_from_url(url: str, timeout: float) -> Counters:
    if url.startswith("memory://"):
        return MemoryCounters()
    return RedisCounters(url, timeout)
