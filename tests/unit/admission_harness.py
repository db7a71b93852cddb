"""Requests through admit → route → a replica → release, in-process, as ``proxy._admit_and_forward``
runs them: the real ``Admission``, ``choose_backend`` and ``on_backend`` (which counts the request on
its replica and tells the breaker its outcome), over a real ``BackendPool`` whose replicas are marked
healthy as the health poller would. Only the HTTP exchange is replaced by waiting for ``finish()``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from gateway.backends import Backend, BackendPool, BackendState
from gateway.config import AdmissionSettings, BackendSettings, ResilienceSettings
from gateway.errors import Fault, GatewayError, UpstreamError
from gateway.pipeline.admit import Admission
from gateway.pipeline.attempt import on_backend
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.route import choose_backend

FAR = 1e9  # a request deadline that never comes first (loop time)


def pool_of(
    *replicas: tuple[int, tuple[str, ...]],
    fail_max: int = 1,
    reset: float = 30.0,
    trials: int = 1,
) -> BackendPool:
    """One healthy replica per (max_in_flight, served models)."""
    settings = [
        BackendSettings(url=f"http://10.0.0.{i}:8000", max_in_flight=n) for i, (n, _) in enumerate(replicas)
    ]
    pool = BackendPool(
        settings,
        ResilienceSettings(breaker_fail_max=fail_max, breaker_reset_seconds=reset, half_open_trials=trials),
    )
    for b, (_, models) in zip(pool.backends, replicas, strict=True):
        b.state, b.models = BackendState.HEALTHY, {m: {"id": m} for m in models}
    return pool


def admission_for(pool: BackendPool, tiers: dict[str, int] | None = None, **settings: float) -> Admission:
    adm = Admission(pool, AdmissionSettings(**settings), tiers or {})
    for b in pool.backends:  # the wiring gateway/app.py does
        if b.breaker is not None:
            b.breaker.on_available = adm.dispatch
    return adm


def eject(b: Backend) -> None:
    """Open the replica's breaker with one backend failure (pools are built with fail_max 1)."""
    assert b.breaker is not None
    b.breaker.leave(b.breaker.enter(), Fault.BACKEND, True, "upstream_error")
    assert b.breaker.state == "open"


async def settle() -> None:
    """Let every task that can run, run (waiters enqueue, granted ones wake and route)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def until(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll ``cond`` on the running loop until it holds; AssertionError after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.005)


class Request:
    """One request for ``model``: queued until admitted, then held on its replica until ``finish()``."""

    def __init__(
        self,
        adm: Admission,
        pool: BackendPool,
        model: str,
        tier: str | None = None,
        team: str | None = None,
        order: list[str] | None = None,
        name: str = "",
    ) -> None:
        self.adm, self.pool, self.model = adm, pool, model
        self.tier, self.team = tier, team
        self.order, self.name = order, name
        self.backend: Backend | None = None
        self.error: GatewayError | None = None
        self._finish = asyncio.Event()
        self._fail = False
        self.task = asyncio.create_task(self._run())

    @property
    def routed(self) -> bool:
        return self.backend is not None

    @property
    def over(self) -> bool:
        """Routed to a replica or refused: whatever happens, it no longer waits."""
        return self.backend is not None or self.error is not None

    def finish(self, failed: bool = False) -> None:
        """End the exchange: a success, or (``failed``) a backend error the breaker counts."""
        self._fail = failed
        self._finish.set()

    async def _run(self) -> None:
        try:
            q = await self.adm.admit(self.model, self.tier, self.team, FAR)
        except GatewayError as exc:
            self.error = exc
            return
        try:
            try:
                backend = choose_backend(self.pool, self.model)
            except GatewayError as exc:
                self.error = exc
                return
            with on_backend(backend, Exchange("rid", "chat", 0.0)):
                self.backend = backend
                if self.order is not None:
                    self.order.append(self.name)
                await self._finish.wait()
                if self._fail:
                    raise UpstreamError("simulated backend failure")
        except UpstreamError:
            pass
        finally:
            self.adm.release(q, 0.1)

    async def done(self, failed: bool = False) -> None:
        self.finish(failed)
        await self.task


async def start(
    adm: Admission,
    pool: BackendPool,
    model: str,
    tier: str | None = None,
    team: str | None = None,
    order: list[str] | None = None,
    name: str = "",
) -> Request:
    """A request started and run as far as it can go now (routed, or queued)."""
    r = Request(adm, pool, model, tier, team, order, name)
    await settle()
    return r
