"""Monthly budgets of teams and principals: 429 ``budget_exceeded`` once a month is spent.

Spend per team, per principal (a subject within its team) and calendar month (UTC) lives in the
rate-limit storage — Redis, shared by every worker and replica, or this process's memory with
``memory://`` — as one hash per budget and month, ``<prefix><team>:<YYYYMM>`` or, a principal's,
``llmgw:budget-principal:<team>:<subject>:<YYYYMM>`` (team and subject URL-quoted), with ``nano``
(USD * 1e9) and ``tokens``. The check before a request is one round trip (an ``HMGET`` per budget
that applies; no I/O when none does); the charge after it is one script call for all of them,
started from the account stage and not awaited by the request.

The ledger is the source of truth: a missing hash (a new month, a Redis restart or flush) is
seeded from the ledger's hourly rollup before the first check answers, so a restart never resets a
month's spend (a check waits for the seed at most the storage timeout: a slow ledger is served
unchecked until the seed lands). Charges only land on a seeded hash; a request that ends between a
flush and the seeding is in the ledger, and the seeding counts it once its row is written. A
response-cache hit is charged nothing, neither its cost nor its tokens, live or in a seed.

How close the limit holds: a request is admitted while the spend is under the budget, and its
cost is known only when it ends, so the requests in flight when the budget is crossed all finish
(across replicas the same): with sequential requests the overshoot is at most one request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.errors import Fault, GatewayError
from gateway.ledger.config import BudgetSettings, LedgerSettings
from gateway.ledger.pricing import PriceTable
from gateway.ledger.rows import cost_of

if TYPE_CHECKING:
    from gateway.auth.principal import Principal
    from gateway.pipeline.exchange import Exchange

SEED_RETRY = 5.0  # seconds between seeds of one month's spend while the ledger fails
KEY_TTL_MS = 40 * 86400 * 1000  # a month's hash outlives the month (queries of last month's spend)
_CHARGE = """
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    redis.call('HINCRBY', key, 'nano', ARGV[1])
    redis.call('HINCRBY', key, 'tokens', ARGV[2])
  end
end
"""
_SEED = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'nano', ARGV[1], 'tokens', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return redis.call('HMGET', KEYS[1], 'nano', 'tokens')
"""


class BudgetExceeded(GatewayError):
    status = 429
    type = "insufficient_quota"  # OpenAI's type for a spent quota (the SDK raises RateLimitError)
    code = "budget_exceeded"
    reason = "budget_exceeded"
    fault = Fault.CLIENT  # the team spent its own budget
    budget_headers: list[tuple[bytes, bytes]] = []

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [*super().headers(), *self.budget_headers]


class BudgetStorageDown(GatewayError):
    status = 503
    code = "budget_storage_unavailable"
    reason = "budget_storage"


def month_bounds(now: datetime) -> tuple[datetime, datetime]:
    """[first instant of this UTC month, first instant of the next)."""
    start = datetime(now.year, now.month, 1, tzinfo=UTC)
    end = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
    return start, end


@dataclass(frozen=True, slots=True)
class _Scope:
    """One budget a request is checked against: its team's, or its principal's own."""

    team: str  # "" for a principal without a team (the ledger's rollup stores it so)
    subject: str | None  # None: the whole team
    budget: BudgetSettings

    def who(self) -> str:
        if self.subject is None:
            return f"Team {self.team!r}"
        return f"Principal {self.subject!r}" + (f" of team {self.team!r}" if self.team else "")


