"""Stage 3, limit: requests and tokens per minute and requests in flight, per principal and team.

Counters (gateway/pipeline/counters.py) live in memory (``memory://``, one
process) or in Redis (``redis://``, shared by every worker and replica). Each
counter is a fixed window that starts at its first hit; a request's counters
are taken in one atomic step (one Lua script on Redis), so two replicas racing
for the last slot get different counts and only one passes, and a refused
request leaves no trace in any counter.

Token budgets are reserved before the call and reconciled after it:

* reserved = prompt estimate + (max_tokens or ``completion_estimate``), where
  the prompt estimate is request-body bytes / ``bytes_per_token``. Body bytes
  over-count prompt tokens (JSON syntax, roles), so the reservation errs on
  the safe side and costs nothing to compute;
* after the response the counters are corrected by (real usage - reserved),
  from vLLM's usage block or usage chunk, also after a client disconnect
  (then whatever usage arrived, else the reservation stands).

A storage failure (Redis down or slow) never becomes a 500 or a hang: every
call has a timeout, and ``on_storage_error`` decides between serving (open)
and 503 (closed).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from gateway.auth.principal import Principal
from gateway.config import Settings
from gateway.config_auth import LimitValues
from gateway.errors import GatewayError
from gateway.pipeline.counters import AddItem, Counters, MemoryCounters, counters_from_url

WINDOW = 60  # seconds: limits are per minute


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    reason = "rate_limited"
    limit_headers: list[tuple[bytes, bytes]] = []
    limit: tuple[str, str] = ("requests", "principal")  # (kind, scope) for the metric

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [*super().headers(), *self.limit_headers]


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
    tokens: list[_Counter] = field(default_factory=list)
    concurrent: _Counter | None = None
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
        (reset_name, _reset_text(reset).encode()),
    ]


def _reset_text(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `250ms`."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    s = math.ceil(seconds)
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


class RateLimiter:
    def __init__(self, settings: Settings, on_storage_error: Any = None) -> None:
        rl = settings.rate_limits
        self._settings = rl
        self.storage: Counters = counters_from_url(rl.storage, rl.storage_timeout)
        self._local = isinstance(self.storage, MemoryCounters)
        self._tiers = settings.tiers
        self._teams = settings.teams
        self._resolved: dict[tuple[str | None, str | None], LimitValues] = {}
        self._log = structlog.get_logger("gateway.limits")
        self._last_error_log = 0.0
        self._count_error = on_storage_error or (lambda: None)
        # Redis counts windows in whole seconds: be a second conservative with waits and deadlines.
        self._ttl_slack = self.storage.slack
        # Corrections (token refunds, in-flight releases) that failed while storage was down,
        # replayed on the next successful admission: (key, amount, monotonic valid-until).
        self._pending: list[tuple[str, int, float]] = []
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
        """Prompt estimate + completion budget; `n` choices each get max_tokens."""
        prompt = math.ceil(body_bytes / self._settings.bytes_per_token)
        completion = max_tokens if max_tokens is not None else self._settings.completion_estimate
        return prompt + completion * max(1, n)

    def _counters(self, p: Principal, estimate: int) -> list[_Counter]:
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
        if mine.max_concurrent:
            out.append(_Counter("concurrent", "principal", f"gw:inflight:{who}", mine.max_concurrent, 1))
        return out

    async def admit(self, p: Principal, estimate: int, total_timeout: float) -> Reservation:
        counters = self._counters(p, estimate)
        if not counters:
            return NO_LIMITS
        try:
            if self._local:  # a dict cannot hang: no timer
                return await self._admit(counters, estimate, total_timeout)
            async with asyncio.timeout(self._settings.storage_timeout):
                return await self._admit(counters, estimate, total_timeout)
        except RateLimited:
            raise
        except Exception as exc:  # storage unreachable, timed out, or broken
            return self._storage_failed(exc)

    async def _admit(self, counters: list[_Counter], estimate: int, total_timeout: float) -> Reservation:
        now = time.monotonic()
        if self._pending:
            await self._replay(now)
        # A counter of requests in flight expires only as a safety net for a crashed replica.
        longer = int(total_timeout) + WINDOW
        got = await self.storage.take(
            [(c.key, c.cost, c.limit, longer if c.kind == "concurrent" else WINDOW) for c in counters]
        )
        if got.failed >= 0:
            c = counters[got.failed]
            c.count = got.counts[-1]
            raise self._rejection(c, got.ttls[-1])
        res = Reservation(reserved_tokens=estimate)
        headers = res.headers
        for c, count, ttl in zip(counters, got.counts, got.ttls, strict=True):
            c.count = count
            if c.kind == "tokens":
                c.deadline = now + ttl - self._ttl_slack
                res.tokens.append(c)
            elif c.kind == "concurrent":
                res.concurrent = c
                continue
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
        wait = min(float(WINDOW), max(0.0, ttl + self._ttl_slack))
        per = "requests" if c.kind == "requests" else "tokens"
        if c.kind == "tokens" and c.cost > c.limit:
            message = (
                f"This request needs about {c.cost} tokens, more than the {c.scope}'s whole budget of "
                f"{c.limit} tokens per minute; lower max_tokens."
            )
        else:
            message = (
                f"Rate limit reached for {per} per minute ({c.scope}): limit {c.limit}. "
                f"Try again in {_reset_text(wait)}."
            )
        err = RateLimited(message, param=per, retry_after=max(1, math.ceil(wait)))
        err.limit = (c.kind, c.scope)
        if c.scope == "principal":
            err.limit_headers = _limit_headers(c.kind, c.limit, 0, wait)
        return err

    async def settle(self, res: Reservation, used_tokens: int | None) -> None:
        """Reconcile reserved tokens with real usage; release the in-flight slot."""
        if res is NO_LIMITS:
            return
        now = time.monotonic()
        todo: list[tuple[str, int, float]] = []  # (key, amount, valid until)
        if used_tokens is not None and res.tokens:
            delta = used_tokens - res.reserved_tokens
            todo += [(c.key, delta, c.deadline) for c in res.tokens if delta and now < c.deadline]
        if res.concurrent is not None:
            todo.append((res.concurrent.key, -1, now + WINDOW * 10))
        if not todo:
            return
        try:
            items: list[AddItem] = [(key, amount, WINDOW) for key, amount, _ in todo]
            if self._local:
                await self.storage.add(items)
            else:
                async with asyncio.timeout(self._settings.storage_timeout):
                    await self.storage.add(items)
        except Exception as exc:
            self._note_error(exc)
            if len(self._pending) < 10_000:
                self._pending += todo  # replayed once storage answers again

    async def _replay(self, now: float) -> None:
        """Corrections that failed while storage was down, in one call; what is over is dropped."""
        pending, self._pending = self._pending, []
        owed: list[AddItem] = [(k, amount, WINDOW) for k, amount, until in pending if now < until]
        try:
            await self.storage.add(owed)
        except Exception:
            self._pending = pending + self._pending
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
