"""Background health poller: the only thing that decides whether a backend is ready.

Every ``health.interval`` seconds each backend's ``/health`` and, when that
is 200, ``/v1/models`` are fetched. Probes of the gateway (/ready, /health)
read the result; they never fan out to the backends themselves.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

import orjson
import structlog

from gateway.backends import Backend, BackendPool, BackendState
from gateway.config import HealthSettings
from gateway.pipeline.upstream import ProbeFailed, UpstreamClient


class HealthPoller:
    def __init__(
        self,
        pool: BackendPool,
        settings: HealthSettings,
        readmit_after: int,
        upstream: UpstreamClient,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._pool = pool
        self._upstream = upstream
        self._on_change = on_change
        self._settings = settings
        self._readmit_after = readmit_after
        self._task: asyncio.Task[None] | None = None
        self._log = structlog.get_logger("gateway.health")

    async def start(self) -> None:
        """Call after the upstream client has started: the poller shares its session."""
        await self.poll_once()
        self._task = asyncio.create_task(self._run(), name="health-poller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._settings.interval)
            try:
                await self.poll_once()
            except Exception:  # never let the poller die
                self._log.exception("health poll failed")

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._check(b) for b in self._pool.backends))

    async def _check(self, b: Backend) -> None:
        get, timeout = self._upstream.get, self._settings.timeout
        started = time.perf_counter()
        failure: str | None = None
        models: dict[str, dict[str, Any]] = {}
        try:
            status, _ = await get(b, "/health", timeout)
            b.last_latency = time.perf_counter() - started
            if status != 200:
                failure = f"/health answered {status}"
            else:
                status, body = await get(b, "/v1/models", timeout)
                if status != 200:
                    failure = f"/v1/models answered {status}"
                else:
                    data = orjson.loads(body).get("data", [])
                    models = {c["id"]: c for c in data if isinstance(c, dict) and "id" in c}
                    missing = [name for name in b.settings.models if name not in models]
                    if missing:
                        failure = f"model(s) not listed: {', '.join(missing)}"
                    else:
                        await self._scrape(b)
        except ProbeFailed as exc:
            b.last_latency = None
            failure = str(exc)
        except (orjson.JSONDecodeError, AttributeError):
            failure = "/v1/models did not return a JSON model list"
        b.last_check = time.time()
        self._apply(b, failure, models)

    async def _scrape(self, b: Backend) -> None:
        """vLLM's own load signals, for routing and for re-export; never fails the check."""
        try:
            status, body = await self._upstream.get(b, "/metrics", self._settings.timeout)
        except ProbeFailed:
            status, body = 0, b""
        if status != 200:
            b.vllm_waiting = b.vllm_running = b.kv_usage = 0.0  # unknown, not the last value
            return
        found = _load_samples(body)
        b.vllm_waiting = sum(found[b"vllm:num_requests_waiting"])
        b.vllm_running = sum(found[b"vllm:num_requests_running"])
        # With several engines (data parallel) usage is per engine: the fullest one matters.
        b.kv_usage = max(found[b"vllm:kv_cache_usage_perc"], default=0.0)

    def _apply(self, b: Backend, failure: str | None, models: dict[str, dict[str, Any]]) -> None:
        before = b.state
        # A replica that starts or stops serving a model (vLLM loading a LoRA adapter) changes
        # which models share its capacity: admission regroups them.
        models_changed = bool(models) and models.keys() != b.models.keys()
        if failure is not None:
            b.vllm_waiting = b.vllm_running = b.kv_usage = 0.0
        if failure is None:
            b.good_checks += 1
            b.models = models
            # A replica that was down must prove itself; one still loading is let in at once.
            if before is not BackendState.DOWN or b.good_checks >= self._readmit_after:
                if before is BackendState.DOWN and b.breaker is not None:
                    b.breaker.reset()
                b.state, b.reason = BackendState.HEALTHY, "ok"
            else:
                b.reason = f"recovering ({b.good_checks}/{self._readmit_after} good checks)"
        else:
            b.good_checks = 0
            in_grace = time.monotonic() - self._pool.started < self._settings.startup_grace
            never_up = before is BackendState.LOADING
            b.state = BackendState.LOADING if (in_grace and never_up) else BackendState.DOWN
            b.reason = failure
            if models:
                b.models = models
        if b.state is not before or models_changed:
            self._on_change()  # e.g. let queued requests in now that a replica is ready
        if b.state is not before:
            log = self._log.info if b.state is BackendState.HEALTHY else self._log.warning
            log(
                "backend state changed",
                backend=b.label,
                state=b.state.value,
                was=before.value,
                reason=b.reason,
            )


_LOAD_SAMPLE = re.compile(
    rb"^(vllm:num_requests_waiting|vllm:num_requests_running|vllm:kv_cache_usage_perc)(?:\{[^}\n]*\})? (\S+)",
    re.MULTILINE,
)


def _load_samples(body: bytes) -> dict[bytes, list[float]]:
    """vLLM's load gauges in Prometheus text, one sample per engine, in one regex pass."""
    found: dict[bytes, list[float]] = {
        b"vllm:num_requests_waiting": [],
        b"vllm:num_requests_running": [],
        b"vllm:kv_cache_usage_perc": [],
    }
    for m in _LOAD_SAMPLE.finditer(body):
        try:
            found[m[1]].append(float(m[2]))
        except ValueError:
            continue
    return found
