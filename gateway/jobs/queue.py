"""The durable job queue: one small interface, Redis Streams with consumer groups behind it.

**Fair shares.** A model's lines are queued per *share* — the submitter's team, or the submitter
(subject within no team) — one stream each (``{prefix}qs:{share}:{model}``), and workers take
from the shares in turn (one line per share per turn, a rotation list ``{prefix}rr:{model}``
shared by every replica), so one team's 50,000-line batch does not hold another team's lines
back: each waiting share gets an equal part of the model's capacity.

**The model's stream.** ``{prefix}q:{model}`` holds one small token per line not yet taken; the
worker that takes a line takes (and deletes) a token with it, in the same script. Its consumer
group's lag is therefore the model's waiting lines, in one stream whatever the number of shares:
what KEDA's ``redis-streams`` scaler reads (deploy/k8s/scaledobject.yaml), with zero pods too.
Lines queued there by a gateway from before shares (whole entries, not tokens) are still taken.

One consumer group (``workers``) per stream, shared by every gateway replica; each replica's
workers are consumers of it. An entry is a job line: which job (``kind``, ``job``), which line
(``cid``, a batch's ``custom_id`` or the single job's id) and the request body. Entries are
appended by the record store's scripts (``JobStore.submit_job``, ``JobStore.enqueue_lines``,
with ``APPEND_LUA``), in the same step as what records them, so that a job is never recorded
without its entry nor a batch line queued twice. Delivery is at least once:

* ``take`` hands an entry to one consumer (``XREADGROUP``): it stays in its stream's pending list
  until ``ack`` (``XACK`` + ``XDEL``), whatever happens to the worker;
* a worker running a line renews it (``touch``: ``XCLAIM`` to itself with ``JUSTID``, which
  resets the entry's idle time without counting a delivery);
* ``reclaim`` (``XAUTOCLAIM``) gives a consumer the entries idle longer than the visibility
  timeout: those of a worker that died (SIGKILL, lost host) or lost Redis' connection;
* an entry that keeps failing is moved to the dead-letter stream ``{prefix}dlq`` by the worker.

The scripts name the share streams they reach through the rotation list, not in ``KEYS``: one
Redis server or primary, as for the rest of the gateway's Redis use (not Redis Cluster).
Another engine (SQS, RabbitMQ, NATS JetStream) fits behind ``JobQueue``'s taking side (the same
calls), but its appends would need an outbox next to the records in Redis: the one-step append
above is what Redis Streams gives for free.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Final, Protocol

import redis.asyncio as aioredis

GROUP = "workers"

# Lua for the record store's scripts that append lines: ``ensure(stream)`` makes a stream with
# its consumer group; ``append(share_stream, model_stream, fields)`` queues one line and its
# token and returns the line's entry id; ``enlist(rotation, share)`` puts the share in the turn.
APPEND_LUA: Final = """
local function ensure(key)
  if redis.call('EXISTS', key) == 0 then
    redis.call('XGROUP', 'CREATE', key, 'workers', '0', 'MKSTREAM')
  end
end
local function append(line_stream, model_stream, fields)
  local id = redis.call('XADD', line_stream, '*', unpack(fields))
  redis.call('XADD', model_stream, '*', 'tok', '1')
  return id
end
local function enlist(rotation, share)
  if not redis.call('LPOS', rotation, share) then redis.call('RPUSH', rotation, share) end
end
"""

# KEYS[1] the model's rotation list, KEYS[2] its stream (tokens; old whole lines). ARGV[1] group,
# ARGV[2] consumer, ARGV[3] share streams' prefix, ARGV[4] ':' .. model. Returns {stream, id,
# fields} of the next share's first new line, with one token taken and deleted, or false.
_TAKE = """
local function read(key)
  local ok, got = pcall(redis.call, 'XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', key, '>')
  if ok and got then return got[1][2][1] end
  return nil
end
local function drop(key, id)
  redis.call('XACK', key, ARGV[1], id)
  redis.call('XDEL', key, id)
end
local n = redis.call('LLEN', KEYS[1])
for i = 1, n do
  local share = redis.call('LMOVE', KEYS[1], KEYS[1], 'LEFT', 'RIGHT')
  local key = ARGV[3] .. share .. ARGV[4]
  local e = read(key)
  if e then
    local t = read(KEYS[2])
    if t and t[2][1] == 'tok' then drop(KEYS[2], t[1]) end
    -- (an old whole line read instead stays held: reclaimed after the visibility timeout)
    return {key, e[1], e[2]}
  end
  if redis.call('XLEN', key) == 0 then redis.call('LREM', KEYS[1], 1, share) end
end
for i = 1, 100 do
  local t = read(KEYS[2])
  if not t then return false end
  if t[2][1] ~= 'tok' then return {KEYS[2], t[1], t[2]} end
  drop(KEYS[2], t[1])  -- a token whose line is gone
