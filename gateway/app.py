"""App factory: builds the gateway from a ``Settings`` object and wires the stages.

The returned ASGI app sends the proxied OpenAI endpoints straight to their
pure-ASGI pipeline (gateway/proxy.py) and everything else (models, health,
metrics, docs) to a FastAPI app. The lifespan owns every client, pool and
background task; importing this module has no side effects.
"""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from fastapi import FastAPI
from jose.exceptions import JOSEError

from gateway import local_only
from gateway.api.router import build_router, install_error_handlers
from gateway.asgi import Receive, Scope, Send
from gateway.backends import BackendPool
from gateway.config import ConfigError, Settings, is_loopback, settings_from_json, settings_to_json
from gateway.drain import Drain
from gateway.errors import MethodNotAllowed
from gateway.health import HealthPoller
from gateway.jobs.api import submit_async, wants_async
from gateway.logs import audit_writer, configure_logging
from gateway.metrics import GatewayMetrics
from gateway.pipeline.account import Accountant
from gateway.pipeline.admit import Admission
from gateway.pipeline.authenticate import Authenticator
from gateway.pipeline.fallback import ExternalFallback
from gateway.pipeline.limit import RateLimiter
from gateway.pipeline.receive import CHAT, COMPLETIONS, EMBEDDINGS
from gateway.pipeline.route import Router
from gateway.pipeline.upstream import UpstreamClient
from gateway.proxy import ProxyEndpoint
from gateway.retry import RetryBudget

if TYPE_CHECKING:
    from gateway.cache.stage import ResponseCache
    from gateway.jobs.service import Jobs
    from gateway.ledger.budget import BudgetBook
    from gateway.ledger.config import BudgetSettings
    from gateway.ledger.writer import LedgerWriter

SETTINGS_ENV = "GATEWAY_RESOLVED_SETTINGS"
# (team -> its budget, team -> each principal's, (team or "", subject) -> an API key's own)
BudgetConfig = tuple[
    dict[str, "BudgetSettings"], dict[str, "BudgetSettings"], dict[tuple[str, str], "BudgetSettings"]
]
# prometheus-client's own switch for multiprocess mode; must be set before it is imported.
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass
class Gateway:
    """Everything the app owns, built once per process."""

    settings: Settings
    pool: BackendPool
    upstream: UpstreamClient
    poller: HealthPoller
    metrics: GatewayMetrics
    auth: Authenticator
    limiter: RateLimiter
    drain: Drain
    retry_budget: RetryBudget
    admission: Admission
    router: Router
    fallback: ExternalFallback | None
    budgets: BudgetBook | None = None  # monthly team budgets (gateway/ledger/budget.py)
    cache: ResponseCache | None = None  # the response cache (gateway/cache/stage.py)


class GatewayApp:
    """Outermost ASGI app: hot paths to the pipeline, the rest to FastAPI."""

    def __init__(
        self, gateway: Gateway, api: FastAPI, routes: dict[str, ProxyEndpoint], jobs: Jobs | None = None
    ) -> None:
        self.gateway = gateway
        self.api = api
        self.routes = routes
        self.jobs = jobs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            endpoint = self.routes.get(scope["path"])
            if endpoint is not None:
                if scope["method"] == "POST":
                    if self.jobs is not None and wants_async(scope):
                        await submit_async(self.gateway, self.jobs, endpoint, scope, receive, send)
                        return
                    await endpoint(scope, receive, send)
                    return
                # Any other method, OPTIONS included (RFC 9110 9.3.7: the Allow header says what
                # the path takes; no CORS preflight is ever approved here), is a 405.
                await _send_plain_error(send, MethodNotAllowed(f"Use POST for {scope['path']}."))
                return
        await self.api(scope, receive, send)


