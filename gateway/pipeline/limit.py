"""Stage 3, limit: requests and tokens per minute and requests in flight, per principal and team.

Counters (gateway/pipeline/counters.py) live in memory (``memory://``, one
process) or in Redis (``redis://``, shared by every worker and replica).
Requests and tokens per minute are fixed windows that start at their first
hit; requests in flight are per-request leases that expire on their own
(``timeouts.total`` + ``LEASE_GRACE``), so a lost release, a window ending or
a replayed correction never leaves the count off, and never below zero. A Redis
restart without persistence forgets the leases of requests still running: for
up to ``timeouts.total`` more may run than the limit (use AOF or a replica where
that matters). A request's counters are taken in
one atomic step (one Lua script on Redis), so two replicas racing for the last
slot get different counts and only one passes, and a refused request leaves no
trace in any counter.

Token budgets are reserved before the call and reconciled after it:

* reserved = prompt estimate + n x (the completion cap the endpoint honours,
  or ``completion_estimate``), where the prompt estimate is request-body bytes
  / ``bytes_per_token``. Only validated values feed it (receive.py): body bytes
  over-count prompt tokens (JSON syntax, roles), so the reservation errs on the
  safe side and costs nothing to compute;
* after the response the counters are corrected to what was charged
  (proxy.py ``_tokens_used``): vLLM's usage when it arrived; nothing when the
  request never reached a backend or the backend refused it (4xx); else the
  reservation stands (the backend may have done the work). No counter goes
  below zero or above ``CAP``.

A storage failure (Redis down or slow) never becomes a 500 or a hang: every
call has a timeout, and ``on_storage_error`` decides between serving (open)
and 503 (closed).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from gateway.auth.principal import Principal
from gateway.config import Settings
from gateway.config_auth import LimitValues
from gateway.errors import Fault, GatewayError
from gateway.pipeline.counters import CAP, Counters, clamp, counters_from_url

WINDOW = 60.0  # seconds: limits are per minute
# Seconds a lease on a slot in flight outlives the request's own deadline (timeouts.total): time
# to settle after the deadline fired. Past it the slot frees itself (a crashed replica, a lost
# release).
LEASE_GRACE = 5.0


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    reason = "rate_limited"
    limit_headers: list[tuple[bytes, bytes]] = []
    limit: tuple[str, str] = ("requests", "principal")  # (kind, scope) for the metric

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [*super().headers(), *self.limit_headers]


class TokensExceedLimit(RateLimited):
    """429: the request's token reservation is more than a whole budget per minute, so no wait
    can let it through. OpenAI's shape for it ("Request too large ... (TPM)": a 429
    ``rate_limit_error``) with a code of its own, no ``Retry-After``, and ``x-should-retry:
    false`` so that the OpenAI SDKs do not send it again. The request's own fault: a job line
    refused so is answered with it, not retried (gateway/jobs/service.py)."""

    code = "tokens_exceed_limit"
    fault = Fault.CLIENT

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [*super().headers(), (b"x-should-retry", b"false")]


class LimitStorageDown(GatewayError):
    status = 503
    type = "server_error"
    code = "rate_limit_storage_unavailable"
    reason = "limit_storage"


@dataclass(slots=True)
class _Counter:
    kind: str  # "requests" | "tokens" | "concurrent"
    scope: str  # "principal" | "team"
    key: str
    limit: int
    cost: int
    count: int = 0
    deadline: float = 0.0  # monotonic end of the window (tokens: for reconciliation)


@dataclass(slots=True)
class Reservation:
    """What one admitted request holds: token reservations, an in-flight lease, its headers."""

    tokens: list[_Counter] = field(default_factory=list)
    concurrent: _Counter | None = None
    lease: int = 0  # this request's lease id in ``concurrent``'s lease set
    reserved_tokens: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


NO_LIMITS = Reservation()


_HEADER_NAMES = {
    kind: tuple(f"x-ratelimit-{what}-{kind}".encode() for what in ("limit", "remaining", "reset"))
    for kind in ("requests", "tokens")
}


def _limit_headers(kind: str, limit: int, remaining: int, reset: float) -> list[tuple[bytes, bytes]]:
    limit_name, remaining_name, reset_name = _HEADER_NAMES[kind]
    return [
        (limit_name, str(limit).encode()),
        (remaining_name, str(remaining).encode()),
        (reset_name, reset_text(reset).encode()),
    ]


def reset_text(seconds: float, window: float = WINDOW) -> str:
    """OpenAI's reset format (`250ms`, `1s`, `6m0s`) for a wait of ``seconds``.

    Never longer than ``window`` (a window's time left computed as end - now can exceed it by
    float rounding) and never negative; whole seconds are rounded up, so a client that waits
    that long finds the window over.
    """
    if seconds > window:
        seconds = window
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    s = math.ceil(seconds)
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


class RateLimiter:
    """The limit stage: admits a request against its principal's and team's limits.

    ``admit`` takes every counter of a request in one storage call and returns a
    ``Reservation``; ``settle`` (one call) corrects the token windows to what was charged and
    releases the in-flight lease. Raises ``RateLimited`` (429; ``TokensExceedLimit`` when no
    wait can let the request through) or, failing closed,
    ``LimitStorageDown`` (503).
    """

    def __init__(self, settings: Settings, on_storage_error: Any = None) -> None:
        rl = settings.rate_limits
        self._settings = rl
        self.lease_seconds = settings.timeouts.total + LEASE_GRACE
        self.storage: Counters = counters_from_url(rl.storage, rl.storage_timeout, self.lease_seconds)
        self._tiers = settings.tiers
        self._teams = settings.teams
        self._resolved: dict[tuple[str | None, str | None], LimitValues] = {}
        self._log = structlog.get_logger("gateway.limits")
        self._last_error_log = 0.0
        self._count_error = on_storage_error or (lambda: None)
        self._ttl_slack = self.storage.slack
        self._lease_ids = itertools.count(1)
        # Settlements that failed while storage was down, replayed on the next successful
        # admission: window corrections (key, amount, valid until) and lease releases (key,
        # lease, valid until). Both are safe to replay: a correction only lands in its own
        # window, a release of a lease that is gone does nothing.
        self._pending: list[tuple[str, int, float]] = []
        self._pending_releases: list[tuple[str, int, float]] = []
        self.enabled = bool(settings.tiers) or any(t.limits != LimitValues() for t in settings.teams.values())

    def principal_limits(self, p: Principal) -> LimitValues:
        key = (p.team, p.tier)
        found = self._resolved.get(key)
        if found is None:
            base = self._tiers.get(p.tier) if p.tier is not None else None
            team = self._teams.get(p.team) if p.team is not None else None
            override = team.tiers.get(p.tier) if team is not None and p.tier is not None else None
            found = (base or LimitValues()).merged(override)
            self._resolved[key] = found
        return found

    def estimate(self, body_bytes: int, max_tokens: int | None, n: int = 1) -> int:
        """Tokens to reserve: prompt estimate + the completion budget of each of ``n`` choices.

        ``body_bytes`` / ``bytes_per_token`` estimates the prompt; ``max_tokens`` is the
        completion cap the endpoint honours (validated: 1..ceiling; 0 for embeddings; None when
        the client set none: ``completion_estimate``). The result is within [0, CAP].
        """
        prompt = math.ceil(body_bytes / self._settings.bytes_per_token)
        completion = self._settings.completion_estimate if max_tokens is None else max(0, max_tokens)
        return min(CAP, prompt + completion * max(1, n))

    def _counters(self, p: Principal, estimate: int) -> tuple[list[_Counter], _Counter | None]:
        out: list[_Counter] = []
        mine = self.principal_limits(p)
        who = f"p:{p.subject}"
        if mine.requests_per_minute:
            out.append(_Counter("requests", "principal", f"gw:rpm:{who}", mine.requests_per_minute, 1))
        if mine.tokens_per_minute:
            out.append(_Counter("tokens", "principal", f"gw:tpm:{who}", mine.tokens_per_minute, estimate))
        team = self._teams.get(p.team) if p.team is not None else None
        if team is not None:
            t = team.limits
            where = f"t:{p.team}"
            if t.requests_per_minute:
                out.append(_Counter("requests", "team", f"gw:rpm:{where}", t.requests_per_minute, 1))
            if t.tokens_per_minute:
                out.append(_Counter("tokens", "team", f"gw:tpm:{where}", t.tokens_per_minute, estimate))
        conc = None
        if mine.max_concurrent:
            conc = _Counter("concurrent", "principal", f"gw:inflight:{who}", mine.max_concurrent, 1)
        return out, conc

    def never_fits(self, p: Principal, estimate: int) -> TokensExceedLimit | None:
        """The refusal a request reserving ``estimate`` tokens meets whatever it waits (a token
        budget per minute, the principal's or its team's, smaller than it), or None; from the
        configuration alone, without storage. What an async submission is checked against
        before its 202 (gateway/jobs/api.py)."""
        counters, _ = self._counters(p, estimate)
        return self._final(counters)

    async def admit(self, p: Principal, estimate: int, total_timeout: float = 0.0) -> Reservation:
        """Take the request's counters (``estimate`` tokens) or raise ``RateLimited``.

        ``total_timeout`` is unused (leases last ``timeouts.total`` + LEASE_GRACE); kept for
        callers of the earlier signature.
        """
        counters, conc = self._counters(p, estimate)
        if not counters and conc is None:
            return NO_LIMITS
        try:
            return await self._admit(counters, conc, estimate)
        except TokensExceedLimit:
            raise
        except RateLimited:
            # Another counter was full first (requests, in flight): but no wait lets this request
            # through if a token budget is smaller than it. That is the answer, final, not a
            # Retry-After after which the client would only meet it.
            final = self._final(counters)
            if final is not None:
                raise final from None
            raise
        except Exception as exc:  # storage unreachable, timed out, or broken
            final = self._final(counters)  # what the configuration alone refuses
            if final is not None:
                raise final from None
            return self._storage_failed(exc)

    def _final(self, counters: list[_Counter]) -> TokensExceedLimit | None:
        for c in counters:
            if c.kind == "tokens" and c.cost > c.limit:
                return self._too_large(c)
        return None

    async def _admit(self, counters: list[_Counter], conc: _Counter | None, estimate: int) -> Reservation:
        now = time.monotonic()
        if self._pending or self._pending_releases:
            await self._replay(now)
        lease = next(self._lease_ids) if conc is not None else 0
        got = await self.storage.take(
            [(c.key, c.cost, c.limit, WINDOW) for c in counters],
            () if conc is None else ((conc.key, conc.limit),),
            lease,
        )
        if got.failed >= 0:
            c = counters[got.failed] if got.failed < len(counters) else conc
            assert c is not None
            c.count = got.counts[-1]
            raise self._rejection(c, got.ttls[-1])
        res = Reservation(reserved_tokens=estimate, concurrent=conc, lease=lease)
        headers = res.headers
        for c, count, ttl in zip(counters, got.counts, got.ttls, strict=False):
            c.count = count
            if c.kind == "tokens":
                c.deadline = now + ttl - self._ttl_slack
                res.tokens.append(c)
            if c.scope == "principal":
                headers += _limit_headers(c.kind, c.limit, max(0, c.limit - count), ttl)
        return res

    def _rejection(self, c: _Counter, ttl: float) -> RateLimited:
        if c.kind == "concurrent":
            busy = RateLimited(
                f"Too many requests in flight for this {c.scope}: at most {c.limit} at once.",
                code="concurrency_limit_exceeded",
                retry_after=1,
            )
            busy.limit = (c.kind, c.scope)
            return busy
        wait = min(WINDOW, max(0.0, ttl + self._ttl_slack))
        per = "requests" if c.kind == "requests" else "tokens"
        if c.kind == "tokens" and c.cost > c.limit:
            # Retrying cannot help: no Retry-After, and the budget is reported as it stands.
            too_large = self._too_large(c)
            if c.scope == "principal":
                remaining = max(0, c.limit - max(0, c.count - c.cost))
                too_large.limit_headers = _limit_headers(c.kind, c.limit, remaining, wait)
            return too_large
        message = (
            f"Rate limit reached for {per} per minute ({c.scope}): limit {c.limit}. "
            f"Try again in {reset_text(wait)}."
        )
        err = RateLimited(message, param=per, retry_after=max(1, math.ceil(wait)))
        err.limit = (c.kind, c.scope)
        if c.scope == "principal":
            err.limit_headers = _limit_headers(c.kind, c.limit, 0, wait)
        return err

    @staticmethod
    def _too_large(c: _Counter) -> TokensExceedLimit:
        err = TokensExceedLimit(
            f"This request needs about {c.cost} tokens, more than the {c.scope}'s whole budget of "
            f"{c.limit} tokens per minute; lower max_tokens (or n).",
            param="tokens",
        )
        err.limit = (c.kind, c.scope)
        return err

    async def settle(self, res: Reservation, used_tokens: int | None) -> None:
        """Charge ``used_tokens`` (None: the reservation stands) and release the in-flight lease.

        The token windows are corrected by (charged - reserved) while they last; one storage
        call. A failed call is kept and replayed on a later admission.
        """
        if res is NO_LIMITS:
            return
        now = time.monotonic()
        corrections: list[tuple[str, int]] = []
        if used_tokens is not None and res.tokens:
            delta = clamp(max(0, used_tokens) - res.reserved_tokens)
            if delta:
                corrections = [(c.key, delta) for c in res.tokens if now < c.deadline]
        conc = res.concurrent
        if conc is None:
            if not corrections:
                return
            releases: tuple[tuple[str, int], ...] = ()
        else:
            releases = ((conc.key, res.lease),)
        try:
            await self.storage.settle(corrections, releases)
        except Exception as exc:
            self._note_error(exc)
            if len(self._pending) + len(self._pending_releases) < 10_000:
                # replayed once storage answers again, while the window or the lease lasts
                until = {c.key: c.deadline for c in res.tokens}
                self._pending += [(key, amount, until[key]) for key, amount in corrections]
                if conc is not None:
                    self._pending_releases.append((conc.key, res.lease, now + self.lease_seconds))

    async def _replay(self, now: float) -> None:
        """Settlements that failed while storage was down, in one call; what is over is dropped."""
        pending, self._pending = self._pending, []
        releases, self._pending_releases = self._pending_releases, []
        try:
            await self.storage.settle(
                [(k, amount) for k, amount, until in pending if now < until],
                [(k, lease) for k, lease, until in releases if now < until],
            )
        except Exception:
            self._pending = pending + self._pending
            self._pending_releases = releases + self._pending_releases
            raise

    def _storage_failed(self, exc: BaseException) -> Reservation:
        self._note_error(exc)
        if self._settings.on_storage_error == "closed":
            raise LimitStorageDown(
                "Rate-limit storage is unavailable; retry shortly.", retry_after=2
            ) from None
        return NO_LIMITS

    def _note_error(self, exc: BaseException) -> None:
        self._count_error()
        now = time.monotonic()
        if now - self._last_error_log >= 30:  # once per interval, not once per request
            self._last_error_log = now
            self._log.error(
                "rate-limit storage unavailable",
                error=type(exc).__name__,
                behaviour="fail-" + self._settings.on_storage_error,
            )

    async def close(self) -> None:
        try:
            await self.storage.close()
        except Exception:
            pass