end
return false
"""

# KEYS as _TAKE. ARGV[1] group, ARGV[2] consumer, ARGV[3] min idle ms, ARGV[4] share streams'
# prefix, ARGV[5] ':' .. model. Returns {stream, id, fields} of a line held longer than the min
# idle time, now this consumer's, or false.
_RECLAIM = """
local function claim(key)
  local ok, got = pcall(redis.call, 'XAUTOCLAIM', key, ARGV[1], ARGV[2], ARGV[3], '0-0', 'COUNT', 1)
  if not ok then return nil end
  for _, e in ipairs(got[2]) do
    if e[2] and e[2][1] ~= 'tok' then return e end
    redis.call('XACK', key, ARGV[1], e[1])  -- deleted meanwhile, or a token: nothing to run
    if e[2] then redis.call('XDEL', key, e[1]) end
  end
  return nil
end
for _, share in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  local key = ARGV[4] .. share .. ARGV[5]
  local e = claim(key)
  if e then return {key, e[1], e[2]} end
end
local e = claim(KEYS[2])
if e then return {KEYS[2], e[1], e[2]} end
return false
"""

# KEYS[1] the stream the lines are in, KEYS[2] the model's stream. ARGV[1] group, ARGV[2]
# consumer, then the entry ids. Lines never taken give their tokens back (taken and deleted), so
# the model's lag stays its waiting lines. Returns how many were never taken.
_REMOVE = """
local untaken = 0
if KEYS[1] ~= KEYS[2] then
  for i = 3, #ARGV do
    if #redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i]) > 0 then
      local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
      if not ok or #p == 0 then untaken = untaken + 1 end
    end
  end
end
pcall(redis.call, 'XACK', KEYS[1], ARGV[1], unpack(ARGV, 3))
redis.call('XDEL', KEYS[1], unpack(ARGV, 3))
local left = untaken
while left > 0 do
  local ok, got = pcall(redis.call, 'XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', left,
                        'STREAMS', KEYS[2], '>')
  if not ok or not got then break end
  local read = got[1][2]
  for _, t in ipairs(read) do
    if t[2][1] == 'tok' then
      redis.call('XACK', KEYS[2], ARGV[1], t[1])
      redis.call('XDEL', KEYS[2], t[1])
      left = left - 1
    end  -- an old whole line stays held: reclaimed after the visibility timeout
  end
  if #read == 0 then break end
end
return untaken
"""

# KEYS as _TAKE. ARGV[1] group, ARGV[2] share streams' prefix, ARGV[3] ':' .. model. Returns
# {waiting, held, id of the oldest line (waiting or held) or ''}. Waiting is the model stream's
# unread entries (tokens and old lines): the lag its autoscaler reads.
_DEPTH = """
local function pending(key)
  local ok, p = pcall(redis.call, 'XPENDING', key, ARGV[1])
  if ok and p then return tonumber(p[1]) end
  return 0
end
local held = pending(KEYS[2])
local waiting = redis.call('XLEN', KEYS[2]) - held
local oldest = ''
local function older(key)
  local first = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)[1]
  if first then
    local a, b = string.match(first[1], '(%d+)-(%d+)')
    local o1, o2 = string.match(oldest, '(%d+)-(%d+)')
    if oldest == '' or tonumber(a) < tonumber(o1) or (a == o1 and tonumber(b) < tonumber(o2)) then
      oldest = first[1]
    end
  end
end
for _, share in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  local key = ARGV[2] .. share .. ARGV[3]
  held = held + pending(key)
  older(key)
end
-- an old whole line in the model's stream (tokens are not lines)
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
if first and first[2][1] ~= 'tok' then older(KEYS[2]) end
if waiting < 0 then waiting = 0 end
return {waiting, held, oldest}
"""


def share_of(team: str | None, owner: str) -> str:
    """The share a submitter's lines are queued in: its team, or (no team) the submitter itself.

    16 hex digits (a digest: no team or subject name in Redis key names). ``owner`` is the
    submitter's owner key (gateway/jobs/files.py ``owner_key``)."""
    if team is not None:
        return hashlib.sha256(b"team\0" + team.encode()).hexdigest()[:16]
    return owner[:16]


@dataclass(frozen=True, slots=True)
class Entry:
    """One delivered job line. ``entry_id`` is the queue's own id in ``stream`` (ack, touch)."""

    model: str
    stream: str
    entry_id: str
    kind: str  # "batch" | "job"
    job: str  # batch id or job id
    cid: str  # the batch line's custom_id, or the job id
    line: int  # 1-based line in the batch input (0 for a single job)
    body: bytes  # the request body, as the client sent it
    enqueued_at: float  # unix seconds


