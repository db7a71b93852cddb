"""The cache stage: between route plan and limit, answer from the cache or arrange to fill it.

    lookup → (hit) limit as a request → serve the entry → account
           → (miss) the rest of the pipeline, the relay tapping the answer → fill after the response

A lookup never fails a request: Redis down, slow or saturated makes it a bypass within
``cache.timeout``, and after a failure the cache is skipped for ``cache.retry_interval``
(so an outage costs one timeout per interval, not one per request). Fills are written after
the client has its answer, in a task of their own. Identical concurrent misses make one upstream
call: the first takes a lock in Redis (the single-flight lock, any replica), the others wait
for its notice (``cache.single_flight_wait`` at most) and are served the entry; when the fill
fails they go upstream themselves.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import structlog

from gateway.asgi import Scope, Send
from gateway.auth.principal import Principal
from gateway.cache.config import CacheSettings
from gateway.cache.entry import PLAIN, STREAM, Entry, plain_from_stream, stream_from_plain
from gateway.cache.key import CacheKey, deterministic, make_key, segment
from gateway.cache.metrics import CacheMetrics
from gateway.cache.resp import RespError
from gateway.cache.store import CacheStore
from gateway.errors import Fault, GatewayError
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.receive import ParsedRequest
from gateway.pipeline.relay import FINISHED, gateway_headers, take_usage

if TYPE_CHECKING:
    from gateway.backends import BackendPool

HIT: Final = "hit"
MISS: Final = "miss"
BYPASS: Final = "bypass"
FINISHED_OK: Final = frozenset(r.encode() for r in FINISHED)
_FINISH_MARKS: Final = (b'"finish_reason":"', b'"finish_reason": "')  # a terminal chunk (null has no quote)
_NO_STORE = re.compile(r"(?<![a-z-])no-store(?![a-z-])")
_NO_CACHE = re.compile(r"(?<![a-z-])no-cache(?![a-z-])")
_ONLY_IF_CACHED = re.compile(r"(?<![a-z-])only-if-cached(?![a-z-])")
_MAX_AGE = re.compile(r"(?<![a-z-])max-age\s*=\s*\"?(\d{1,10})\"?(?![\d.])")
LOCK_LEASE_MS: Final = 5000  # the single-flight lock's expiry, renewed by its holder (lease)
LOCK_RENEW: Final = 2.0  # seconds between renewals
WAIT_POLL: Final = 1.0  # seconds between a waiter's looks at the lock and the entry


def _priority_of(holder: bytes) -> int:
    """The admission priority in a lock's value (``<process>:<n>:<priority>``)."""
    try:
        return int(holder.rsplit(b":", 1)[1])
    except (IndexError, ValueError):
        return 1 << 30


def complete_stream(body: bytes) -> bool:
    """Whether a stream's events (as vLLM sent them) end every choice they finish with a reason
    of a complete answer, and finish at least one. ``bytes.find`` rather than a regex: 4 µs
    instead of 43 for 256 events (46 KB)."""
    seen = False
    for mark in _FINISH_MARKS:
        i = body.find(mark)
        while i >= 0:
            start = i + len(mark)
            end = body.find(b'"', start)
            if end < 0 or body[start:end] not in FINISHED_OK:
                return False
            seen = True
            i = body.find(mark, end)
    return seen


class CacheOnlyMiss(GatewayError):
    """504: ``Cache-Control: only-if-cached`` and nothing stored (RFC 9111 5.2.1.7). OpenAI's type
    for a 5xx is ``server_error``; the code says why, and the client asked for it (no one's fault
    but the request's: nothing counts against a backend)."""

    status = 504
    type = "server_error"
    code = "cache_miss"
    reason = "cache_miss"
    fault = Fault.CLIENT


@dataclass(frozen=True, slots=True)
class Policy:
    when: str
    ttl_ms: int
    max_bytes: int


@dataclass(slots=True)
class CacheControl:
    no_cache: bool = False
    no_store: bool = False
    only_if_cached: bool = False
    max_age: float | None = None


