"""Batches and single-request jobs: submission, status, cancel, and their workers.

``Jobs`` is what the HTTP handlers (gateway/jobs/api.py) call, and it owns the replica's
workers and sweeper. The model (docs/jobs.md):

* **submit**: a batch is recorded ``validating`` and answered at once; this replica validates
  its input file (every line, nothing enqueued when one is bad) and enqueues its lines on the
  model's stream (``in_progress``). A single job (``Prefer: respond-async``) is validated like a
  synchronous request and enqueued before the 202.
* **run**: each replica runs ``jobs.concurrency`` workers. A worker takes a line only when the
  line's model has a free slot with no interactive request waiting (``Admission.has_room``), and
  runs it through the proxy pipeline (``ProxyEndpoint.execute``) at the job priority, below every
  interactive tier. A line that failed for the backend's reason is retried with backoff; one
  delivered ``max_deliveries`` times is dead-lettered into the error file. A line refused by a
  rate limit or the queue waits (it is not failed). A worker renews the lines it runs; a line
  whose worker vanished is reclaimed after ``visibility_timeout``.
* **finish**: the worker that writes a batch's last result finalizes it (output and error
  files, ``completed``); the sweeper (every replica, every second) finalizes what a dead replica
  left, expires batches past their window (partial output; lines not run go to the error file
  as ``batch_expired``), ends cancels once running lines finished, resumes validations whose
  replica died, and refreshes the job gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from gateway.auth.principal import Principal
from gateway.errors import Fault, GatewayError, InvalidRequest, NotFound
from gateway.jobs.batch_input import ModelCheck, iter_batch_requests, validate_batch_input
from gateway.jobs.files import Files
from gateway.jobs.metrics import JobsMetrics
from gateway.jobs.queue import Entry, RedisStreamsQueue, share_of
from gateway.jobs.quota import LEASE_SLACK, TooManyActive
from gateway.jobs.store import (
    BATCH_TIMESTAMPS,
    TERMINAL,
    JobStore,
    field_int,
    field_json,
    field_str,
    owner_key,
    principal_doc,
    principal_from,
)
from gateway.pipeline.sink import ResultSink

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.proxy import ProxyEndpoint

BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
_WINDOW = re.compile(r"^([1-9][0-9]{0,5})([smh])$")
_UNIT = {"s": 1, "m": 60, "h": 3600}


class _NoLongerValidating(Exception):
    """The batch being validated left ``validating`` (cancelled): queue nothing more."""


# Reasons a line waits and is tried again without counting as a failed delivery: a limit or
# the admission queue refused it (the gateway's own back-pressure), or no replica is ready. A
# refusal that is the request's own fault (Fault.CLIENT: one that can never fit its token
# budget, 429 tokens_exceed_limit) is its answer instead, whatever its reason.
_WAIT_REASONS = frozenset({"rate_limited", "shed", "upstream_unavailable", "limit_storage", "budget_storage"})
_LOOK_EVERY = 1.0  # seconds between looks at its batch's or job's status of a line that waits
# An outcome of a line's attempts: stop, acknowledge it, write no result (its batch or job was
# cancelled, or ended, while it waited).
_DROPPED = (False, b"", "dropped")
_FINALIZE_LOCK_SECONDS = 120  # a replica that died finalizing holds a batch this long at most
_VALIDATION_GRACE = 600  # seconds past its window a batch may still be validating
JOB_WINDOW = 86400  # seconds a `Prefer: respond-async` job may wait and run (its expires_at)
IDEMPOTENCY_WAIT = 5.0  # seconds a submission holding an Idempotency-Key may take to record its job
IDEMPOTENCY_GIVE_UP = 30.0  # seconds a repeated submission waits for an outcome, at most
# KEYS: an Idempotency-Key, the record of the job its current holder makes (the key itself when
# it has none). ARGV: the value it must hold now ('': none), the new value, ttl s. A holder is
# replaced only while its job is not recorded: its script may have run late (Redis stalled).
_SWAP_KEY = """
local cur = redis.call('GET', KEYS[1])
if (cur or '') ~= ARGV[1] then return 0 end
if ARGV[1] ~= '' and redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""
# KEYS: an Idempotency-Key, the record of the job its value names. ARGV[1] the value it must
# hold to be deleted. Kept when that job is recorded: a submission whose reply was lost lets go
# only of a key under which nothing was made (its script, if still pending in a stalled Redis,
# then finds the key gone and makes nothing).
_RELEASE_KEY = """
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _too_many(kind: str, cap: int) -> TooManyActive:
    plural = "batches" if kind == "batch" else "jobs"
    cancel = "POST /v1/batches/{batch_id}/cancel" if kind == "batch" else "DELETE /v1/jobs/{job_id}"
    return TooManyActive(
        f"You have {cap} {plural} not yet ended, the most allowed at once: wait for one "
        f"to end, or cancel one ({cancel}).",
        code=f"too_many_active_{plural}",
        retry_after=30,
    )


class JobsUnavailable(GatewayError):
    """The job store (Redis) cannot be reached: retry shortly."""

    status = 503
    type = "server_error"
    code = "jobs_unavailable"
    reason = "jobs_storage"
    fault = Fault.GATEWAY

    def __init__(self) -> None:
        super().__init__("The job queue is unavailable right now; retry shortly.", retry_after=5)


class IdempotencyKeyReused(GatewayError):
    status = 422
    type = "invalid_request_error"
    code = "idempotency_key_reused"
    reason = "validation"
    fault = Fault.CLIENT

    def __init__(self) -> None:
        super().__init__(
            "This Idempotency-Key was used for a different request; use a new key for a new request.",
            param="Idempotency-Key",
        )


def request_fingerprint(endpoint: str, raw: bytes, task_type: str | None) -> str:
    """What an Idempotency-Key remembers of its request: every input that changes what runs —
    the endpoint, the body (decoded) and the task type header (it may route to another model).
    Nothing else of the request reaches the job (``ProxyEndpoint.execute``). A request without
    a task type keeps the digest of keys recorded before it counted."""
    digest = hashlib.sha256(endpoint.encode() + b"\0" + raw)
    if task_type is not None:
        # A JSON body holds no NUL byte: this suffix cannot be part of another request's body.
        digest.update(b"\0task\0" + task_type.encode("latin-1"))
    return digest.hexdigest()[:32]


def parse_window(value: Any) -> int:
    """Seconds of a ``completion_window``: ``24h`` (OpenAI's only value), or a shorter ``N{s,m,h}``."""
    m = _WINDOW.match(value) if isinstance(value, str) else None
    seconds = int(m.group(1)) * _UNIT[m.group(2)] if m else 0
    if not 0 < seconds <= 86400:
        raise InvalidRequest(
            "completion_window must be `24h` (or a shorter window such as `1h`, `30m`).",
            param="completion_window",
        )
    return seconds


class Jobs:
    def __init__(
        self, gw: Gateway, endpoints: dict[str, ProxyEndpoint], redis: aioredis.Redis, files: Files
    ) -> None:
        s = gw.settings.jobs
        self.s = s
        self.gw = gw
        self.endpoints = endpoints
        self.r: Any = redis  # redis-py's stubs type replies as unions of every RESP shape
        self.files = files
        self.queue = RedisStreamsQueue(redis, s.key_prefix)
        self.store = JobStore(redis, s.key_prefix, s.retention)
        self._swap_key = redis.register_script(_SWAP_KEY)
        # A key lasts as long as its job can: its window (a day), then its retention once ended.
        self._idempotency_ttl = int(JOB_WINDOW + s.retention + LEASE_SLACK)
        self._release_key = redis.register_script(_RELEASE_KEY)
        self.metrics = JobsMetrics(gw.metrics.registry)
        gw.metrics.add_collector(self.metrics.collector)
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.log = structlog.get_logger("gateway.jobs")
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._models: list[str] = []
        self._models_at = 0.0
        self._status_cache: dict[str, tuple[float, str | None]] = {}
        self._docs: dict[str, dict[str, Any]] = {}
        self._totals: dict[str, int] = {}
        self._reclaimed_at: dict[str, float] = {}

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        try:
            async with asyncio.timeout(2):
                await self.r.ping()
        except (RedisError, OSError, TimeoutError):
            self.log.warning(
                "jobs: the queue's Redis cannot be reached; /v1/files, /v1/batches and async "
                "requests answer 503 until it can (interactive requests are not affected)",
                queue=_redacted(self.s.queue),
            )
        for i in range(self.s.concurrency):
            self._tasks.append(asyncio.create_task(self._worker(i), name=f"jobs-worker-{i}"))
        self._tasks.append(asyncio.create_task(self._sweeper(), name="jobs-sweeper"))
        self._tasks.append(asyncio.create_task(self.files.run_reaper(), name="files-reaper"))

    async def stop(self) -> None:
        """Stop taking lines; lines running now end with the drain (unfinished ones are left
        pending in the queue and reclaimed by another replica after the visibility timeout)."""
        self._stopping.set()
        self._wake.set()
        for t in [*self._tasks, *self._background]:
            t.cancel()
        for t in [*self._tasks, *self._background]:
            with contextlib.suppress(BaseException):
                await t
        await self.files.store.close()
        await self.r.aclose()

    def wake(self) -> None:
        """Capacity may have come back (a request ended): idle workers look again."""
        self._wake.set()

    def _spawn(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ batches
    async def create_batch(self, principal: Principal, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise InvalidRequest("The body must be a JSON object.")
        fid = body.get("input_file_id")
        if not isinstance(fid, str) or not fid:
            raise InvalidRequest("input_file_id is required.", param="input_file_id")
        endpoint = body.get("endpoint")
        if endpoint not in BATCH_ENDPOINTS:
            raise InvalidRequest(f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)}.", param="endpoint")
        window = parse_window(body.get("completion_window"))
        metadata = body.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict)
            and len(metadata) <= 16
            and all(
                isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                for k, v in metadata.items()
            )
        ):
            raise InvalidRequest(
                "metadata must be an object of at most 16 string keys (64 characters) and string "
                "values (512 characters).",
                param="metadata",
            )
        owner = owner_key(principal)
        record = await self.files.get(owner, fid)
        if record is None:
            raise NotFound(f"No such file: {fid}.", param="input_file_id")
        if record.get("purpose") != "batch":
            raise InvalidRequest(
                "The input file must be uploaded with purpose `batch`.", param="input_file_id"
            )
        now = int(time.time())
        bid = f"batch_{secrets.token_hex(12)}"
        doc = {
            "id": bid,
            "endpoint": endpoint,
            "input_file_id": fid,
            "completion_window": body.get("completion_window"),
            "created_at": now,
            "expires_at": now + window,
            "metadata": metadata,
            "owner": owner,
            "principal": principal_doc(principal),
        }
        try:
            await self._take_lease("batch", owner, bid, now + window, self.s.max_active_batches)
            await self.store.create("batch", bid, doc, "validating", validation_lock=now)
        except BaseException:
            # Refused, or a reply lost (the lease may be held all the same): given back, so that
            # a failed creation never keeps counting against the bound.
            with contextlib.suppress(RedisError, OSError):
                await asyncio.shield(self.store.drop_lease("batch", owner, bid))
            raise
        self._spawn(self._validate(bid))
        return await self.batch(owner, bid)

    async def _take_lease(self, kind: str, owner: str, rid: str, ends: int, cap: int) -> None:
        """Count a new batch or job against its principal's bound (gateway/jobs/quota.py), or
        raise ``TooManyActive`` (429, ``Retry-After``)."""
        if not await self.store.take_lease(kind, owner, rid, ends + LEASE_SLACK, cap):
            raise _too_many(kind, cap)

    async def batch(self, owner: str, bid: str) -> dict[str, Any]:
        got = await self.store.load("batch", bid)
        if got is None or got[0].get("owner") != owner:
            raise NotFound(f"No such batch: {bid}.", param="batch_id")
        return await self._render_batch(*got)

    async def list_batches(self, owner: str, after: str | None, limit: int) -> dict[str, Any]:
        ids, more = await self.store.page("batch", owner, after, limit)
        data = []
        for bid in ids:
            got = await self.store.load("batch", bid)
            if got is not None:
                data.append(await self._render_batch(*got))
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": more,
        }

    async def cancel_batch(self, owner: str, bid: str) -> dict[str, Any]:
        got = await self.store.load("batch", bid)
        if got is None or got[0].get("owner") != owner:
            raise NotFound(f"No such batch: {bid}.", param="batch_id")
        moved = await self.store.transition(
            "batch", bid, ("validating", "in_progress"), "cancelling", cancelling_at=int(time.time())
        )
        if not moved:
            status = await self.store.status("batch", bid)
            if status not in ("cancelling", "cancelled"):
                raise InvalidRequest(f"A batch that is {status} cannot be cancelled.", code="invalid_state")
        self._status_cache.pop(bid, None)
        self._spawn(self._maybe_end_cancel(bid))
        return await self.batch(owner, bid)

    async def _render_batch(self, doc: dict[str, Any], f: dict[str, Any]) -> dict[str, Any]:
        bid = doc["id"]
        status = field_str(f, "status")
        total = field_int(f, "total") or 0
        if status in TERMINAL and "completed_count" in f:
            done, failed = field_int(f, "completed_count") or 0, field_int(f, "failed_count") or 0
        else:
            done, failed = await self.store.counts(bid)
        out: dict[str, Any] = {
            "id": bid,
            "object": "batch",
            "endpoint": doc["endpoint"],
            "errors": field_json(f, "errors"),
            "input_file_id": doc["input_file_id"],
            "completion_window": doc["completion_window"],
            "status": status,
            "output_file_id": field_str(f, "output_file_id"),
            "error_file_id": field_str(f, "error_file_id"),
            "created_at": doc["created_at"],
            "expires_at": doc["expires_at"],
        }
        for ts in BATCH_TIMESTAMPS:
            out[ts] = field_int(f, ts)
        out["request_counts"] = {"total": total, "completed": done, "failed": failed}
        out["metadata"] = doc.get("metadata")
        return out

    def _served(self, body: dict[str, Any], task_type: str | None = None) -> str:
        """The model that will answer a job line, resolved as ``Router.plan`` does: its task route
        (the body's task field, else the job's task header), then aliases. Raises
        ``InvalidRequest`` when the task field is not a string."""
        model = body.get("model")
        headers = []
        if task_type is not None:
            headers.append((self.gw.settings.routing.task_header.encode(), task_type.encode("latin-1")))
        scope = {"type": "http", "headers": headers}
        return self.gw.router.plan(scope, dict(body), model if isinstance(model, str) else "-").model

    def _check_model(self, principal: Principal) -> ModelCheck:
        gw = self.gw

        def check(model: str, body: dict[str, Any]) -> str | tuple[str, str] | None:
            try:
                served = self._served(body)
            except InvalidRequest as exc:
                return exc.message
            if gw.pool.any_ready and not gw.pool.known_model(served):
                # As a synchronous request is answered 404: no backend lists it (a typo).
                return "model_not_found", f"The model `{served}` does not exist here."
            if not gw.auth.may_use(principal, served):
                if served == model:
                    return f"You may not use the model `{model}`."
                return f"The model `{model}` is served by `{served}` here, which you may not use."
            return None

        return check

    async def _validate(self, bid: str) -> None:
        """Validate a batch's input and enqueue its lines (``validating`` → ``in_progress``).

        Resumable: the sweeper runs it again when its replica died or Redis failed under it
        (``validation_lock`` not refreshed for ``visibility_timeout``); lines already queued are
        not queued again (``JobStore.enqueue_lines``), so no line runs twice."""
        try:
            got = await self.store.load("batch", bid)
            if got is None:
                return
            doc, _ = got
            principal = principal_from(doc["principal"])
            share = share_of(principal.team, doc["owner"])
            period = self.s.visibility_timeout / 3
            beat = time.monotonic()

            async def heartbeat() -> None:
                # This replica is still at it: no other one resumes the batch meanwhile.
                nonlocal beat
                if time.monotonic() - beat >= period:
                    beat = time.monotonic()
                    await self.store.set_fields("batch", bid, validation_lock=int(time.time()))

            _, errors = await validate_batch_input(
                self.files,
                doc["input_file_id"],
                doc["endpoint"],
                self._check_model(principal),
                self.s.max_file_lines,
                self.gw.settings.server.max_body_bytes,
                heartbeat,
            )
            now = int(time.time())
            if errors:
                await self.store.transition(
                    "batch",
                    bid,
                    ("validating",),
                    "failed",
                    failed_at=now,
                    total=0,
                    errors={"object": "list", "data": errors},
                )
                return
            chunk: dict[str, list[tuple[int, dict[str, Any]]]] = {}
            queued = 0

            async def flush() -> None:
                for model, items in chunk.items():
                    keys = self.queue.append_keys(model, share)
                    if await self.store.enqueue_lines(bid, keys, model, items) < 0:
                        raise _NoLongerValidating
                chunk.clear()
                await heartbeat()

            async for line, cid, body in iter_batch_requests(self.files, doc["input_file_id"]):
                served = self._served(body)
                chunk.setdefault(served, []).append(
                    (
                        line,
                        {
                            "kind": "batch",
                            "job": bid,
                            "cid": cid,
                            "line": line,
                            "body": orjson.dumps(body),
                            "t": time.time(),
                        },
                    )
                )
                queued += 1
                if queued % 500 == 0:
                    await flush()
            await flush()
            moved = await self.store.transition(
                "batch", bid, ("validating",), "in_progress", in_progress_at=int(time.time()), total=queued
            )
            if not moved:  # cancelled while validating
                await self.store.set_fields("batch", bid, total=queued)
            self.wake()
        except _NoLongerValidating:
            # Cancelled (or ended) while its lines were being queued: the script refused the
            # rest, and the cancel takes out what was queued before it (its total: those).
            queued = int(await self.r.llen(self.store.entries_key(bid)))
            await self.store.set_fields("batch", bid, total=queued)
        except FileNotFoundError:
            # The input file was deleted (or expired) before the batch read it all: the batch
            # fails (OpenAI's shape: one error without a line), and lines already queued leave.
            # Not an outage to retry: the file will not come back.
            moved = await self.store.transition(
                "batch",
                bid,
                ("validating",),
                "failed",
                failed_at=int(time.time()),
                total=0,
                errors={
                    "object": "list",
                    "data": [
                        {
                            "code": "file_not_found",
                            "message": "The input file was deleted before the batch could read it.",
                            "param": "input_file_id",
                            "line": None,
                        }
                    ],
                },
            )
            if moved:
                await self._purge_queue(bid)
        except (RedisError, OSError) as exc:
            self.log.warning(
                "batch validation interrupted; the sweeper resumes it", batch=bid, cause=type(exc).__name__
            )

    # ------------------------------------------------------------------ single jobs
    async def submit_job(
        self,
        principal: Principal,
        endpoint: str,
        raw: bytes,
        model: str,
        task_type: str | None,
        idempotency_key: str | None,
    ) -> tuple[dict[str, Any], bool]:
        """Record and enqueue one request; (job object, created). A repeated ``Idempotency-Key``
        of the same principal returns the job it created."""
        owner = owner_key(principal)
        if idempotency_key is None:
            jid = f"job_{secrets.token_hex(12)}"
            made = await self._submit_job(principal, owner, jid, endpoint, raw, model, task_type)
            assert made is not None  # only a guarded submission makes nothing
            return made
        ikey = f"{self.s.key_prefix}idem:{owner}:{idempotency_key}"
        # The key remembers what it was used for: the same key with another request is an
        # error (IETF draft-ietf-httpapi-idempotency-key-header: 422), not the other's job.
        fingerprint = request_fingerprint(endpoint, raw, task_type)
        interrupted = False
        for _ in range(5):
            jid = f"job_{secrets.token_hex(12)}"
            value = f"{jid} {fingerprint}"
            try:
                prior = await self._claim_idempotency_key(ikey, value, fingerprint)
                if prior is not None:
                    return prior, False
                made = await self._submit_job(
                    principal, owner, jid, endpoint, raw, model, task_type, guard=(ikey, value)
                )
            except (RedisError, OSError):
                # A call to Redis failed or timed out (a replica paused past the socket timeout
                # lands here on resuming, its reply unread; or Redis stalled, the script still
                # pending in it): whether the key was claimed and the job made is unknown. The
                # key is let go only if no job was recorded under it (one script, so a pending
                # submission then finds the key gone and makes nothing), and claimed again,
                # once: that finds this submission's job if it was made. When Redis cannot be
                # reached, the key stays: a retry finds the job, or takes the key over after
                # IDEMPOTENCY_WAIT if none was made.
                await self._let_go(ikey, value)
                if interrupted:
                    raise
                interrupted = True
                continue
            except BaseException:
                # A refused submission leaves the key free for the retry (only if it still
                # holds this submission: compare and delete, one script).
                await self._let_go(ikey, value)
                raise
            if made is not None:
                return made
            # This submission stalled past IDEMPOTENCY_WAIT and another took the key over: the
            # job is the one that submission makes; wait for it as any copy does.
        raise JobsUnavailable()

    async def _let_go(self, ikey: str, value: str) -> None:
        """Free ``ikey`` if it still holds ``value`` (this submission's claim) and the job that
        value names was not recorded; best effort."""
        record = self.store.key("job", value.partition(" ")[0])
        with contextlib.suppress(RedisError, OSError):
            await asyncio.shield(self._release_key(keys=[ikey, record], args=[value]))

    async def _claim_idempotency_key(self, ikey: str, value: str, fingerprint: str) -> dict[str, Any] | None:
        """Hold ``ikey`` for this submission (None: go and make the job), or the job another
        submission with the same key made (rendered). Waits while another submission holds the
        key and has not recorded its job yet: it may be refused and let go (then one of the
        waiters holds it next), or record its job (then every waiter returns it). A holder that
        recorded nothing for ``IDEMPOTENCY_WAIT`` s (its replica died) is replaced, by exactly
        one waiter (compare and set). Raises ``IdempotencyKeyReused`` (422) for another
        request, ``JobsUnavailable`` (503) after ``IDEMPOTENCY_GIVE_UP`` s without an outcome."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + IDEMPOTENCY_GIVE_UP
        expected, watched, since = "", "", loop.time()
        while True:
            held_record = self.store.key("job", expected.partition(" ")[0]) if expected else ikey
            swapped = await self._swap_key(
                keys=[ikey, held_record], args=[expected, value, self._idempotency_ttl]
            )
            if swapped == 1:
                return None
            raw_held = await self.r.get(ikey)
            if raw_held is None:
                expected = ""  # let go meanwhile: claim it
                continue
            held = raw_held.decode()
            prior, _, used_for = held.partition(" ")
            if used_for != fingerprint:
                raise IdempotencyKeyReused()
            got = await self.store.load("job", prior)
            if got is not None:
                return self._render_job(*got)
            now = loop.time()
            if held != watched:
                watched, since = held, now
            if now > give_up:
                raise JobsUnavailable()
            if now - since > IDEMPOTENCY_WAIT:
                expected = held  # its holder is gone: take over from exactly it
                continue
            expected = ""
            await asyncio.sleep(0.02)

    async def _submit_job(
        self,
        principal: Principal,
        owner: str,
        jid: str,
        endpoint: str,
        raw: bytes,
        model: str,
        task_type: str | None,
        guard: tuple[str, str] | None = None,
    ) -> tuple[dict[str, Any], bool] | None:
        """Record and enqueue a job; None (nothing made) when ``guard``, the Idempotency-Key
        this submission held, was taken over meanwhile."""
        now = int(time.time())
        parsed = orjson.loads(raw)
        served = self._served(parsed if isinstance(parsed, dict) else {"model": model}, task_type)
        doc = {
            "id": jid,
            "endpoint": endpoint,
            "model": model,
            "created_at": now,
            "expires_at": now + JOB_WINDOW,
            "owner": owner,
            "principal": principal_doc(principal),
            "task_type": task_type,
        }
        keys = self.queue.append_keys(served, share_of(principal.team, owner))
        entry = {"kind": "job", "job": jid, "cid": jid, "line": 0, "body": raw, "t": time.time()}
        # One script: the key's check, the lease, the record and the queue entry, all or none.
        made = await self.store.submit_job(
            jid, doc, now + JOB_WINDOW + LEASE_SLACK, self.s.max_active_jobs, guard, keys, served, entry
        )
        if made == 0:
            return None
        if made < 0:
            raise _too_many("job", self.s.max_active_jobs)
        self.wake()
        return self._render_job(doc, {"status": b"queued"}), True

    async def job(self, owner: str, jid: str) -> dict[str, Any]:
        got = await self.store.load("job", jid)
        if got is None or got[0].get("owner") != owner:
            raise NotFound(f"No such job: {jid}.", param="job_id")
        return self._render_job(*got)

    async def cancel_job(self, owner: str, jid: str) -> dict[str, Any]:
        """Cancel a job that has not started: queued, or taken but waiting between attempts (a
        limit's Retry-After, a full queue, a retry's backoff); its worker lets it go within
        ``_LOOK_EVERY``. A job already cancelled is answered as it is; one whose request is
        running at a backend now, or that ended, is 400 ``invalid_state`` and left as it is."""
        got = await self.store.load("job", jid)
        if got is None or got[0].get("owner") != owner:
            raise NotFound(f"No such job: {jid}.", param="job_id")
        moved, status = await self.store.cancel_job(jid)
        self._status_cache.pop(jid, None)
        if moved:
            # Out of the queue now, not when a worker next takes it: until then it would count
            # as waiting (gateway_jobs_pending, the lag autoscalers read).
            kept = field_str(got[1], "entry")
            if kept:
                model, stream, eid = self.queue.entry_at(kept)
                await self.queue.remove(model, stream, [eid])
        if status is None:
            raise NotFound(f"No such job: {jid}.", param="job_id")
        if status != "cancelled":
            why = (
                ": its request is running now, and its answer will be its response."
                if status == "in_progress"
                else "."
            )
            raise InvalidRequest(f"A job that is {status} cannot be cancelled{why}", code="invalid_state")
        self.wake()
        return await self.job(owner, jid)

    def _render_job(self, doc: dict[str, Any], f: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": doc["id"],
            "object": "job",
            "endpoint": doc["endpoint"],
            "model": doc["model"],
            "status": field_str(f, "status"),
            "created_at": doc["created_at"],
            "started_at": field_int(f, "in_progress_at"),
            "completed_at": field_int(f, "completed_at"),
            "failed_at": field_int(f, "failed_at"),
            "cancelled_at": field_int(f, "cancelled_at"),
            "expires_at": doc["expires_at"],
            "response": field_json(f, "result"),
            "error": field_json(f, "error"),
        }

    # ------------------------------------------------------------------ workers
    async def _worker(self, n: int) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                entry, how = await self._next_entry()
                backoff = 0.1
            except (RedisError, OSError) as exc:
                self.log.warning("job queue unavailable", cause=type(exc).__name__)
                await self._idle(backoff)
                backoff = min(5.0, backoff * 2)
                continue
            if entry is None:
                await self._idle(0.25)
                continue
            self.metrics.deliveries.labels(how).inc()
            try:
                await self._run(entry, how == "reclaimed")
            except (RedisError, OSError) as exc:
                # The line stays pending: reclaimed after the visibility timeout.
                self.log.warning("job line interrupted by the queue", cause=type(exc).__name__)
                await self._idle(backoff)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("job worker error")
                await self._idle(1.0)

    async def _idle(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _next_entry(self) -> tuple[Entry | None, str]:
        now = time.monotonic()
        if now - self._models_at > 1.0:
            self._models = await self.queue.models()
            self._models_at = now
        adm = self.gw.admission
        for model in self._models:
            if self._stopping.is_set() or self.gw.drain.draining:
                return None, ""
            pool = self.gw.pool
            if not adm.has_room(model) and not (pool.any_ready and not pool.known_model(model)):
                # (A model no backend serves while the pool is up is taken anyway: the line is
                # answered 404 at once, as a synchronous request is, without using a backend.)
                continue
            # Lines of vanished workers: looked for at most once a second per model and replica.
            if now - self._reclaimed_at.get(model, 0.0) > 1.0:
                self._reclaimed_at[model] = now
                entry = await self.queue.reclaim(model, self.consumer, self.s.visibility_timeout)
                if entry is not None:
                    self._reclaimed_at[model] = 0.0  # there may be more
                    return entry, "reclaimed"
            entry = await self.queue.take(model, self.consumer)
            if entry is not None:
                return entry, "first"
        return None, ""

    async def _status(self, kind: str, rid: str) -> str | None:
        now = time.monotonic()
        hit = self._status_cache.get(rid)
        if hit is not None and now - hit[0] < 1.0:
            return hit[1]
        status = await self.store.status(kind, rid)
        if len(self._status_cache) > 10_000:
            self._status_cache.clear()
        self._status_cache[rid] = (now, status)
        return status

    async def _run(self, entry: Entry, redelivered: bool = False) -> None:
        kind, rid, cid = entry.kind, entry.job, entry.cid
        status = await self._status(kind, rid)
        # A batch's lines are enqueued (in chunks) only once its whole input has validated, so
        # a line met while the batch is still `validating` is runnable: its batch is valid.
        runnable: tuple[str, ...] = (
            ("validating", "in_progress") if kind == "batch" else ("queued", "in_progress")
        )
        if status not in runnable:
            await self.queue.ack(entry)  # gone, cancelled, expired or finished: not run
            return
        if kind == "batch" and redelivered and await self.store.has_result(rid, cid):
            await self.queue.ack(entry)  # delivered again after its result was written
            await self._maybe_finalize(rid)
            return
        doc = self._docs.get(rid)
        if doc is None:
            got = await self.store.load(kind, rid)
            if got is None:
                await self.queue.ack(entry)
                return
            doc = got[0]
            if len(self._docs) > 10_000:
                self._docs.clear()
            self._docs[rid] = doc  # what never changes of a batch or job
        if kind == "job":
            await self.store.transition(
                "job", rid, ("queued",), "in_progress", in_progress_at=int(time.time())
            )
            runnable = ("in_progress",)  # cancelled since it was looked at: start_line says no
        endpoint = self.endpoints[doc["endpoint"]]
        principal = principal_from(doc["principal"])
        if principal.via == "api_key":
            # Checked again as it runs: the key may have been revoked or its allowance changed.
            now_p = self.gw.auth.api_keys.current(principal.subject, principal.team)
            if now_p is None:
                await self._finish_refused(entry, kind, rid)
                return
            principal = now_p
        if self.s.tier is not None:  # job lines are charged under the jobs tier
            principal = dataclasses.replace(principal, tier=self.s.tier)
        delivery = await self.store.start_line(kind, rid, cid, runnable)
        if delivery == 0:
            await self.queue.ack(entry)  # cancelled (or ended) since its status was looked at
            self._status_cache.pop(rid, None)
            return
        done = asyncio.Event()
        renew = asyncio.create_task(self._renew(entry, kind, rid, cid, done))
        try:
            outcome = await self._attempts(entry, kind, rid, doc, endpoint, principal, delivery)
        finally:
            # Told to stop, not cancelled: a Redis call cancelled in flight may swallow the
            # cancel (the renewal then ran on, and this worker waited for it, forever).
            done.set()
            with contextlib.suppress(BaseException):
                await renew
        if outcome is None:
            with contextlib.suppress(RedisError, OSError):
                await self.store.running(kind, rid, cid, False)
            return  # left pending (shutting down): another replica takes it
        if outcome is _DROPPED:
            # Cancelled (or ended) while it waited: no result, and it never runs again.
            await self.store.running(kind, rid, cid, False)
            await self.queue.ack(entry)
            self._status_cache.pop(rid, None)
            return
        ok, line_json, outcome_label = outcome
        if kind == "batch":
            await self.store.finish_line(rid, cid, line_json, ok)
        else:
            await self.store.running(kind, rid, cid, False)
            result = orjson.loads(line_json)
            if outcome_label in ("dead_lettered", "expired"):
                await self.store.transition(
                    "job",
                    rid,
                    ("queued", "in_progress"),
                    "failed",
                    failed_at=int(time.time()),
                    error=result["error"],
                )
            else:
                await self.store.transition(
                    "job",
                    rid,
                    ("queued", "in_progress"),
                    "completed",
                    completed_at=int(time.time()),
                    result=result["response"],
                )
        self.metrics.lines.labels(outcome_label).inc()
        if outcome_label == "dead_lettered":
            await self.queue.dead_letter(entry, result_reason(line_json))
        await self.queue.ack(entry)
        if kind == "batch":
            await self._maybe_finalize(rid)

    async def _finish_refused(self, entry: Entry, kind: str, rid: str) -> None:
        """The submitter's API key is gone: the line is answered 401, as a request would be."""
        line_id = f"batch_req_{secrets.token_hex(12)}"
        err = {
            "error": {
                "message": "The API key that submitted this job is no longer valid.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
        response = {"status_code": 401, "request_id": line_id, "body": err}
        if kind == "batch":
            await self.store.put_result(rid, entry.cid, _line(line_id, entry.cid, response, None), False)
        else:
            await self.store.transition(
                "job",
                rid,
                ("queued", "in_progress"),
                "completed",
                completed_at=int(time.time()),
                result=response,
            )
        self.metrics.lines.labels("failed").inc()
        await self.queue.ack(entry)
        if kind == "batch":
            await self._maybe_finalize(rid)

    async def _renew(self, entry: Entry, kind: str, rid: str, cid: str, done: asyncio.Event) -> None:
        """Renew a line every third of ``visibility_timeout`` until ``done`` is set."""
        period = max(0.2, self.s.visibility_timeout / 3)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period):
                    await done.wait()
            if done.is_set():
                return
            with contextlib.suppress(RedisError, OSError):
                await self.queue.touch(entry, self.consumer)
                await self.store.running(kind, rid, cid, True)

    async def _attempts(
        self,
        entry: Entry,
        kind: str,
        rid: str,
        doc: dict[str, Any],
        endpoint: ProxyEndpoint,
        principal: Principal,
        delivery: int,
    ) -> tuple[bool, bytes, str] | None:
        """Run the line until it has an answer to keep: (ok, result line, outcome) or None.

        ``delivery``: how many times the line was delivered, this time included."""
        line_id = f"batch_req_{secrets.token_hex(12)}"
        last: tuple[int, Any, str | None] = (0, None, None)
        wait = 0.5
        runnable = ("validating", "in_progress") if kind == "batch" else ("in_progress",)
        while True:
            if delivery > self.s.max_deliveries:
                status, body, reason = last
                message = f"The request was delivered {self.s.max_deliveries} times without an answer"
                message += f" (last: {reason}, status {status})." if reason else "."
                return (
                    False,
                    _line(line_id, entry.cid, None, {"code": "max_deliveries", "message": message}),
                    "dead_lettered",
                )
            if self._stopping.is_set():
                return None
            # Read, not the cached look: a cancel answered by another replica stops a retry.
            if (await self.store.status(kind, rid)) not in runnable:
                return _DROPPED  # cancelled, or ended (expired, failed) meanwhile
            if time.time() > doc["expires_at"]:
                if kind == "batch":
                    return None  # its batch's expiry writes its `batch_expired` result
                expired = {"code": "expired", "message": "The job was not run within its window."}
                return False, _line(line_id, entry.cid, None, expired), "expired"
            if kind == "job" and not await self.store.job_attempt(rid, True):
                return _DROPPED  # cancelled since it was looked at: it does not start
            sink = ResultSink()
            # Each run of the line is a request of its own (its own id in the audit log and the
            # ledger); the output line carries the id of the run that answered.
            line_id = f"batch_req_{secrets.token_hex(12)}"
            ex = await endpoint.execute(principal, entry.body, sink, line_id, doc.get("task_type"))
            if self.gw.drain.draining or self._stopping.is_set():
                return None  # cut by this replica's shutdown: left pending for another replica
            body = _body_json(sink.body())
            if 200 <= sink.status < 300:
                return (
                    True,
                    _line(
                        line_id,
                        entry.cid,
                        {"status_code": sink.status, "request_id": line_id, "body": body},
                        None,
                    ),
                    "completed",
                )
            if ex.fault is Fault.CLIENT or (400 <= sink.status < 500 and sink.status not in (408, 429)):
                # The request itself is wrong (or not allowed, or can never fit its token budget):
                # an answer, kept in the error file (a job's response), never tried again.
                response = {"status_code": sink.status, "request_id": line_id, "body": body}
                return False, _line(line_id, entry.cid, response, None), "failed"
            if ex.reason in _WAIT_REASONS:
                # The gateway's own back-pressure: wait as told, and do not count a delivery.
                retry_after = sink.header(b"retry-after")
                pause = float(retry_after) if retry_after and retry_after.isdigit() else wait
                wait = min(30.0, wait * 2)
                await self._wait(kind, rid, runnable, min(pause, 30.0))
                continue
            last = (sink.status, body, ex.reason)
            self.log.info(
                "job line failed; retrying", reason=ex.reason, status=sink.status, delivery=delivery
            )
            await self._wait(kind, rid, runnable, min(30.0, 0.5 * 2 ** (delivery - 1)))
            delivery = await self.store.attempt(kind, rid, entry.cid)
            self.metrics.deliveries.labels("retry").inc()

    async def _wait(self, kind: str, rid: str, runnable: tuple[str, ...], seconds: float) -> None:
        """Wait ``seconds`` between two attempts of a line (a limit's Retry-After, a full queue,
        a retry's backoff) without holding its worker past a cancel: a job is marked waiting
        (``DELETE`` may cancel it now), and the batch's or job's status is read every
        ``_LOOK_EVERY`` s; returns early once it is not ``runnable`` (cancelled, ended) or the
        replica stops."""
        if kind == "job":
            await self.store.job_attempt(rid, False)
        end = time.monotonic() + seconds
        while not self._stopping.is_set() and (left := end - time.monotonic()) > 0:
            await self._idle_until(min(left, _LOOK_EVERY))
            if left > _LOOK_EVERY and (await self.store.status(kind, rid)) not in runnable:
                return

    async def _idle_until(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    # ------------------------------------------------------------------ finishing
    async def _maybe_finalize(self, bid: str, expired: bool = False) -> None:
        total_known = self._totals.get(bid)
        if total_known is not None and not expired:
            done, failed = await self.store.counts(bid)
            if done + failed < total_known:
                return  # the common case: one round trip
        got = await self.store.load("batch", bid)
        if got is None:
            return
        doc, f = got
        status = field_str(f, "status")
        total = field_int(f, "total") or 0
        if status not in ("in_progress", "finalizing"):
            return
        if status == "in_progress" and total:
            if len(self._totals) > 10_000:
                self._totals.clear()
            self._totals[bid] = total  # fixed once in progress
        done, failed = await self.store.counts(bid)
        if not expired and done + failed < total:
            return
        if expired and done + failed >= total:
            expired = False  # every line has its result: completed, even if late
        lock = f"{self.s.key_prefix}batch:{bid}:finalize"
        if not await self.r.set(lock, self.consumer, nx=True, ex=_FINALIZE_LOCK_SECONDS):
            return
        try:
            await self.store.transition(
                "batch", bid, ("in_progress",), "finalizing", finalizing_at=int(time.time())
            )
            await self._finalize(doc, expired)
        finally:
            await self.r.delete(lock)

    async def _finalize(self, doc: dict[str, Any], expired: bool) -> None:
        bid = doc["id"]
        if expired:
            # Lines never run are reported as expired (OpenAI: "batch_expired"), in the input's order.
            try:
                async for _n, cid, _body in iter_batch_requests(self.files, doc["input_file_id"]):
                    if not await self.store.has_result(bid, cid):
                        await self.store.put_result(
                            bid,
                            cid,
                            _line(
                                f"batch_req_{secrets.token_hex(12)}",
                                cid,
                                None,
                                {
                                    "code": "batch_expired",
                                    "message": "This request was not executed before the completion window "
                                    "expired.",
                                },
                            ),
                            False,
                        )
                        self.metrics.lines.labels("expired").inc()
            except FileNotFoundError:
                # The input file was deleted: its unrun lines cannot be listed, the batch still ends.
                self.log.warning("expired batch's input file is gone; unrun lines not listed", batch=bid)
        # The output file is written after the expired lines are marked: a line ending in between
        # is either in it or refused (it already has its `batch_expired` result), never lost.
        now = int(time.time())
        final = "expired" if expired else "completed"
        done, failed = await self._end_batch(
            doc, "finalizing", final, **({"expired_at": now} if expired else {"completed_at": now})
        )
        self.log.info("batch finished", batch=bid, status=final, completed=done, failed=failed)

    async def _end_batch(self, doc: dict[str, Any], frm: str, to: str, **stamp: int) -> tuple[int, int]:
        """Write a batch's output and error files (streamed from its results), move it from
        ``frm`` to ``to`` with the counts and ``stamp``, and, unless it completed, take its unrun
        lines out of the queue. Returns (completed, failed)."""
        bid, owner = doc["id"], doc["owner"]
        ids: dict[str, str] = {}
        for field, key, name in (
            ("output_file_id", self.store.out_key(bid), f"{bid}_output.jsonl"),
            ("error_file_id", self.store.err_key(bid), f"{bid}_error.jsonl"),
        ):
            ids[field] = ""
            if await self.r.hlen(key):
                ids[field] = (await self.files.create_output(owner, name, "batch_output", self._lines(key)))[
                    "id"
                ]
        done, failed = await self.store.counts(bid)
        if to != "completed":
            # Before the status says it ended: whoever sees it ended sees its lines gone too (a
            # replica dying here leaves it `frm`, and whoever ends it next purges again).
            await self._purge_queue(bid)
        await self.store.transition(
            "batch", bid, (frm,), to, completed_count=done, failed_count=failed, **ids, **stamp
        )
        return done, failed

    async def _purge_queue(self, bid: str) -> None:
        """Take a finished batch's lines still queued out of the queue: they will never run, and
        would otherwise count as pending work (what the autoscalers scale on)."""
        key = self.store.entries_key(bid)
        start = 0
        while True:
            chunk = await self.r.lrange(key, start, start + 999)
            if not chunk:
                return
            by_stream: dict[tuple[str, str], list[str]] = {}
            for raw in chunk:
                model, stream, eid = self.queue.entry_at(raw.decode() if isinstance(raw, bytes) else raw)
                by_stream.setdefault((model, stream), []).append(eid)
            for (model, stream), ids in by_stream.items():
                await self.queue.remove(model, stream, ids)
            start += len(chunk)

    async def _lines(self, key: str) -> AsyncIterator[bytes]:
        async for _, line in self.store.results(key):
            yield line

    async def _maybe_end_cancel(self, bid: str) -> None:
        if await self.store.status("batch", bid) != "cancelling":
            return
        got = await self.store.load("batch", bid)
        # Replicas see a cancel within their status cache's second: lines they were starting then
        # are counted running by now.
        if got is None or time.time() - (field_int(got[1], "cancelling_at") or 0) < 3:
            return
        since = time.time() - self.s.visibility_timeout
        if await self.store.running_count("batch", bid, since):
            return
        lock = f"{self.s.key_prefix}batch:{bid}:finalize"
        if not await self.r.set(lock, self.consumer, nx=True, ex=_FINALIZE_LOCK_SECONDS):
            return
        try:
            await self._end_batch(got[0], "cancelling", "cancelled", cancelled_at=int(time.time()))
        finally:
            await self.r.delete(lock)

    async def _sweeper(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._sweep()
            except (RedisError, OSError) as exc:
                self.log.warning("job sweeper: queue unavailable", cause=type(exc).__name__)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("job sweeper error")
            await self._idle_until(1.0)

    async def _sweep(self) -> None:
        now = time.time()
        counts: dict[str, int] = {}
        for bid in await self.store.active("batch"):
            got = await self.store.load("batch", bid)
            if got is None:
                await self.r.srem(self.store.active_key("batch"), bid)
                continue
            doc, f = got
            status = field_str(f, "status") or "-"
            counts[status] = counts.get(status, 0) + 1
            if status == "validating":
                lock = field_int(f, "validation_lock") or 0
                stale = now - lock > self.s.visibility_timeout  # refreshed every third of it
                if stale and await self.r.set(
                    f"{self.s.key_prefix}batch:{bid}:revalidate", 1, nx=True, ex=60
                ):
                    await self.store.set_fields("batch", bid, validation_lock=int(now))
                    self._spawn(self._validate(bid))
                # A validation still running at the window's end completes, and the batch then
                # expires with every line in the error file; only one that cannot complete (its
                # file unreadable) ends here, well after the window.
                if now > doc["expires_at"] + _VALIDATION_GRACE:
                    await self.store.transition("batch", bid, ("validating",), "expired", expired_at=int(now))
            elif status in ("in_progress", "finalizing"):
                if now > doc["expires_at"]:
                    # Also a finalize of an expiring batch left half done (its replica died).
                    self._status_cache.pop(bid, None)
                    await self._maybe_finalize(bid, expired=True)
                else:
                    await self._maybe_finalize(bid)
            elif status == "cancelling":
                await self._maybe_end_cancel(bid)
        self.metrics.snapshot.batches = counts
        for jid in await self.store.active("job"):
            got = await self.store.load("job", jid)
            if got is None:
                await self.r.srem(self.store.active_key("job"), jid)
                continue
            doc, f = got
            if field_str(f, "status") in ("queued", "in_progress") and now > doc["expires_at"]:
                await self.store.transition(
                    "job",
                    jid,
                    ("queued", "in_progress"),
                    "failed",
                    failed_at=int(now),
                    error={"code": "expired", "message": "The job was not run within its window."},
                )
        snap = self.metrics.snapshot
        pending: dict[str, int] = {}
        running: dict[str, int] = {}
        oldest: dict[str, float] = {}
        for model in await self.queue.models():
            waiting, held, first = await self.queue.depth(model)
            pending[model], running[model] = waiting, held
            oldest[model] = max(0.0, now - first) if first is not None and waiting else 0.0
        snap.pending, snap.running, snap.oldest = pending, running, oldest


def _redacted(url: str) -> str:
    """A Redis URL without its password."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, _, _cred = head.partition("://")
    return f"{scheme}://***@{tail}"


def _line(line_id: str, cid: str, response: dict[str, Any] | None, error: dict[str, Any] | None) -> bytes:
    return orjson.dumps({"id": line_id, "custom_id": cid, "response": response, "error": error})


def _body_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")


def result_reason(line: bytes) -> str:
    err = orjson.loads(line).get("error") or {}
    return str(err.get("message", ""))[:200]


__all__ = ["BATCH_ENDPOINTS", "GatewayError", "Jobs", "parse_window"]
