"""The durable job queue: one small interface, Redis Streams with a consumer group behind it.

One stream per model (``{prefix}q:{model}``), one consumer group (``workers``) shared by every
gateway replica; each replica's workers are consumers of it. An entry is a job line: which job
(``kind``, ``job``), which line (``cid``, a batch's ``custom_id`` or the single job's id) and the
request body. Entries are appended by the record store's scripts (``JobStore.submit_job``,
``JobStore.enqueue_lines``), in the same step as what records them, so that a job is never
recorded without its entry nor a batch line queued twice. Delivery is at least once:

* ``take`` hands an entry to one consumer (``XREADGROUP``): it stays in the group's pending
  list until ``ack`` (``XACK`` + ``XDEL``), whatever happens to the worker;
* a worker running a line renews it (``touch``: ``XCLAIM`` to itself with ``JUSTID``, which
  resets the entry's idle time without counting a delivery);
* ``reclaim`` (``XAUTOCLAIM``) gives a consumer the entries idle longer than the visibility
  timeout: those of a worker that died (SIGKILL, lost host) or lost Redis' connection;
* an entry that keeps failing is moved to the dead-letter stream ``{prefix}dlq`` by the worker.

Another engine (SQS, RabbitMQ, NATS JetStream) fits behind ``JobQueue``'s taking side (the same
calls), but its appends would need an outbox next to the records in Redis: the one-step append
above is what Redis Streams gives for free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

GROUP = "workers"


@dataclass(frozen=True, slots=True)
class Entry:
    """One delivered job line. ``entry_id`` is the queue's own id (ack, touch)."""

    model: str
    entry_id: str
    kind: str  # "batch" | "job"
    job: str  # batch id or job id
    cid: str  # the batch line's custom_id, or the job id
    line: int  # 1-based line in the batch input (0 for a single job)
    body: bytes  # the request body, as the client sent it
    enqueued_at: float  # unix seconds


class JobQueue(Protocol):
    async def stream(self, model: str) -> str:
        """The key of ``model``'s stream, its consumer group made, for the store's scripts that
        append entries (``kind``, ``job``, ``cid``, ``line``, ``body``, ``t``)."""
        ...

    async def remove(self, model: str, entry_ids: list[str]) -> None:
        """Drop lines that will never run (their batch expired or was cancelled), taken or not."""
        ...

    async def take(self, model: str, consumer: str) -> Entry | None:
        """The next new line for ``model`` (at most one), or None when there is none."""
        ...

    async def reclaim(self, model: str, consumer: str, min_idle: float) -> Entry | None:
        """A line another consumer held longer than ``min_idle`` seconds, now this consumer's."""
        ...

    async def touch(self, entry: Entry, consumer: str) -> None:
        """Tell the queue the line is still being worked on (resets its idle time)."""
        ...

    async def ack(self, entry: Entry) -> None:
        """The line is done (its result is written): remove it from the queue."""
        ...

    async def depth(self, model: str) -> tuple[int, int, float | None]:
        """(lines waiting, lines held by workers, unix time of the oldest waiting line or None)."""
        ...

    async def models(self) -> list[str]:
        """Models with a stream (lines were ever queued for them)."""
        ...


class RedisStreamsQueue:
    """``JobQueue`` on Redis Streams (``XADD``/``XREADGROUP``/``XAUTOCLAIM``), Redis ≥ 6.2."""

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self._r: Any = redis  # redis-py's stubs type replies as unions of every RESP shape
        self._p = prefix
        self._groups: set[str] = set()

    def _key(self, model: str) -> str:
        return f"{self._p}q:{model}"

    async def _ensure(self, key: str) -> None:
        if key in self._groups:
            return
        try:
            await self._r.xgroup_create(key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(key)

    async def stream(self, model: str) -> str:
        """The stream of ``model``'s lines, its consumer group made: for a caller that appends
        to it inside a script of its own (``JobStore.submit_job``)."""
        key = self._key(model)
        await self._ensure(key)
        return key

    async def remove(self, model: str, entry_ids: list[str]) -> None:
        if not entry_ids:
            return
        key = self._key(model)
        pipe = self._r.pipeline(transaction=True)
        pipe.xack(key, GROUP, *entry_ids)
        pipe.xdel(key, *entry_ids)
        await pipe.execute()

    async def take(self, model: str, consumer: str) -> Entry | None:
        key = self._key(model)
        await self._ensure(key)
        try:
            got = await self._r.xreadgroup(GROUP, consumer, {key: ">"}, count=1)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._groups.discard(key)  # the stream was lost (Redis flushed): made again next time
            return None
        if not got:
            return None
        _, messages = got[0]
        entry_id, fields = messages[0]
        return _entry(model, entry_id, fields)

    async def reclaim(self, model: str, consumer: str, min_idle: float) -> Entry | None:
        key = self._key(model)
        await self._ensure(key)
        try:
            res = await self._r.xautoclaim(key, GROUP, consumer, int(min_idle * 1000), "0-0", count=1)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._groups.discard(key)
            return None
        messages = res[1]
        for entry_id, fields in messages:
            if fields:  # a deleted entry still pending comes back without fields
                return _entry(model, entry_id, fields)
            await self._r.xack(key, GROUP, entry_id)
        return None

    async def touch(self, entry: Entry, consumer: str) -> None:
        await self._r.xclaim(self._key(entry.model), GROUP, consumer, 0, [entry.entry_id], justid=True)

    async def ack(self, entry: Entry) -> None:
        key = self._key(entry.model)
        pipe = self._r.pipeline(transaction=True)
        pipe.xack(key, GROUP, entry.entry_id)
        pipe.xdel(key, entry.entry_id)
        await pipe.execute()

    async def depth(self, model: str) -> tuple[int, int, float | None]:
        key = self._key(model)
        length = await self._r.xlen(key)
        if not length:
            return 0, 0, None
        held = 0
        try:
            info = await self._r.xpending(key, GROUP)
            held = int(info["pending"])
        except ResponseError:
            pass
        oldest: float | None = None
        first = await self._r.xrange(key, count=1)
        if first:
            oldest = int(first[0][0].split(b"-")[0]) / 1000
        return max(0, length - held), held, oldest

    async def models(self) -> list[str]:
        return sorted(m.decode() for m in await self._r.smembers(f"{self._p}models"))

    async def dead_letter(self, entry: Entry, reason: str) -> None:
        """Keep a copy of a line that will not run again, with why, in ``{prefix}dlq``."""
        await self._r.xadd(
            f"{self._p}dlq",
            {"model": entry.model, "kind": entry.kind, "job": entry.job, "cid": entry.cid, "reason": reason},
            maxlen=100_000,
            approximate=True,
        )


def _entry(model: str, entry_id: bytes | str, fields: dict[bytes, bytes]) -> Entry:
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return Entry(
        model=model,
        entry_id=eid,
        kind=fields[b"kind"].decode(),
        job=fields[b"job"].decode(),
        cid=fields[b"cid"].decode(),
        line=int(fields.get(b"line", b"0")),
        body=fields[b"body"],
        enqueued_at=float(fields.get(b"t", b"0")),
    )