def parse_cache_control(scope: Scope) -> CacheControl | None:
    """The request's Cache-Control directives (RFC 9111 5.2.1) from every ``Cache-Control`` line
    (RFC 9110 5.3: several lines are one comma-separated list). Unknown directives are ignored, a
    ``max-age`` that is not a non-negative integer too (RFC 9111 1.2.2); ``no-store`` and
    ``no-cache`` are honoured wherever they appear, even with junk around them (``no-store;``)."""
    values = [v for k, v in scope["headers"] if k == b"cache-control"]
    if not values:
        return None
    cc = CacheControl()
    text = b",".join(values).decode("latin-1").lower()
    cc.no_store = _NO_STORE.search(text) is not None
    cc.no_cache = _NO_CACHE.search(text) is not None
    cc.only_if_cached = _ONLY_IF_CACHED.search(text) is not None
    for m in _MAX_AGE.finditer(text):
        age = float(m.group(1))
        cc.max_age = age if cc.max_age is None else min(cc.max_age, age)
    return cc


class Lookup:
    """What the cache stage decided for one request (kept on ``Exchange.cache_look``)."""

    __slots__ = (
        "body",
        "deadline",
        "entry",
        "filler",
        "key",
        "only_if_cached",
        "policy",
        "reason",
        "renewal",
        "status",
        "store",
        "token",
        "waited",
    )

    def __init__(self, status: str, reason: str | None = None) -> None:
        self.status = status  # hit, miss or bypass: the x-gateway-cache header
        self.reason = reason  # why a bypass (the metric's label)
        self.key: CacheKey | None = None
        self.policy: Policy | None = None
        self.entry: Entry | None = None  # a hit's entry
        self.body: bytes | None = None  # a hit's response body, in the form the client asked for
        self.store = False  # store the answer if it is complete and successful
        self.filler = False  # this request holds the single-flight lock
        self.token = ""  # ... under this value (released only by its holder)
        self.waited = False  # served after waiting for another request's fill
        self.only_if_cached = False  # Cache-Control: only-if-cached (a miss is answered 504)
        self.renewal: asyncio.TimerHandle | None = None  # the filler's lock lease renewal
        self.deadline = 0.0  # the request's total deadline (loop time): no renewal after it


