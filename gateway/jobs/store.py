"""Batch and job records, and their results, in Redis.

A record is a hash, ``{prefix}batch:{id}`` or ``{prefix}job:{id}``:

* ``doc``: what never changes (id, endpoint, input file, window, metadata, owner, the principal
  it runs as), JSON;
* ``status`` and one field per timestamp (``in_progress_at``, ``completed_at``...), changed only
  by ``transition``, a compare-and-set on the status (one Lua script: replicas racing to move a
  batch on cannot both win);
* ``output_file_id``, ``error_file_id``, ``errors`` (JSON), ``total`` (request lines);
* a single job's ``attempt``: 1 while a request of it is at the pipeline, 0 while it waits
  between attempts (``DELETE /v1/jobs/{id}`` cancels it only then, or while it is queued).

A batch's results are two hashes keyed by ``custom_id``, ``…:out`` (2xx answers) and ``…:err``
(other answers, lines dead-lettered or expired), written once across both (a Lua script): a line
delivered twice (a worker died after writing its result, before acknowledging it), or ending
after its batch expired it, keeps its first result, so it appears exactly once in the output.
``request_counts`` are the two hashes' sizes. A single
job's result is its record's ``result`` field, written the same way.

Everything expires ``jobs.retention`` seconds after the batch or job ends.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import redis.asyncio as aioredis

from gateway.auth.principal import Principal
from gateway.jobs.files import owner_key
from gateway.jobs.queue import APPEND_LUA, AppendKeys
from gateway.jobs.quota import SUBMIT_JOB, TAKE_LEASE

__all__ = ["JobStore", "owner_key"]

BATCH_TIMESTAMPS = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})

# KEYS[1] record; ARGV[1] "|"-joined statuses it may move from, ARGV[2] new status, then
# field/value pairs to set. Returns 1 when moved, 0 when the status was not one of those.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return -1 end
local ok = false
for s in string.gmatch(ARGV[1], '[^|]+') do if s == cur then ok = true end end
if not ok then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


# KEYS[1] the hash to write, KEYS[2] the other results hash, KEYS[3] the running set; ARGV[1]
# custom_id, ARGV[2] line. A line has one result, in one of the two hashes: a second answer for
# it (a retry racing the first, or a line ending after the batch marked it expired) is dropped.
# Returns 1 when written.
_PUT_ONCE = """
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
return redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
"""


# KEYS[1] the batch's enqueued-lines hash, KEYS[2] its entries list, KEYS[3] the share's stream
# of the model's lines, KEYS[4] the set of models with a stream, KEYS[5] the model's stream,
# KEYS[6] its rotation of shares (gateway/jobs/queue.py), KEYS[7] the batch's record; ARGV[1]
# the model, ARGV[2] how many fields an entry has, ARGV[3] the share, then per line its number
# and its entry's field/value pairs. A line is appended only if its number was never enqueued
# for the batch, so a validation resumed after a crash or a Redis failure (or run twice) queues
# each line once. Returns how many lines were appended, or -1 (nothing) when the batch is no
# longer `validating`: a cancel then finds every line it must take out already listed.
_ENQUEUE_LINES = (
    APPEND_LUA
    + """
if redis.call('HGET', KEYS[7], 'status') ~= 'validating' then return -1 end
ensure(KEYS[3])
ensure(KEYS[5])
local n = 0
local step = 1 + 2 * tonumber(ARGV[2])
for i = 4, #ARGV, step do
  if redis.call('HSETNX', KEYS[1], ARGV[i], 1) == 1 then
    local id = append(KEYS[3], KEYS[5], {unpack(ARGV, i + 1, i + step - 1)})
    redis.call('RPUSH', KEYS[2], id .. ' ' .. KEYS[3])
    n = n + 1
  end
end
if n > 0 then enlist(KEYS[6], ARGV[3]) end
redis.call('SADD', KEYS[4], ARGV[1])
return n
"""
)


# KEYS[1] the record, KEYS[2] its attempts hash, KEYS[3] its running set; ARGV[1] the line's
# custom_id, ARGV[2] now (Unix seconds), ARGV[3] "|"-joined statuses it may start under.
# Returns the line's delivery count, or 0 (nothing changed) when the status is not one of those.
_START_LINE = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return 0 end
local ok = false
for s in string.gmatch(ARGV[3], '[^|]+') do if s == cur then ok = true end end
if not ok then return 0 end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
"""


