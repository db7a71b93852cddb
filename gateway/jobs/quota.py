"""Per-principal bounds on what the jobs keep: batches and jobs not yet ended, files stored.

Without them one principal (one leaked key) could fill Redis with queued lines or the file store
with uploads (for everyone: Redis out of memory fails every job). They cap how much one principal
queues, not the order lines run in (first queued, first run).

* Batches and jobs not yet ended are leases in a sorted set per principal and kind,
  ``{prefix}quota:{kind}:{owner}`` (member: the id; score: when the lease lapses, Unix seconds).
  Taking one is one script (drop lapsed leases, count, add), so replicas racing cannot pass the
  cap together. A batch or job that ends gives its lease back (``JobStore.expire``); one whose
  ending was never recorded (Redis lost it) stops counting when its lease lapses, its completion
  window plus an hour after creation, so the count never drifts for good.
* Stored files: a hash per principal, ``{prefix}files:usage:{owner}``: file id → bytes, and
  ``_`` → their sum. The script that records a file adds it (refusing an upload past the
  bounds), and removing a file's bytes (delete, expiry, a discarded upload) removes it.
"""

from __future__ import annotations

from typing import Final

from gateway.errors import Fault, GatewayError

LEASE_SLACK: Final = 3600  # seconds a lease outlives its batch's or job's completion window

# KEYS[1] the principal's leases. ARGV: now, cap, id, lapses at. 1 when held (taken now or
# before), 0 at the cap.
TAKE_LEASE: Final = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
local ttl = tonumber(ARGV[4]) - tonumber(ARGV[1])
if redis.call('TTL', KEYS[1]) < ttl then redis.call('EXPIRE', KEYS[1], ttl) end
return 1
"""

# One job submission, whole or not at all: the Idempotency-Key check, the lease, the record and
# the queue entry in one script, so that a lost reply leaves a state the submitter can read back
# (the record exists: all of it happened). Runs after gateway/jobs/queue.py ``APPEND_LUA``.
# KEYS: Idempotency-Key (the record's key when none), record, owner's index, active set, owner's
# leases, models set, the share's stream of the model's lines, the model's stream, its rotation
# of shares. ARGV: the key's value ('' when none), id, doc JSON, created µs, now, cap, lease
# lapses at, model, share, then the queue entry's field/value pairs. The record keeps the entry's
# id and stream (`entry`: a cancel takes it out of the queue). 1 made, 0 the key names another
# submission, -1 at the cap.
SUBMIT_JOB: Final = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', ARGV[5])
if redis.call('ZCARD', KEYS[5]) >= tonumber(ARGV[6]) then return -1 end
ensure(KEYS[7])
ensure(KEYS[8])
local entry = append(KEYS[7], KEYS[8], {unpack(ARGV, 10)})
enlist(KEYS[9], ARGV[9])
redis.call('ZADD', KEYS[5], ARGV[7], ARGV[2])
local ttl = tonumber(ARGV[7]) - tonumber(ARGV[5])
if redis.call('TTL', KEYS[5]) < ttl then redis.call('EXPIRE', KEYS[5], ttl) end
redis.call('HSET', KEYS[2], 'doc', ARGV[3], 'status', 'queued', 'entry', entry .. ' ' .. KEYS[7])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[2])
redis.call('SADD', KEYS[6], ARGV[8])
return 1
"""

# KEYS: record, owner's index, expiry index, owner's usage. ARGV: record JSON, expires at,
# file id, created µs, expiry member, bytes, max bytes, max files (0: never refuse, a batch's
# own output). Returns 1 when recorded, 0 past the byte bound, -1 past the file bound.
RECORD_FILE: Final = """
local bytes = tonumber(ARGV[6])
if ARGV[8] ~= '0' then
  local used = tonumber(redis.call('HGET', KEYS[4], '_') or '0')
  if used + bytes > tonumber(ARGV[7]) then return 0 end
  local n = redis.call('HLEN', KEYS[4])
  if redis.call('HEXISTS', KEYS[4], '_') == 1 then n = n - 1 end
  if n >= tonumber(ARGV[8]) then return -1 end
end
redis.call('SET', KEYS[1], ARGV[1], 'EXAT', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[5])
if redis.call('HSETNX', KEYS[4], ARGV[3], bytes) == 1 then redis.call('HINCRBY', KEYS[4], '_', bytes) end
return 1
"""

# KEYS[1] the owner's usage. ARGV[1] file id. Removes the file from it (once).
FORGET_FILE: Final = """
local b = redis.call('HGET', KEYS[1], ARGV[1])
if b then
  redis.call('HDEL', KEYS[1], ARGV[1])
  if redis.call('HINCRBY', KEYS[1], '_', -tonumber(b)) <= 0 and redis.call('HLEN', KEYS[1]) <= 1 then
    redis.call('DEL', KEYS[1])
  end
end
return 1
"""


class TooManyActive(GatewayError):
    """429: the principal has ``jobs.max_active_batches`` batches (or ``max_active_jobs`` jobs)
    not yet ended. Retrying helps once one ends: ``Retry-After`` is set. The client's own doing
    (no backend is blamed)."""

    status = 429
    type = "rate_limit_error"
    code = "too_many_active_batches"
    reason = "job_quota"
    fault = Fault.CLIENT


class StorageQuotaExceeded(GatewayError):
    """429 ``insufficient_quota`` (OpenAI's type for a spent quota): the principal keeps
    ``jobs.max_stored_bytes`` bytes or ``jobs.max_files`` files already. Retrying does not help
    until files are deleted or expire: ``x-should-retry: false`` tells the OpenAI SDKs not to."""

    status = 429
    type = "insufficient_quota"
    code = "storage_quota_exceeded"
    reason = "storage_quota"
    fault = Fault.CLIENT

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [*super().headers(), (b"x-should-retry", b"false")]