class ResponseCache:
    """The cache stage, owned by the app's lifespan (``start``/``close``)."""

    def __init__(self, settings: CacheSettings, pool: BackendPool, metrics: CacheMetrics) -> None:
        self.s = settings
        self.pool = pool
        self.metrics = metrics
        self.store = CacheStore(
            settings.storage, settings.key_prefix, settings.timeout, settings.connections, self._fill_replied
        )
        self._refused_logged = -1e9  # when a refused fill was last logged (monotonic)
        self.store.mark_ms = int(settings.single_flight_wait * 1000) + LOCK_LEASE_MS
        self.charge_tokens = settings.charge_tokens
        self._default = Policy(settings.when, int(settings.ttl * 1000), settings.max_entry_bytes)
        self._routes = {
            name: Policy(
                r.when or settings.when,
                int((r.ttl or settings.ttl) * 1000),
                r.max_entry_bytes or settings.max_entry_bytes,
            )
            for name, r in settings.routes.items()
        }
        self._token = secrets.token_hex(6) + ":"
        self._ids = itertools.count()
        self._down_until = 0.0
        # Fills this process runs: digest → (the entry when stored, the filler's priority).
        self._local: dict[str, tuple[asyncio.Future[Entry | None], int]] = {}
        self._waiters: dict[str, list[asyncio.Future[bool]]] = {}  # waiting on a fill anywhere
        self._tasks: set[asyncio.Task[None]] = set()
        self.log = structlog.get_logger("gateway.cache")

    async def start(self) -> None:
        self.store.listen(self._notice)

    async def close(self) -> None:
        if self._tasks:  # fills of the last answers: a short grace, then dropped (a cache, not a ledger)
            await asyncio.wait(self._tasks, timeout=2.0)
        await self.store.close()

    # -- lookup ---------------------------------------------------------------------------------

    async def lookup(
        self,
        scope: Scope,
        principal: Principal,
        endpoint: str,
        route: str,
        req: ParsedRequest,
        deadline: float,
        priority: int,
    ) -> Lookup:
        """Decide hit, miss or bypass for a request whose body names the served model.

        Never raises; ``only_if_cached`` on the result says a miss must be refused (504, by the
        caller, once the decision is recorded). ``deadline``: the request's total deadline (loop
        time), which bounds a single-flight wait; ``priority``: its admission priority (lower is
        served first), compared with the filler's before waiting on it.
        """
        policy = self._routes.get(route, self._default)
        cc = parse_cache_control(scope)
        look = self._decide(policy, cc, endpoint, req.body)
        if look is None:
            look = await self._lookup(principal, endpoint, req, policy, cc, deadline, priority)
        if cc is not None and cc.only_if_cached and look.status != HIT:
            look.only_if_cached, look.store = True, False
        return look

    def _decide(
        self, policy: Policy, cc: CacheControl | None, endpoint: str, body: dict[str, Any]
    ) -> Lookup | None:
        """A bypass decided without Redis, or None to go on."""
        if policy.when == "never":
            return Lookup(BYPASS, "never")
        if policy.when == "deterministic" and not deterministic(endpoint, body):
            return Lookup(BYPASS, "nondeterministic")
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("continuous_usage_stats"):
            return Lookup(BYPASS, "uncacheable")  # usage on every chunk: not what entries keep
        if cc is not None and cc.no_store:
            return Lookup(BYPASS, "no_store")
        if time.monotonic() < self._down_until:
            return Lookup(BYPASS, "unavailable")
        return None

    async def _lookup(
        self,
        principal: Principal,
        endpoint: str,
        req: ParsedRequest,
        policy: Policy,
        cc: CacheControl | None,
        deadline: float,
        priority: int,
    ) -> Lookup:
        s = self.s
        try:
            key = make_key(
                s.key_prefix, principal, s.scope, endpoint, req.model, self._version(req.model), req.body
            )
        except (TypeError, ValueError):
            return Lookup(BYPASS, "uncacheable")
        look = Lookup(MISS)
        look.key, look.policy, look.store = key, policy, True
        if cc is not None and cc.no_cache:
            return look  # a fresh answer, stored for the next ones
        # The route's TTL bounds the age of what it serves (an entry may come from a longer-lived route).
        max_age = policy.ttl_ms / 1000
        if cc is not None and cc.max_age is not None:
            max_age = min(max_age, cc.max_age)
        only_cached = cc is not None and cc.only_if_cached
        local = self._local.get(key.digest)
        if local is not None and not only_cached:  # this process already asks the backend for it
            fut, held_by = local
            if priority < held_by:
                return look  # the filler waits behind this request in admission: do not wait for it
            return await self._wait_local(look, fut, req, endpoint, deadline)
        # only-if-cached never asks the backend: it must not hold others back with the lock
        single = s.single_flight_wait > 0 and not only_cached
        token = f"{self._token}{next(self._ids)}:{priority}"
        try:
            stream, plain, locked, holder = await self.store.lookup(key, token, LOCK_LEASE_MS, single)
        except Exception as exc:
            return self._failed(exc)
        if self._answer(look, stream, plain, req, endpoint, max_age):
            return look
        if locked:
            look.filler, look.token, look.deadline = True, token, deadline
            self._local[key.digest] = (asyncio.get_running_loop().create_future(), priority)
            look.renewal = asyncio.get_running_loop().call_later(LOCK_RENEW, self._renew, look)
            return look
        if single and stream is None and plain is None and holder is not None:
            if priority < _priority_of(holder) or max_age <= 0:
                # The filler waits behind this request in admission, or nothing it stores could
                # be young enough for this request (max-age=0): do not wait for it.
                return look
            return await self._wait_remote(look, req, endpoint, max_age, deadline)
        return look  # stored entries too old, or not servable in this form

    def _answer(
        self,
        look: Lookup,
        stream: bytes | None,
        plain: bytes | None,
        req: ParsedRequest,
        endpoint: str,
        max_age: float | None,
    ) -> bool:
        """Make ``look`` a hit from the stored entries when one serves this request."""
        now = time.time()
        same, other = (stream, plain) if req.stream else (plain, stream)
        for raw in (same, other):
            if raw is None:
                continue
            entry = Entry.decode(raw)
            if entry is None or (max_age is not None and now - entry.created > max_age):
                continue
            body = self._render(entry, req, endpoint)
            if body is not None:
                look.status, look.entry, look.body, look.store = HIT, entry, body, False
                return True
        return False

    def _render(self, entry: Entry, req: ParsedRequest, endpoint: str) -> bytes | None:
        if req.stream:
            if entry.kind == STREAM:
                return entry.body
            return stream_from_plain(entry.body, endpoint, req.client_wants_usage)
        if entry.kind == PLAIN:
            return entry.body
        if endpoint == "embeddings":
            return None
        return plain_from_stream(entry.body, endpoint)

    async def _wait_local(
        self,
        look: Lookup,
        fut: asyncio.Future[Entry | None],
        req: ParsedRequest,
        endpoint: str,
        deadline: float,
    ) -> Lookup:
        try:
            async with asyncio.timeout(self._wait_bound(deadline)):
                entry = await asyncio.shield(fut)
        except TimeoutError:
            return look
        if entry is not None:
            body = self._render(entry, req, endpoint)
            if body is not None:
                look.status, look.entry, look.body, look.store, look.waited = HIT, entry, body, False, True
        return look

    async def _wait_remote(
        self, look: Lookup, req: ParsedRequest, endpoint: str, max_age: float, deadline: float
    ) -> Lookup:
        """Wait for another request's fill: its notice, or (every ``WAIT_POLL`` s) a look at the
        lock and the entry, so a filler that died, a fill that failed and a Redis that went away
        all end the wait within a second rather than at its bound."""
        key = look.key
        assert key is not None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        waiters = self._waiters.setdefault(key.digest, [])
        waiters.append(fut)
        end = loop.time() + self._wait_bound(deadline)
        try:
            while True:
                # Registered first, then looked: a notice sent before this point is not missed.
                stream, plain, holder = await self.store.peek(key)
                if self._answer(look, stream, plain, req, endpoint, max_age):
                    look.waited = True
                    return look
                left = end - loop.time()
                if holder is None or left <= 0:
                    return look  # the lock is gone without an entry, or waited long enough
                if fut.done():
                    # Notified, and what is stored does not serve this request (too old for its
                    # max-age, or not in a form it can take), or the fill failed: ask the backend.
                    return look
                await asyncio.wait((fut,), timeout=min(WAIT_POLL, left))
        except Exception as exc:
            self._failed(exc)
            return look
        finally:
            waiters.remove(fut)
            if not waiters:
                self._waiters.pop(key.digest, None)

    def _wait_bound(self, deadline: float) -> float:
        """A single-flight wait: ``single_flight_wait``, leaving the request time to go upstream."""
        left = deadline - asyncio.get_running_loop().time()
        return max(0.0, min(self.s.single_flight_wait, left / 2))

    def _renew(self, look: Lookup) -> None:
        """Extend the filler's lock while its request runs (a filler that dies lets go within
        ``LOCK_LEASE_MS``)."""
        if look.key is None or not look.filler:
            return
        if asyncio.get_running_loop().time() > look.deadline:
            return  # the request is over whatever happened to it: the lease runs out by itself
        self._spawn(self._renew_lease(look.key, look.token))
        look.renewal = asyncio.get_running_loop().call_later(LOCK_RENEW, self._renew, look)

    async def _renew_lease(self, key: CacheKey, token: str) -> None:
        try:
            await self.store.renew(key, token, LOCK_LEASE_MS)
        except Exception as exc:
            self._failed(exc)

    def _notice(self, digest: str, stored: bool) -> None:
        for fut in self._waiters.get(digest, ()):
            if not fut.done():
                fut.set_result(stored)

    def _failed(self, exc: BaseException) -> Lookup:
        """Redis failed or was slow: skip the cache for ``retry_interval`` seconds.

        An error reply (``OOM`` when a Redis without eviction is full, say) fails only that call:
        Redis answers, and lookups may still hit.
        """
        self.metrics.errors.inc()
        if isinstance(exc, RespError):
            self.log.warning("cache call refused by Redis", cause=str(exc)[:200])
            return Lookup(BYPASS, "unavailable")
        self._down_until = time.monotonic() + self.s.retry_interval
        self.log.warning(
            "cache unavailable, bypassing", cause=type(exc).__name__, retry_in=self.s.retry_interval
        )
        return Lookup(BYPASS, "unavailable")

    def _version(self, model: str) -> str:
        v = self.s.model_versions.get(model)
        if v is not None:
            return v
        roots = {str(card.get("root")) for b in self.pool.backends if (card := b.models.get(model))}
        return "|".join(sorted(roots))

    # -- serve ----------------------------------------------------------------------------------

    async def serve(self, look: Lookup, req: ParsedRequest, send: Send, ex: Exchange) -> None:
        """Answer a hit: the entry in the form the client asked for, with ``Age``."""
        entry, body = look.entry, look.body
        assert entry is not None and body is not None
        ex.backend = "cache"
        ex.prompt_tokens, ex.completion_tokens = entry.prompt_tokens, entry.completion_tokens
        age = str(max(0, int(time.time() - entry.created))).encode()
        if req.stream:
            if entry.kind == STREAM and not req.client_wants_usage:
                body = take_usage(body, ex, True)
            content_type = b"text/event-stream; charset=utf-8"
            extra = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        else:
            content_type = b"application/json"
            extra = []
        ex.status = 200
        ex.response_started = ex.completing = True
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", ex.request_id.encode()),
                    *gateway_headers(ex),
                    (b"age", age),
                    *ex.reservation.headers,
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    # -- fill and account -----------------------------------------------------------------------

    def finish(self, ex: Exchange, known_model: bool) -> None:
        """After the request: metrics, and the fill (or the lock's release) in a task of its own."""
        look = ex.cache_look
        assert isinstance(look, Lookup)
        self.metrics.record(ex, look, known_model)
        if not look.store or look.key is None or look.policy is None:
            return
        if look.renewal is not None:
            look.renewal.cancel()
        entry = self._storable(ex)
        local = self._local.pop(look.key.digest, None) if look.filler else None
        fut = local[0] if local is not None else None
        if fut is not None and not fut.done():
            fut.set_result(entry)
        if entry is not None:
            ttl_ms = look.policy.ttl_ms
            if not self.store.fill_nowait(look.key, entry.kind, entry.encode(), ttl_ms, look.token):
                self._spawn(self._fill(look.key, entry, ttl_ms, look.token))  # counted when written
        elif look.filler:
            self._spawn(self._release(look.key, look.token))

    def _storable(self, ex: Exchange) -> Entry | None:
        """The entry to keep: a complete, successful answer from a local replica, within size."""
        tap = ex.cache_tap
        if (
            tap is None
            or ex.status != 200
            or ex.reason is not None
            or ex.fallback is not None
            or ex.disconnected
            or not ex.cache_complete
            or ex.usage_estimated
        ):
            return None
        body = b"".join(tap)
        if ex.stream and not complete_stream(body):
            return None
        return Entry(
            STREAM if ex.stream else PLAIN,
            time.time(),
            ex.prompt_tokens or 0,
            ex.completion_tokens or 0,
            body,
        )

    def _fill_replied(self, reply: Any) -> None:
        """Redis' reply to a fill written without waiting (read in a later batch): counted as a
        fill, or as an error when refused (``OOM`` from a full Redis without eviction) or lost with
        its connection (the exception): the entry is not stored and the lock's lease runs out by
        itself. Logged at most once a minute."""
        if not isinstance(reply, Exception):  # hiredis.ReplyError is one
            self.metrics.fills.inc()
            return
        self.metrics.errors.inc()
        now = time.monotonic()
        if now - self._refused_logged >= 60.0:
            self._refused_logged = now
            self.log.warning("cache fill refused by Redis", cause=str(reply)[:200])

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fill(self, key: CacheKey, entry: Entry, ttl_ms: int, token: str) -> None:
        try:
            await self.store.fill(key, entry.kind, entry.encode(), ttl_ms, token)
            self.metrics.fills.inc()
        except Exception as exc:
            self._failed(exc)
            if token:  # let the waiters go (if Redis still answers; else their polls see it)
                await self._release(key, token)

    async def _release(self, key: CacheKey, token: str) -> None:
        try:
            await self.store.release(key, token)
        except Exception as exc:
            self._failed(exc)

    async def purge(self, team: str | None, model: str | None) -> int:
        """Delete the entries of ``team`` (team and principal scopes) and/or ``model``; all when
        both are None. Returns how many. Raises redis-py's errors (the admin is told)."""
        return await self.store.purge(
            None if team is None else segment(team), None if model is None else segment(model)
        )