# A single job's record while it is ``in_progress`` says whether a request of it is at the
# pipeline now (field ``attempt`` 1) or it waits between attempts (a limit's Retry-After, a full
# queue, a retry's backoff: ``attempt`` 0 or absent). KEYS[1] the record; ARGV[1] 1 or 0.
# Returns 1 when set: 1 only while the job is in_progress (not cancelled since), 0 only while the
# record exists (an expired record is not brought back).
_ATTEMPT = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur or (ARGV[1] == '1' and cur ~= 'in_progress') then return 0 end
redis.call('HSET', KEYS[1], 'attempt', ARGV[1])
return 1
"""

# DELETE /v1/jobs/{id}. KEYS[1] the record; ARGV[1] now (Unix seconds). A job is cancelled while
# queued, or in progress between attempts (waiting); not while a request of it runs. Returns
# {1, 'cancelled'} when this call cancelled it, else {0, its status} ('' when there is none).
_CANCEL_JOB = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, ''} end
if cur == 'queued' or (cur == 'in_progress' and redis.call('HGET', KEYS[1], 'attempt') ~= '1') then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancelled_at', ARGV[1])
  return {1, 'cancelled'}
end
return {0, cur}
"""


def principal_doc(p: Principal) -> dict[str, Any]:
    return {
        "subject": p.subject,
        "team": p.team,
        "tier": p.tier,
        "scopes": sorted(p.scopes),
        "models": None if p.models is None else sorted(p.models),
        "via": p.via,
    }


def principal_from(doc: dict[str, Any]) -> Principal:
    models = doc.get("models")
    return Principal(
        subject=doc["subject"],
        team=doc.get("team"),
        tier=doc.get("tier"),
        scopes=frozenset(doc.get("scopes") or ()),
        models=None if models is None else frozenset(models),
        via=doc.get("via", "api_key"),
    )


