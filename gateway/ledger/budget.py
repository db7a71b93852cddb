"""Monthly team budgets: 429 ``budget_exceeded`` once a team's month is spent.

Spend per team and calendar month (UTC) lives in the rate-limit storage — Redis, shared by every
worker and replica, or this process's memory with ``memory://`` — as one hash
``<prefix><team>:<YYYYMM>`` with ``nano`` (USD * 1e9) and ``tokens``. The check before a request
is one ``HMGET`` (only for teams with a budget); the charge after it is one script call, started
from the account stage and not awaited by the request.

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
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.errors import Fault, GatewayError
from gateway.ledger.config import BudgetSettings, LedgerSettings
from gateway.ledger.pricing import PriceTable
from gateway.ledger.rows import cost_of

if TYPE_CHECKING:
    from gateway.auth.principal import Principal
    from gateway.pipeline.exchange import Exchange

KEY_TTL_MS = 40 * 86400 * 1000  # a month's hash outlives the month (queries of last month's spend)
_CHARGE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'nano', ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'tokens', ARGV[2])
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


class BudgetBook:
    """Checks and charges team budgets; ``close()`` in the lifespan's shutdown."""

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
    ) -> None:
        self._teams = dict(teams)
        self._timeout = timeout
        self._fail_open = fail_open
        self._ledger = ledger
        self._prices = prices
        self._prefix = prefix
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
            "Requests refused because the team's monthly budget was spent.",
            ["team"],
            registry=registry,
        )
        for name, b in self._teams.items():
            self.soft.labels(name).set(b.soft)

    def _key(self, team: str, now: datetime) -> str:
        return f"{self._prefix}{team}:{now:%Y%m}"

    async def check(self, principal: Principal) -> list[tuple[bytes, bytes]]:
        """The remaining-budget response headers; BudgetExceeded (429) when the month is spent.

        Headers (teams with a budget): ``x-budget-remaining-usd`` and/or
        ``x-budget-remaining-tokens`` (never negative) and ``x-budget-reset`` (RFC 3339, UTC).
        No I/O and no headers for teams without a budget. Storage failures follow
        ``rate_limits.on_storage_error`` (serve without headers, or BudgetStorageDown 503).
        """
        team = principal.team
        budget = self._teams.get(team) if team is not None else None
        if budget is None or team is None:
            return []
        now = datetime.now(UTC)
        key = self._key(team, now)
        try:
            async with asyncio.timeout(self._timeout):
                spent = await self._read(key)
            if spent is None:
                spent = await self._seeded(team, key, now)
        except (OSError, TimeoutError, ConnectionError) as exc:
            return self._storage_failed(exc)
        except Exception as exc:  # redis-py's own errors
            if type(exc).__module__.startswith("redis"):
                return self._storage_failed(exc)
            raise
        if spent is None:
            return []  # neither storage nor ledger could tell: serve (the ledger still records it)
        nano, tokens = spent
        ratios = []
        if budget.monthly_usd is not None:
            ratios.append(nano / 1e9 / budget.monthly_usd)
        if budget.monthly_tokens is not None:
            ratios.append(tokens / budget.monthly_tokens)
        self.used.labels(team).set(max(ratios))
        over = None
        if budget.monthly_usd is not None and nano >= budget.monthly_usd * 1e9:
            over = f"its monthly budget of {budget.monthly_usd} USD (spent {nano / 1e9:.4f} USD)"
        elif budget.monthly_tokens is not None and tokens >= budget.monthly_tokens:
            over = f"its monthly budget of {budget.monthly_tokens} tokens (used {tokens})"
        _, reset = month_bounds(now)
        headers = []
        if budget.monthly_usd is not None:
            left = max(0.0, budget.monthly_usd - nano / 1e9)
            headers.append((b"x-budget-remaining-usd", f"{left:.6f}".encode()))
        if budget.monthly_tokens is not None:
            left_tokens = max(0, budget.monthly_tokens - tokens)
            headers.append((b"x-budget-remaining-tokens", str(left_tokens).encode()))
        headers.append((b"x-budget-reset", f"{reset:%Y-%m-%dT%H:%M:%SZ}".encode()))
        if over is not None:
            self.exceeded.labels(team).inc()
            refusal = BudgetExceeded(
                f"Team {team!r} has spent {over}; it resets at {reset:%Y-%m-%dT%H:%M:%SZ}.",
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

    async def _read(self, key: str) -> tuple[int, int] | None:
        if self._memory is not None:
            v = self._memory.get(key)
            return None if v is None else (v[0], v[1])
        nano, tokens = await self._redis.hmget(key, "nano", "tokens")
        if nano is None or tokens is None:
            return None
        return int(nano), int(tokens)

    async def _seeded(self, team: str, key: str, now: datetime) -> tuple[int, int] | None:
        """The month's spend from the ledger, stored unless another process stored it first."""
        task = self._seeding.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._seed(team, key, now))
            self._seeding[key] = task
            task.add_done_callback(lambda _: self._seeding.pop(key, None))
        # The request waits for the seed no longer than for any storage call: a slow or locked
        # ledger serves the request unchecked (as an unreadable one does) while the seed goes on.
        try:
            return await asyncio.wait_for(asyncio.shield(task), self._timeout)
        except TimeoutError:
            self._log.warning("budget: seeding from the ledger is slow; serving meanwhile", team=team)
            return None

    async def _seed(self, team: str, key: str, now: datetime) -> tuple[int, int] | None:
        import asyncpg

        start, _ = month_bounds(now)
        s = self._ledger
        try:
            conn = await asyncpg.connect(
                s.dsn,
                password=s.password(),
                timeout=s.write_timeout,
                server_settings={"search_path": s.schema_name, "timezone": "UTC"},
            )
            try:
                # Cache hits are charged nothing (``charge``): their cost is 0 in the ledger, and
                # their tokens, which it keeps, are left out. Hits are the rollup's `cache`
                # provider, whatever the schema's revision (gateway/ledger/rows.py provider_of).
                row = await conn.fetchrow(
                    "SELECT coalesce(sum(cost_usd), 0) AS usd,"
                    " coalesce(sum(prompt_tokens + completion_tokens)"
                    " FILTER (WHERE provider <> 'cache'), 0) AS tokens"
                    " FROM usage_hourly WHERE team = $1 AND hour >= $2",
                    team,
                    start,
                    timeout=s.write_timeout,
                )
            finally:
                await conn.close()
        except Exception as exc:
            self._log.warning("budget: the ledger could not be read", team=team, error=type(exc).__name__)
            return None
        assert row is not None
        nano, tokens = int(Decimal(row["usd"]) * 1_000_000_000), int(row["tokens"])
        self._log.info("budget seeded from the ledger", team=team, usd=nano / 1e9, tokens=tokens)
        if self._memory is not None:
            v = self._memory.setdefault(key, [nano, tokens])
            return v[0], v[1]
        async with asyncio.timeout(self._timeout):
            got = await self._seed_script(keys=[key], args=[nano, tokens, KEY_TTL_MS])
        return int(got[0]), int(got[1])

    def charge(self, ex: Exchange) -> None:
        """Add a finished request's cost and tokens to its team's month (not awaited; teams with a budget)."""
        team = ex.principal.team
        if team is None or team not in self._teams or ex.cache == "hit":  # a hit costs nothing
            return
        tokens = max(0, ex.prompt_tokens or 0) + max(0, ex.completion_tokens or 0)
        if not tokens:
            return
        nano = int(cost_of(ex, self._prices) * 1_000_000_000)
        key = self._key(team, datetime.now(UTC))
        if self._memory is not None:
            v = self._memory.get(key)
            if v is not None:
                v[0] += nano
                v[1] += tokens
            return
        task = asyncio.get_running_loop().create_task(self._charge(key, nano, tokens))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _charge(self, key: str, nano: int, tokens: int) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._charge_script(keys=[key], args=[nano, tokens])
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