class LocalOnlyGatewayApp(GatewayApp):
    """The app in no-auth loopback mode: refuses browsers' cross-site and rebinding requests.

    A subclass rather than a check in GatewayApp, so the hot path with authentication
    configured carries none of it (gateway/local_only.py says what is refused and why).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refused = local_only.refusal(scope)
            if refused is not None:
                await local_only.send_refusal(send, refused)
                return
        await super().__call__(scope, receive, send)


async def _send_plain_error(send: Send, exc: MethodNotAllowed) -> None:
    body = exc.body()
    await send(
        {
            "type": "http.response.start",
            "status": exc.status,
            "headers": [(b"content-type", b"application/json"), (b"allow", b"POST")],
        }
    )
    await send({"type": "http.response.body", "body": body})


GC_YOUNG_THRESHOLD = 10_000  # net allocations between young collections (CPython: 700)


def build_gateway(settings: Settings, multiprocess_dir: str | None = None) -> Gateway:
    """Everything the app owns, built from the settings but not started (no I/O, no tasks).

    Raises ConfigError (a key, secret or file the settings name is unusable) or the error of
    the part that could not be built; ``check-config`` calls this so it fails when ``serve`` would.
    """
    pool = BackendPool(settings.backends, settings.resilience, settings.health.interval)
    admission = Admission(
        pool,
        settings.admission,
        {name: t.priority for name, t in settings.tiers.items() if t.priority is not None},
    )
    for b in pool.backends:
        if b.breaker is not None:  # a breaker reaching its reset time or closing frees capacity
            b.breaker.on_available = admission.dispatch
    metrics = GatewayMetrics(pool, admission, multiprocess_dir)
    upstream = UpstreamClient(settings.timeouts)
    gateway = Gateway(
        settings=settings,
        pool=pool,
        upstream=upstream,
        poller=HealthPoller(
            pool, settings.health, settings.resilience.readmit_after, upstream, admission.dispatch
        ),
        metrics=metrics,
        auth=build_authenticator(settings),
        limiter=RateLimiter(settings, metrics.count_limit_storage_error),
        drain=Drain(settings.server.drain_seconds),
        retry_budget=RetryBudget(settings.resilience.retry_budget_ratio),
        admission=admission,
        router=Router(settings.routing),
        fallback=ExternalFallback(settings.external, settings) if settings.external else None,
    )
    if settings.cache is not None:
        from gateway.cache.metrics import CacheMetrics
        from gateway.cache.stage import ResponseCache

        gateway.cache = ResponseCache(
            settings.cache,
            pool,
            CacheMetrics(metrics.registry, set(settings.teams), metrics.child),
        )
    return gateway


def check_startup(settings: Settings) -> None:
    """What ``serve`` does with the settings before it listens, minus logging and the socket.

    The worker hand-over (settings as JSON and back), the config hash, and every part of the
    gateway built. Raises ConfigError or the error ``serve`` would stop with.
    """
    try:
        settings_from_json(settings_to_json(settings))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the settings cannot be handed to a worker process: {exc}") from exc
    build_gateway(settings)
    budget_config(settings)  # budgets without a ledger, keys of one subject that disagree
    if settings.ledger is not None:
        try:
            settings.ledger.password()
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc


def create_app(settings: Settings, multiprocess_dir: str | None = None) -> GatewayApp:
    configure_logging(settings.logging)
    gateway = build_gateway(settings, multiprocess_dir)
    pool, metrics = gateway.pool, gateway.metrics
    log = structlog.get_logger("gateway")
    if not settings.auth.enabled:
        log.warning(
            "NO AUTHENTICATION CONFIGURED: every request is served anonymously",
            host=settings.server.host,
            allow_unauthenticated=settings.server.allow_unauthenticated,
        )

    ledger = build_ledger(settings, metrics)
    gateway.budgets = build_budgets(settings, metrics)
    usage_api = None
    if settings.ledger is not None:  # GET /v1/organization/usage/completions and /costs
        from gateway.ledger.api import UsageApi

        usage_api = UsageApi(settings.ledger, gateway.auth)
    jobs_box: list[Jobs] = []  # built below, once the proxy endpoints exist

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if ledger is not None:
            await ledger.start()
        await gateway.upstream.start()
        await gateway.auth.start()
        await gateway.poller.start()
        if gateway.cache is not None:
            await gateway.cache.start()
        gateway.drain.install()
        for jobs in jobs_box:
            await jobs.start()
        log.info(
            "gateway started",
            backends=[b.label for b in pool.backends],
            ready=pool.any_ready,
        )
        # Garbage collection (docs/benchmarks.md, "Garbage collection"). What start-up built
        # lives as long as the process: moved out of the collector's way (full collections took up
        # to 138 ms at 1,000 requests/s without it). Requests in flight keep ~16,000 young objects
        # alive, which every young collection walks; at CPython's default of one per 700 net
        # allocations that cost ~40 µs per request: one per 10,000 (garbage is mostly freed by
        # reference counting; only cycles wait for the collector).
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        try:
            yield
        finally:
            for jobs in jobs_box:
                await jobs.stop()
            await gateway.poller.stop()
            await gateway.auth.stop()
            await gateway.limiter.close()
            if gateway.cache is not None:
                await gateway.cache.close()
            gateway.metrics.worker_exit()
            await gateway.upstream.close()
            if gateway.fallback is not None:
                await gateway.fallback.close()
            if gateway.budgets is not None:
                await gateway.budgets.close()
            if usage_api is not None:
                await usage_api.close()
            if ledger is not None:
                await ledger.stop()  # every request has ended: flush its rows (or spool them)
            log.info("gateway stopped")

    api = FastAPI(
        title="LLM gateway",
        version=_version(),
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    install_error_handlers(api)
    api.include_router(build_router(gateway))
    if usage_api is not None:
        api.include_router(usage_api.router())
    if gateway.cache is not None:
        from gateway.cache.api import build_cache_router

        api.include_router(build_cache_router(gateway.cache, gateway.auth, settings.routing.aliases))
    accountant = Accountant(
        metrics,
        structlog.get_logger("gateway.access"),
        settings.logging.access_log,
        teams=set(settings.teams),
        backends={"cache", *(b.label for b in pool.backends)}
        | ({gateway.fallback.backend.label} if gateway.fallback else set()),
        write_line=audit_writer(settings.logging),
        ledger=ledger,
        budgets=gateway.budgets,
    )
    metrics.build_info.labels(_version(), _config_hash(settings)).set(1)
    routes = {
        ep.path.decode(): ProxyEndpoint(ep, gateway, accountant) for ep in (CHAT, COMPLETIONS, EMBEDDINGS)
    }
    jobs = build_jobs(gateway, api, routes) if settings.jobs.enabled else None
    if jobs is not None:
        jobs_box.append(jobs)
    if not settings.auth.enabled and is_loopback(settings.server.host):
        return LocalOnlyGatewayApp(gateway, api, routes, jobs)
    return GatewayApp(gateway, api, routes, jobs)


def build_jobs(gateway: Gateway, api: FastAPI, routes: dict[str, ProxyEndpoint]) -> Jobs:
    """The Files and Batch APIs, ``/v1/jobs`` and the job workers (gateway/jobs, docs/jobs.md)."""
    import redis.asyncio as aioredis

    from gateway.jobs.api import build_jobs_router, install_jobs_error_handler
    from gateway.jobs.files import Files
    from gateway.jobs.files_api import build_files_router
    from gateway.jobs.filestore import open_store
    from gateway.jobs.service import Jobs

    s = gateway.settings.jobs
    # Each worker may hold two connections at once (its line and the line's renewal); the API,
    # the sweeper and the reaper need some beside them (redis-py's default pool has 100).
    redis = aioredis.Redis.from_url(
        s.queue,
        socket_timeout=5,
        socket_connect_timeout=2,
        health_check_interval=10,
        max_connections=2 * s.concurrency + 100,
    )
    files = Files(s, redis, open_store(s.files))
    jobs = Jobs(gateway, routes, redis, files)
    gateway.admission.on_release = jobs.wake
    api.include_router(build_files_router(gateway.auth, files))
    api.include_router(build_jobs_router(gateway, jobs))
    install_jobs_error_handler(api)
    return jobs


def build_ledger(settings: Settings, metrics: GatewayMetrics) -> LedgerWriter | None:
    """The usage ledger's writer when the settings have a ``ledger`` section (asyncpg loaded only then)."""
    if settings.ledger is None:
        if any(t.capture for t in settings.teams.values()):
            raise ConfigError("teams.<team>.capture: capturing needs a `ledger` section")
        return None
    from gateway.ledger.metrics import LedgerMetrics
    from gateway.ledger.writer import LedgerWriter

    try:
        return LedgerWriter(settings.ledger, settings.pricing, LedgerMetrics(metrics.registry))
    except ValueError as exc:  # the password's variable or file is missing
        raise ConfigError(str(exc)) from exc