class JobStore:
    def __init__(self, redis: aioredis.Redis, prefix: str, retention: float) -> None:
        self.r: Any = redis  # redis-py's stubs type replies as unions of every RESP shape
        self.p = prefix
        self.retention = int(retention)
        self._transition = redis.register_script(_TRANSITION)
        self._put_once = redis.register_script(_PUT_ONCE)
        self._enqueue_lines = redis.register_script(_ENQUEUE_LINES)
        self._start_line = redis.register_script(_START_LINE)
        self._attempt = redis.register_script(_ATTEMPT)
        self._cancel_job = redis.register_script(_CANCEL_JOB)
        self._take_lease = redis.register_script(TAKE_LEASE)
        self._submit_job = redis.register_script(APPEND_LUA + SUBMIT_JOB)

    # keys
    def key(self, kind: str, rid: str) -> str:
        return f"{self.p}{kind}:{rid}"

    def out_key(self, batch_id: str) -> str:
        return f"{self.p}batch:{batch_id}:out"

    def err_key(self, batch_id: str) -> str:
        return f"{self.p}batch:{batch_id}:err"

    def attempts_key(self, kind: str, rid: str) -> str:
        return f"{self.p}{kind}:{rid}:attempts"

    def running_key(self, kind: str, rid: str) -> str:
        return f"{self.p}{kind}:{rid}:running"

    def entries_key(self, batch_id: str) -> str:
        return f"{self.p}batch:{batch_id}:entries"

    def enqueued_key(self, batch_id: str) -> str:
        return f"{self.p}batch:{batch_id}:enqueued"

    def index_key(self, kind: str, owner: str) -> str:
        return f"{self.p}{kind}s:{owner}"

    def active_key(self, kind: str) -> str:
        return f"{self.p}active:{kind}"

    def quota_key(self, kind: str, owner: str) -> str:
        return f"{self.p}quota:{kind}:{owner}"

    async def enqueue_lines(
        self, batch_id: str, keys: AppendKeys, model: str, lines: list[tuple[int, dict[str, Any]]]
    ) -> int:
        """Append a batch's lines ``(line number, queue entry)`` for ``model`` to its share's
        stream (``keys``: ``JobQueue.append_keys``), each at most once per batch, and list their
        entry ids with their stream under ``entries_key`` (so lines never run can leave the
        queue); one script per call, so a line is either queued and listed or neither. Returns
        how many were new, or -1 (none queued) once the batch is no longer ``validating``. Every
        entry has the same fields, in the same order."""
        if not lines:
            return 0
        fields = len(lines[0][1])
        args: list[Any] = [model, fields, keys.share]
        for number, entry in lines:
            args.append(number)
            for k, v in entry.items():
                args += (k, v)
        script_keys = [
            self.enqueued_key(batch_id),
            self.entries_key(batch_id),
            keys.lines,
            f"{self.p}models",
            keys.model,
            keys.rotation,
            self.key("batch", batch_id),
        ]
        return int(await self._enqueue_lines(keys=script_keys, args=args))

    # per-principal bounds (gateway/jobs/quota.py)
    async def take_lease(self, kind: str, owner: str, rid: str, until: int, cap: int) -> bool:
        """Count ``rid`` among ``owner``'s batches or jobs not yet ended, until it ends or
        ``until`` (Unix seconds); False (and nothing counted) when ``cap`` are already."""
        args: list[str | int] = [int(time.time()), cap, rid, until]
        res = await self._take_lease(keys=[self.quota_key(kind, owner)], args=args)
        return bool(res == 1)

    async def submit_job(
        self,
        jid: str,
        doc: dict[str, Any],
        lease_until: int,
        cap: int,
        guard: tuple[str, str] | None,
        queue: AppendKeys,
        model: str,
        entry: dict[str, Any],
    ) -> int:
        """Record job ``jid`` as ``queued``, count it against its owner's bound and append
        ``entry`` to its share's stream (``queue``: ``JobQueue.append_keys``), in one script
        (gateway/jobs/quota.py ``SUBMIT_JOB``): 1 made, 0 ``guard`` (an Idempotency-Key and the
        value it must hold) names another submission, -1 ``cap`` jobs are already active. Either
        all of it happened or none: after a lost reply, the record's existence says which."""
        owner = doc["owner"]
        record = self.key("job", jid)
        keys = [
            guard[0] if guard is not None else record,
            record,
            self.index_key("job", owner),
            self.active_key("job"),
            self.quota_key("job", owner),
            f"{self.p}models",
            queue.lines,
            queue.model,
            queue.rotation,
        ]
        args: list[Any] = [
            guard[1] if guard is not None else "",
            jid,
            orjson.dumps(doc),
            time.time_ns() // 1000,
            int(time.time()),
            cap,
            lease_until,
            model,
            queue.share,
        ]
        for k, v in entry.items():
            args += (k, v)
        return int(await self._submit_job(keys=keys, args=args))

    async def drop_lease(self, kind: str, owner: str, rid: str) -> None:
        await self.r.zrem(self.quota_key(kind, owner), rid)

    # records
    async def create(self, kind: str, rid: str, doc: dict[str, Any], status: str, **fields: Any) -> None:
        """Record a batch (a job is recorded by ``submit_job``, with its lease and queue entry)."""
        order = time.time_ns() // 1000  # µs: orders records created within one second
        async with self.r.pipeline(transaction=True) as pipe:
            mapping = {"doc": orjson.dumps(doc), "status": status, **{k: _enc(v) for k, v in fields.items()}}
            pipe.hset(self.key(kind, rid), mapping=mapping)
            pipe.zadd(self.index_key(kind, doc["owner"]), {rid: order})
            pipe.sadd(self.active_key(kind), rid)
            await pipe.execute()

    async def load(self, kind: str, rid: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(doc, fields) of a record, or None."""
        raw = await self.r.hgetall(self.key(kind, rid))
        if not raw or b"doc" not in raw:
            return None
        fields = {k.decode(): v for k, v in raw.items() if k != b"doc"}
        return orjson.loads(raw[b"doc"]), fields

    async def status(self, kind: str, rid: str) -> str | None:
        s = await self.r.hget(self.key(kind, rid), "status")
        return s.decode() if s is not None else None

    async def transition(self, kind: str, rid: str, frm: tuple[str, ...], to: str, **fields: Any) -> bool:
        """Move a record from one of ``frm`` to ``to`` (setting ``fields``); False if it was not."""
        args: list[Any] = ["|".join(frm), to]
        for k, v in fields.items():
            args += [k, _enc(v)]
        res = await self._transition(keys=[self.key(kind, rid)], args=args)
        if res == 1 and to in TERMINAL:
            await self.expire(kind, rid)
        return bool(res == 1)

    async def cancel_job(self, jid: str) -> tuple[bool, str | None]:
        """Cancel a job that is queued, or in progress but waiting between attempts (one
        script); (whether this call cancelled it, its status now: None when there is no such
        job). A cancelled job is kept for ``retention`` and its lease given back."""
        moved, status = await self._cancel_job(keys=[self.key("job", jid)], args=[int(time.time())])
        if moved == 1:
            await self.expire("job", jid)
        text = status.decode() if isinstance(status, bytes) else str(status)
        return moved == 1, text or None

    async def job_attempt(self, jid: str, running: bool) -> bool:
        """Mark a job's request as at the pipeline now (``running``: only while the job is
        in_progress, False when it was cancelled or ended since) or as waiting between attempts
        (so that a DELETE may cancel it)."""
        return bool(await self._attempt(keys=[self.key("job", jid)], args=[1 if running else 0]) == 1)

    async def set_fields(self, kind: str, rid: str, **fields: Any) -> None:
        await self.r.hset(self.key(kind, rid), mapping={k: _enc(v) for k, v in fields.items()})

    async def expire(self, kind: str, rid: str) -> None:
        """Keep an ended record and its results for ``retention``, and give back its lease."""
        ttl = self.retention
        raw = await self.r.hget(self.key(kind, rid), "doc")
        pipe = self.r.pipeline(transaction=False)
        if raw is not None:
            pipe.zrem(self.quota_key(kind, orjson.loads(raw)["owner"]), rid)
        for key in (
            self.key(kind, rid),
            self.out_key(rid),
            self.err_key(rid),
            self.attempts_key(kind, rid),
            self.running_key(kind, rid),
            self.entries_key(rid),
            self.enqueued_key(rid),
        ):
            pipe.expire(key, ttl)
        pipe.srem(self.active_key(kind), rid)
        await pipe.execute()

    async def active(self, kind: str) -> list[str]:
        return [m.decode() for m in await self.r.smembers(self.active_key(kind))]

    async def page(self, kind: str, owner: str, after: str | None, limit: int) -> tuple[list[str], bool]:
        """Ids of ``owner``'s records, newest first, after the id ``after``; and whether more remain."""
        key = self.index_key(kind, owner)
        start = 0
        if after is not None:
            rank = await self.r.zrevrank(key, after)
            if rank is None:
                return [], False
            start = rank + 1
        ids = await self.r.zrevrange(key, start, start + limit)
        out = [i.decode() for i in ids]
        return out[:limit], len(out) > limit

    # results
    async def put_result(self, batch_id: str, cid: str, line: bytes, ok: bool) -> bool:
        """Write a line's result once, in the output or the error hash (True if this call wrote
        it); also unmarks it running."""
        out, err = self.out_key(batch_id), self.err_key(batch_id)
        keys = [out, err] if ok else [err, out]
        res = await self._put_once(keys=[*keys, self.running_key("batch", batch_id)], args=[cid, line])
        return bool(res == 1)

    async def has_result(self, batch_id: str, cid: str) -> bool:
        pipe = self.r.pipeline(transaction=False)
        pipe.hexists(self.out_key(batch_id), cid)
        pipe.hexists(self.err_key(batch_id), cid)
        a, b = await pipe.execute()
        return bool(a or b)

    async def counts(self, batch_id: str) -> tuple[int, int]:
        pipe = self.r.pipeline(transaction=False)
        pipe.hlen(self.out_key(batch_id))
        pipe.hlen(self.err_key(batch_id))
        done, failed = await pipe.execute()
        return int(done), int(failed)

    async def results(self, key: str) -> AsyncIterator[tuple[str, bytes]]:
        """Every (custom_id, line) of a results hash, streamed (HSCAN, bounded memory)."""
        async for k, v in self.r.hscan_iter(key, count=500):
            yield (k.decode() if isinstance(k, bytes) else k), v

    async def start_line(self, kind: str, rid: str, cid: str, runnable: tuple[str, ...]) -> int:
        """Count a delivery and mark the line running, in one script, only while the record's
        status is one of ``runnable``; returns the count, or 0 when the line must not start (its
        batch or job was cancelled, expired or ended since the worker looked: a status the
        worker caches for a second must not let a line start after a cancel was answered)."""
        keys = [self.key(kind, rid), self.attempts_key(kind, rid), self.running_key(kind, rid)]
        return int(await self._start_line(keys=keys, args=[cid, time.time(), "|".join(runnable)]))

    async def finish_line(self, batch_id: str, cid: str, line: bytes, ok: bool) -> None:
        """Write a batch line's result once (in one of the two hashes) and unmark it running, in
        one round trip."""
        await self.put_result(batch_id, cid, line, ok)

    async def attempt(self, kind: str, rid: str, cid: str) -> int:
        """Count a delivery of a line; returns how many it has had, this one included."""
        return int(await self.r.hincrby(self.attempts_key(kind, rid), cid, 1))

    async def running(self, kind: str, rid: str, cid: str, on: bool) -> None:
        """Mark a line as running (with the time, renewed by the worker) or no longer."""
        key = self.running_key(kind, rid)
        if on:
            await self.r.zadd(key, {cid: time.time()})
        else:
            await self.r.zrem(key, cid)

    async def running_count(self, kind: str, rid: str, since: float) -> int:
        """Lines marked running and renewed after ``since`` (unix seconds)."""
        return int(await self.r.zcount(self.running_key(kind, rid), since, "+inf"))


def _enc(v: Any) -> bytes | str | int | float:
    if isinstance(v, (bytes, str, int, float)) and not isinstance(v, bool):
        return v
    return orjson.dumps(v)


def field_str(fields: dict[str, Any], name: str) -> str | None:
    v = fields.get(name)
    return v.decode() if isinstance(v, bytes) else v


def field_int(fields: dict[str, Any], name: str) -> int | None:
    v = fields.get(name)
    return int(v) if v is not None else None


def field_json(fields: dict[str, Any], name: str) -> Any:
    v = fields.get(name)
    return orjson.loads(v) if v is not None else None
