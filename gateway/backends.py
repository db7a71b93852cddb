"""Backends (vLLM replicas) and the pool the router picks from.

State here is written by the health poller and by the proxy (outstanding
request counts); it lives on the app's lifespan-owned ``BackendPool``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gateway.breaker import ReplicaBreaker
from gateway.config import BackendSettings, ResilienceSettings


class BackendState(StrEnum):
    LOADING = "loading"  # not answering yet, still inside the start-up grace period
    HEALTHY = "healthy"
    DOWN = "down"


@dataclass(slots=True)
class Backend:
    settings: BackendSettings
    label: str
    url: str
    auth_header: str | None
    state: BackendState = BackendState.LOADING
    reason: str = "not checked yet"
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_check: float | None = None  # wall clock, for /health
    last_latency: float | None = None
    outstanding: int = 0
    good_checks: int = 0  # consecutive successful health checks
    vllm_waiting: float = 0.0  # vllm:num_requests_waiting from the last scrape
    vllm_running: float = 0.0
    kv_usage: float = 0.0  # vllm:kv_cache_usage_perc (0..1) from the last scrape
    breaker: ReplicaBreaker | None = None

    @classmethod
    def from_settings(cls, s: BackendSettings, r: ResilienceSettings) -> Backend:
        auth = f"Bearer {s.api_key.get_secret_value()}" if s.api_key else None
        breaker = ReplicaBreaker(s.label, r.breaker_fail_max, r.breaker_reset_seconds, r.half_open_trials)
        return cls(settings=s, label=s.label, url=s.url, auth_header=auth, breaker=breaker)

    @property
    def ready(self) -> bool:
        if self.state is not BackendState.HEALTHY or not self.models:
            return False
        return all(m in self.models for m in self.settings.models)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.label,
            "url": self.url,
            "state": self.state.value,
            "ready": self.ready,
            "reason": self.reason,
            "models": sorted(self.models),
            "last_check": self.last_check,
            "latency_seconds": self.last_latency,
            "outstanding": self.outstanding,
            "breaker": self.breaker.state if self.breaker is not None else None,
            "vllm": {
                "waiting": self.vllm_waiting,
                "running": self.vllm_running,
                "kv_cache_usage": self.kv_usage,
            },
        }


class BackendPool:
    def __init__(
        self,
        settings: list[BackendSettings],
        resilience: ResilienceSettings,
        recheck_seconds: float = 2.0,
    ) -> None:
        self.backends = [Backend.from_settings(s, resilience) for s in settings]
        self.turn = 0  # round-robin offset for ties in load
        self.started = time.monotonic()
        self.recheck_seconds = recheck_seconds  # the health poller's interval
        self.readmit_after = resilience.readmit_after

    def retry_after(self, model: str) -> int:
        """Whole seconds until a request for ``model`` may succeed, for Retry-After (RFC 9110 §10.2.3).

        A ready replica: 1 (it is busy or was just tried); a loading one: the next health check;
        a down one: the good checks it still needs to be re-admitted. Never below 1.
        """
        best: float | None = None
        for b in self.backends:
            if not (model in b.models or model in b.settings.models or not (b.models or b.settings.models)):
                continue  # serves other models only
            if b.ready:
                wait = 1.0
            elif b.state is BackendState.DOWN:
                wait = self.recheck_seconds * max(1, self.readmit_after - b.good_checks)
            else:
                wait = self.recheck_seconds
            best = wait if best is None else min(best, wait)
        return max(1, math.ceil(best if best is not None else self.recheck_seconds))

    def ready_backends(self) -> list[Backend]:
        return [b for b in self.backends if b.ready]

    @property
    def any_ready(self) -> bool:
        return any(b.ready for b in self.backends)

    def model_cards(self) -> list[dict[str, Any]]:
        """The union of the models ready backends list, vLLM's cards as they came."""
        seen: dict[str, dict[str, Any]] = {}
        for b in self.backends:
            if b.ready:
                for name, card in b.models.items():
                    seen.setdefault(name, card)
        return list(seen.values())

    def context_tokens(self, model: str) -> int:
        """The largest ``max_model_len`` a replica lists for ``model`` (vLLM's card), or 0 when
        none says (another server, or not polled yet)."""
        best = 0
        for b in self.backends:
            card = b.models.get(model)
            if card is not None:
                n = card.get("max_model_len")
                if type(n) is int and n > best:
                    best = n
        return best

    def known_model(self, model: str) -> bool:
        """A replica lists it, or a backend is configured to serve it (and may still be loading)."""
        return any(model in b.models or model in b.settings.models for b in self.backends)

    def cold_for(self, model: str) -> bool:
        """No ready replica serves `model`, but one that may serve it is still loading."""
        if any(b.ready and model in b.models for b in self.backends):
            return False
        return any(
            b.state is BackendState.LOADING and (not b.settings.models or model in b.settings.models)
            for b in self.backends
        )