def build_budgets(settings: Settings, metrics: GatewayMetrics) -> BudgetBook | None:
    """Team and principal budgets when any is set (they need the ledger: it seeds the counts)."""
    config = budget_config(settings)
    if config is None:
        return None
    budgets, defaults, keys = config
    assert settings.ledger is not None  # budget_config said so
    from gateway.ledger.budget import BudgetBook
    from gateway.ledger.pricing import PriceTable

    rl = settings.rate_limits
    return BudgetBook(
        budgets,
        rl.storage,
        rl.storage_timeout,
        rl.on_storage_error == "open",
        settings.ledger,
        PriceTable(settings.pricing),
        metrics.registry,
        principal_defaults=defaults,
        principals=keys,
    )


def budget_config(settings: Settings) -> BudgetConfig | None:
    """(team budgets, teams' principal budgets, API keys' own budgets), None when there is none.

    ConfigError when there are budgets but no ``ledger`` (it seeds the counts), or when two keys
    of one subject give different budgets."""
    budgets = {name: t.budget for name, t in settings.teams.items() if t.budget is not None}
    defaults = {name: t.principal_budget for name, t in settings.teams.items() if t.principal_budget}
    keys = principal_budgets(settings)
    if not (budgets or defaults or keys):
        return None
    if settings.ledger is None:
        where = (budget_paths(settings) or ["auth.api_keys_file"])[0]  # else a key in the file
        raise ConfigError(f"{where}: budgets need a `ledger` section")
    return budgets, defaults, keys