@dataclass(frozen=True, slots=True)
class AppendKeys:
    """Where a script appends a line of ``model`` for one share (``APPEND_LUA``)."""

    lines: str  # the share's stream of the model's lines
    model: str  # the model's stream (one token per line not yet taken)
    rotation: str  # the model's list of shares with lines, taken from in turn
    share: str


class JobQueue(Protocol):
    def append_keys(self, model: str, share: str) -> AppendKeys:
        """The keys the store's scripts append ``share``'s lines of ``model`` to (with
        ``APPEND_LUA``; entries ``kind``, ``job``, ``cid``, ``line``, ``body``, ``t``)."""
        ...

    def entry_at(self, kept: str) -> tuple[str, str, str]:
        """(model, stream, entry id) of an entry, from what a batch's entries list or a job's
        record kept of it: ``"<entry id> <stream key>"``, or (lines queued before shares)
        ``"<entry id> <model>"``."""
        ...

    async def remove(self, model: str, stream: str, entry_ids: list[str]) -> None:
        """Drop lines that will never run (their batch expired or was cancelled), taken or not."""
        ...

    async def take(self, model: str, consumer: str) -> Entry | None:
        """The next new line for ``model`` (at most one; the next share's turn), or None."""
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
        """(lines waiting, lines held by workers, unix time of the oldest line or None)."""
        ...

    async def models(self) -> list[str]:
        """Models with a stream (lines were ever queued for them)."""
        ...


class RedisStreamsQueue:
    """``JobQueue`` on Redis Streams (``XADD``/``XREADGROUP``/``XAUTOCLAIM``), Redis ≥ 6.2."""

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self._r: Any = redis  # redis-py's stubs type replies as unions of every RESP shape
        self._p = prefix
        self._shares = f"{prefix}qs:"
        self._take = self._r.register_script(_TAKE)
        self._reclaim = self._r.register_script(_RECLAIM)
        self._remove = self._r.register_script(_REMOVE)
        self._depth = self._r.register_script(_DEPTH)

    def _model_stream(self, model: str) -> str:
        return f"{self._p}q:{model}"

    def _rotation(self, model: str) -> str:
        return f"{self._p}rr:{model}"

    def append_keys(self, model: str, share: str) -> AppendKeys:
        return AppendKeys(
            f"{self._shares}{share}:{model}", self._model_stream(model), self._rotation(model), share
        )

    def entry_at(self, kept: str) -> tuple[str, str, str]:
        eid, _, where = kept.partition(" ")
        if where.startswith(self._shares):  # {prefix}qs:{16 hex digits}:{model}
            return where[len(self._shares) + 17 :], where, eid
        return where, self._model_stream(where), eid

    async def remove(self, model: str, stream: str, entry_ids: list[str]) -> None:
        if not entry_ids:
            return
        keys = [stream, self._model_stream(model)]
        await self._remove(keys=keys, args=[GROUP, "purge", *entry_ids])

    async def take(self, model: str, consumer: str) -> Entry | None:
        keys = [self._rotation(model), self._model_stream(model)]
        got = await self._take(keys=keys, args=[GROUP, consumer, self._shares, f":{model}"])
        return _entry(model, got) if got else None

    async def reclaim(self, model: str, consumer: str, min_idle: float) -> Entry | None:
        keys = [self._rotation(model), self._model_stream(model)]
        args: list[str | int] = [GROUP, consumer, int(min_idle * 1000), self._shares, f":{model}"]
        got = await self._reclaim(keys=keys, args=args)
        return _entry(model, got) if got else None

    async def touch(self, entry: Entry, consumer: str) -> None:
        await self._r.xclaim(entry.stream, GROUP, consumer, 0, [entry.entry_id], justid=True)

    async def ack(self, entry: Entry) -> None:
        pipe = self._r.pipeline(transaction=True)
        pipe.xack(entry.stream, GROUP, entry.entry_id)
        pipe.xdel(entry.stream, entry.entry_id)
        await pipe.execute()

    async def depth(self, model: str) -> tuple[int, int, float | None]:
        keys = [self._rotation(model), self._model_stream(model)]
        waiting, held, oldest = await self._depth(keys=keys, args=[GROUP, self._shares, f":{model}"])
        oldest = oldest.decode() if isinstance(oldest, bytes) else oldest
        first = int(oldest.split("-")[0]) / 1000 if oldest else None
        return int(waiting), int(held), first

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


def _entry(model: str, got: list[Any]) -> Entry:
    """An Entry from a script's ``{stream, id, {field, value, ...}}``."""
    stream, entry_id, flat = got
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    return Entry(
        model=model,
        stream=stream.decode() if isinstance(stream, bytes) else stream,
        entry_id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
        kind=fields[b"kind"].decode(),
        job=fields[b"job"].decode(),
        cid=fields[b"cid"].decode(),
        line=int(fields.get(b"line", b"0")),
        body=fields[b"body"],
        enqueued_at=float(fields.get(b"t", b"0")),
    )
