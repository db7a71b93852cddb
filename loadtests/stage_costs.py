"""CPU cost of single pipeline stages, in-process (``python -m loadtests.stage_costs``).

Microbenchmarks of the stages that issues ask to cost separately: authentication
(JWT verify, cached and not; API key), rate limiting (admit + settle on memory storage),
and instrumentation (the account stage: metrics only, and with the audit line).
Whole-request numbers come from ``loadtests/bench.py``; these isolate one stage each.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
from collections.abc import Awaitable, Callable

import structlog

from gateway.app import create_app
from gateway.auth.jwt import issue_token
from gateway.config import load_settings
from gateway.logs import audit_writer
from gateway.pipeline.account import Accountant
from gateway.pipeline.exchange import Exchange

SECRET = "stage-cost-secret"


def _settings() -> object:
    os.environ["STAGE_COST_SECRET"] = SECRET
    digest = hashlib.sha256(b"sk-stage-cost").hexdigest()
    return load_settings(
        None,
        auth={
            "jwt": {"algorithms": ["HS256"], "secret_env": "STAGE_COST_SECRET"},
            "api_keys": [{"sha256": digest, "subject": "svc", "team": "a", "tier": "t"}],
        },
        tiers={"t": {"requests_per_minute": 10**9, "tokens_per_minute": 10**12, "max_concurrent": 10**6}},
        teams={"a": {"limits": {"requests_per_minute": 10**9}}},
    )


async def _per_call(fn: Callable[[], Awaitable[object]], n: int) -> float:
    for _ in range(min(n, 500)):
        await fn()
    t = time.process_time()
    for _ in range(n):
        await fn()
    return (time.process_time() - t) / n * 1e6


async def main() -> None:
    settings = _settings()
    app = create_app(settings)  # type: ignore[arg-type]
    gw = app.gateway
    assert settings.auth.jwt is not None  # type: ignore[attr-defined]
    token = issue_token(settings.auth.jwt, "alice", "a", "t")  # type: ignore[attr-defined]
    scope_jwt = {"headers": [(b"authorization", f"Bearer {token}".encode())]}
    scope_key = {"headers": [(b"authorization", b"Bearer sk-stage-cost")]}
    auth, limiter = gw.auth, gw.limiter
    results: dict[str, float] = {}

    results["authenticate: JWT, cached verdict"] = await _per_call(
        lambda: auth.authenticate(scope_jwt), 20000
    )
    assert auth.jwt is not None

    async def fresh_jwt() -> object:
        auth.jwt._cache.clear()  # type: ignore[union-attr]
        return await auth.authenticate(scope_jwt)

    results["authenticate: JWT, full HS256 verify"] = await _per_call(fresh_jwt, 5000)
    results["authenticate: API key (sha256 + compare)"] = await _per_call(
        lambda: auth.authenticate(scope_key), 20000
    )
    principal = await auth.authenticate(scope_key)

    async def limit_round() -> None:
        res = await limiter.admit(principal, 300, 600)
        await limiter.settle(res, 120)

    results["limit: admit + settle (memory, RPM+TPM+concurrency, principal+team)"] = await _per_call(
        limit_round, 20000
    )

    ex = Exchange("rid", "chat", time.perf_counter(), model="tiny", status=200, backend="-")
    ex.prompt_tokens, ex.completion_tokens, ex.ttft, ex.finished = 10, 20, 0.05, time.perf_counter()
    quiet = Accountant(gw.metrics, structlog.get_logger("x"), False, set(), set())

    async def account_metrics() -> None:
        quiet.record(ex, True)

    results["account: metrics only"] = await _per_call(account_metrics, 50000)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(io.StringIO()))
    loud = Accountant(gw.metrics, structlog.get_logger("gateway.access"), True, set(), set())

    async def account_all() -> None:
        loud.record(ex, True)

    results["account: metrics + audit line via structlog (to memory)"] = await _per_call(account_all, 20000)
    direct = Accountant(
        gw.metrics,
        None,
        True,
        set(),
        set(),
        write_line=audit_writer(settings.logging, io.StringIO()),  # type: ignore[attr-defined]
    )

    async def account_direct() -> None:
        direct.record(ex, True)

    results["account: metrics + audit line, direct writer as served (to memory)"] = await _per_call(
        account_direct, 20000
    )
    width = max(len(k) for k in results)
    for name, us in results.items():
        print(f"{name:<{width}}  {us:8.1f} µs")


if __name__ == "__main__":
    asyncio.run(main())