def budget_paths(settings: Settings) -> list[str]:
    """Where the configuration sets a budget (config paths), for errors that need the ledger."""
    paths = []
    for name, t in settings.teams.items():
        if t.budget is not None:
            paths.append(f"teams.{name}.budget")
        if t.principal_budget is not None:
            paths.append(f"teams.{name}.principal_budget")
    paths += [f"auth.api_keys.{i}.budget" for i, k in enumerate(settings.auth.api_keys) if k.budget]
    return paths


def principal_budgets(settings: Settings) -> dict[tuple[str, str], BudgetSettings]:
    """(team or "", subject) -> the API keys' own budgets (``auth.api_keys`` and its file).

    ConfigError when two keys of one subject and team give different budgets (they share a count).
    """
    from gateway.auth.apikeys import load_api_keys

    try:
        keys = load_api_keys(settings.auth)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"auth.api_keys_file: {exc}") from exc
    found: dict[tuple[str, str], BudgetSettings] = {}
    for key in keys:
        if key.budget is None:
            continue
        who = (key.team or "", key.subject)
        if found.setdefault(who, key.budget) != key.budget:
            raise ConfigError(
                f"auth.api_keys: the keys of subject {key.subject!r} (team {key.team!r}) give different "
                "budgets; they share one count, so give one budget"
            )
    return found


def build_authenticator(settings: Settings) -> Authenticator:
    """Load keys and secrets now, so a bad one stops start-up with the key named."""
    try:
        return Authenticator(settings)
    except (ValueError, OSError, JOSEError) as exc:
        # JOSEError: key material that is not a key (a PEM file holding something else, say)
        raise ConfigError(f"auth: {exc or type(exc).__name__}") from exc


def create_app_from_env() -> GatewayApp:
    """uvicorn factory for worker processes: settings resolved once by the CLI, passed as JSON."""
    return create_app(settings_from_json(os.environ[SETTINGS_ENV]), os.environ.get(METRICS_DIR_ENV))


def _config_hash(settings: Settings) -> str:
    import hashlib

    return hashlib.sha256(settings_to_json(settings).encode()).hexdigest()[:12]


def _version() -> str:
    from gateway import __version__

    return __version__