class BudgetBook:
    """Checks and charges team and principal budgets; ``close()`` in the lifespan's shutdown.

    ``teams``: team -> the whole team's budget; ``principal_defaults``: team -> each principal's
    own budget; ``principals``: (team or "", subject) -> that principal's budget (an API key's
    ``budget``), which replaces the team's default for it.
    """

    def __init__(
        self,
        teams: Mapping[str, BudgetSettings],
        storage_url: str,
        timeout: float,
        fail_open: bool,
        ledger: LedgerSettings,
        prices: PriceTable,
        registry: CollectorRegistry,
        prefix: str = "llmgw:budget:",
        principal_defaults: Mapping[str, BudgetSettings] | None = None,
        principals: Mapping[tuple[str, str], BudgetSettings] | None = None,
    ) -> None:
        self._teams = dict(teams)
        self._principal_defaults = dict(principal_defaults or {})
        self._principals = dict(principals or {})
        self._timeout = timeout
        self._fail_open = fail_open
        self._ledger = ledger
        self._prices = prices
        self._prefix = prefix
        # Principals' hashes under a prefix no team's key can spell (team keys are prefix + team).
        self._principal_prefix = prefix.rstrip(":") + "-principal:"
        self._memory: dict[str, list[int]] | None = None
        self._redis: Any = None
        if storage_url.startswith("memory://"):
            self._memory = {}
        else:
            import redis.asyncio as aioredis

            self._redis = aioredis.Redis.from_url(storage_url, socket_timeout=timeout)
            self._charge_script = self._redis.register_script(_CHARGE)
            self._seed_script = self._redis.register_script(_SEED)
        self._tasks: set[asyncio.Task[None]] = set()
        self._seeding: dict[str, asyncio.Task[tuple[int, int] | None]] = {}
        self._seed_failed: dict[str, float] = {}  # storage key -> no new seed before (monotonic)
        self._log = structlog.get_logger("gateway.ledger.budget")
        self.used = Gauge(
            "gateway_budget_used_ratio",
            "Fraction of the team's monthly budget spent (larger of USD and tokens), at its last request.",
            ["team"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.soft = Gauge(
            "gateway_budget_soft_ratio",
            "The team's soft threshold: alert when gateway_budget_used_ratio reaches it.",
            ["team"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.exceeded = Counter(
            "gateway_budget_exceeded",
            "Requests refused because a monthly budget was spent (budget: team or principal).",
            ["team", "budget"],
            registry=registry,
        )
        for name, b in self._teams.items():
            self.soft.labels(name).set(b.soft)

    def _scopes(self, principal: Principal) -> list[_Scope]:
        """The budgets that apply to ``principal``: its team's, then its own (either may be absent)."""
        team = principal.team or ""
        scopes = []
        if principal.team is not None and (b := self._teams.get(principal.team)) is not None:
            scopes.append(_Scope(team, None, b))
        if principal.via != "anonymous":
            own = self._principals.get((team, principal.subject))
            if own is None and principal.team is not None:
                own = self._principal_defaults.get(principal.team)
            if own is not None:
                scopes.append(_Scope(team, principal.subject, own))
        return scopes

    def _key(self, scope: _Scope, now: datetime) -> str:
        if scope.subject is None:
            return f"{self._prefix}{scope.team}:{now:%Y%m}"
        # Quoted: a team or subject holding ':' cannot make two principals share a hash.
        team, subject = quote(scope.team, safe=""), quote(scope.subject, safe="")
        return f"{self._principal_prefix}{team}:{subject}:{now:%Y%m}"

    async def check(self, principal: Principal) -> list[tuple[bytes, bytes]]:
        """The remaining-budget response headers; BudgetExceeded (429) when a month is spent.

        Checks the team's budget and the principal's own (``teams.<t>.principal_budget`` or its
        API key's ``budget``). Headers (when a budget applies): ``x-budget-remaining-usd`` and/or
        ``x-budget-remaining-tokens`` (the least left over the budgets that apply; never negative)
        and ``x-budget-reset`` (RFC 3339, UTC). No I/O and no headers when none applies. Storage
        failures follow ``rate_limits.on_storage_error`` (serve without headers, or
        BudgetStorageDown 503).
        """
        scopes = self._scopes(principal)
        if not scopes:
            return []
        now = datetime.now(UTC)
        keys = [self._key(scope, now) for scope in scopes]
        try:
            async with asyncio.timeout(self._timeout):
                spent = await self._read(keys)
            for i, got in enumerate(spent):
                if got is None:
                    spent[i] = await self._seeded(scopes[i], keys[i], now)
        except (OSError, TimeoutError, ConnectionError) as exc:
            return self._storage_failed(exc)
        except Exception as exc:  # redis-py's own errors
            if type(exc).__module__.startswith("redis"):
                return self._storage_failed(exc)
            raise
        _, reset = month_bounds(now)
        usd_left: float | None = None
        tokens_left: int | None = None
        over: tuple[_Scope, str] | None = None
        for scope, got in zip(scopes, spent, strict=True):
            if got is None:
                continue  # neither storage nor ledger could tell: serve (the ledger still records it)
            nano, tokens = got
            budget = scope.budget
            if scope.subject is None:
                ratios = []
                if budget.monthly_usd is not None:
                    ratios.append(nano / 1e9 / budget.monthly_usd)
                if budget.monthly_tokens is not None:
                    ratios.append(tokens / budget.monthly_tokens)
                self.used.labels(scope.team).set(max(ratios))
            if budget.monthly_usd is not None:
                left = max(0.0, budget.monthly_usd - nano / 1e9)
                usd_left = left if usd_left is None else min(usd_left, left)
                if over is None and nano >= budget.monthly_usd * 1e9:
                    usd = f"{budget.monthly_usd} USD (spent {nano / 1e9:.4f} USD)"
                    over = scope, f"its monthly budget of {usd}"
            if budget.monthly_tokens is not None:
                left_tokens = max(0, budget.monthly_tokens - tokens)
                tokens_left = left_tokens if tokens_left is None else min(tokens_left, left_tokens)
                if over is None and tokens >= budget.monthly_tokens:
                    over = scope, f"its monthly budget of {budget.monthly_tokens} tokens (used {tokens})"
        if usd_left is None and tokens_left is None:
            return []
        headers = []
        if usd_left is not None:
            headers.append((b"x-budget-remaining-usd", f"{usd_left:.6f}".encode()))
        if tokens_left is not None:
            headers.append((b"x-budget-remaining-tokens", str(tokens_left).encode()))
        headers.append((b"x-budget-reset", f"{reset:%Y-%m-%dT%H:%M:%SZ}".encode()))
        if over is not None:
            scope, what = over
            self.exceeded.labels(scope.team, "team" if scope.subject is None else "principal").inc()
            refusal = BudgetExceeded(
                f"{scope.who()} has spent {what}; it resets at {reset:%Y-%m-%dT%H:%M:%SZ}.",
                retry_after=max(1, int((reset - now).total_seconds())),
            )
            refusal.budget_headers = headers
            raise refusal
        return headers

    def _storage_failed(self, exc: BaseException) -> list[tuple[bytes, bytes]]:
        self._log.warning("budget storage unavailable", error=type(exc).__name__)
        if not self._fail_open:
            raise BudgetStorageDown("The budget storage is unavailable.", retry_after=1)
        return []

    async def _read(self, keys: list[str]) -> list[tuple[int, int] | None]:
        """Each hash's (nano, tokens), None where it is missing: one round trip for all."""
        if self._memory is not None:
            found = [self._memory.get(key) for key in keys]
            return [None if v is None else (v[0], v[1]) for v in found]
        if len(keys) == 1:
            replies = [await self._redis.hmget(keys[0], "nano", "tokens")]
        else:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(key, "nano", "tokens")
                replies = await pipe.execute()
        return [
            None if nano is None or tokens is None else (int(nano), int(tokens)) for nano, tokens in replies
        ]

    async def _seeded(self, scope: _Scope, key: str, now: datetime) -> tuple[int, int] | None:
        """The month's spend from the ledger, stored unless another process stored it first.

        After a seed that failed (the ledger unreachable, say) the next is tried only
        ``SEED_RETRY`` seconds later: requests meanwhile are served unchecked rather than each
        opening a connection to a database that is down."""
        failed = self._seed_failed.get(key)
        if failed is not None and time.monotonic() < failed:
            return None
        task = self._seeding.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._seed(scope, key, now))
            self._seeding[key] = task
            task.add_done_callback(lambda _: self._seeding.pop(key, None))
        # The request waits for the seed no longer than for any storage call: a slow or locked
        # ledger serves the request unchecked (as an unreadable one does) while the seed goes on.
        try:
            return await asyncio.wait_for(asyncio.shield(task), self._timeout)
        except TimeoutError:
            self._log.warning("budget: seeding from the ledger is slow; serving meanwhile", team=scope.team)
            return None

    async def _seed(self, scope: _Scope, key: str, now: datetime) -> tuple[int, int] | None:
        import asyncpg

        start, _ = month_bounds(now)
        s = self._ledger
        # Cache hits are charged nothing (``charge``): their cost is 0 in the ledger, and their
        # tokens, which it keeps, are left out. Hits are the rollup's `cache` provider, whatever
        # the schema's revision (gateway/ledger/rows.py provider_of). A principal's spend is its
        # subject's rows in its team ("" for none, as the rollup stores it).
        query = (
            "SELECT coalesce(sum(cost_usd), 0) AS usd,"
            " coalesce(sum(prompt_tokens + completion_tokens)"
            " FILTER (WHERE provider <> 'cache'), 0) AS tokens"
            " FROM usage_hourly WHERE team = $1 AND hour >= $2"
        )
        args: list[Any] = [scope.team, start]
        if scope.subject is not None:
            query += " AND subject = $3"
            args.append(scope.subject)
        try:
            conn = await asyncpg.connect(
                s.dsn,
                password=s.password(),
                timeout=s.write_timeout,
                server_settings={"search_path": s.schema_name, "timezone": "UTC"},
            )
            try:
                row = await conn.fetchrow(query, *args, timeout=s.write_timeout)
            finally:
                await conn.close()
        except Exception as exc:
            error = type(exc).__name__
            self._log.warning("budget: the ledger could not be read", team=scope.team, error=error)
            if len(self._seed_failed) > 10_000:  # one entry per budget and month: keep it bounded
                self._seed_failed.clear()
            self._seed_failed[key] = time.monotonic() + SEED_RETRY
            return None
        assert row is not None
        nano, tokens = int(Decimal(row["usd"]) * 1_000_000_000), int(row["tokens"])
        self._log.info(
            "budget seeded from the ledger",
            team=scope.team,
            principal=scope.subject is not None,
            usd=nano / 1e9,
            tokens=tokens,
        )
        if self._memory is not None:
            v = self._memory.setdefault(key, [nano, tokens])
            return v[0], v[1]
        async with asyncio.timeout(self._timeout):
            got = await self._seed_script(keys=[key], args=[nano, tokens, KEY_TTL_MS])
        return int(got[0]), int(got[1])

    def charge(self, ex: Exchange) -> None:
        """Add a finished request's cost and tokens to its budgets' month (not awaited; one call)."""
        if ex.cache == "hit":  # a hit costs nothing
            return
        scopes = self._scopes(ex.principal)
        if not scopes:
            return
        tokens = max(0, ex.prompt_tokens or 0) + max(0, ex.completion_tokens or 0)
        if not tokens:
            return
        nano = int(cost_of(ex, self._prices) * 1_000_000_000)
        now = datetime.now(UTC)
        keys = [self._key(scope, now) for scope in scopes]
        if self._memory is not None:
            for key in keys:
                v = self._memory.get(key)
                if v is not None:
                    v[0] += nano
                    v[1] += tokens
            return
        task = asyncio.get_running_loop().create_task(self._charge(keys, nano, tokens))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _charge(self, keys: list[str], nano: int, tokens: int) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._charge_script(keys=keys, args=[nano, tokens])
        except Exception as exc:  # the ledger keeps the row; a later seeding counts it
            self._log.warning("budget charge failed", error=type(exc).__name__)

    async def close(self) -> None:
        seeding = list(self._seeding.values())  # a slow seed no request waits for any more
        for task in seeding:
            task.cancel()
        if self._tasks or seeding:
            await asyncio.gather(*self._tasks, *seeding, return_exceptions=True)
        if self._redis is not None:
            await self._redis.aclose()
