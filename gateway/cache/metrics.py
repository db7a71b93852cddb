"""Cache metrics on the app's registry.

``gateway_cache_requests_total{endpoint,route,model,team,result}`` (result: hit, miss, bypass),
``gateway_cache_bypasses_total{reason}`` (never, nondeterministic, no_store, uncacheable,
unavailable), ``gateway_cache_saved_tokens_total{route,model,team,kind}`` (kind: prompt,
completion: what hits did not cost the GPU), ``gateway_cache_hit_seconds{endpoint}`` (a hit from
arrival to its answer sent), ``gateway_cache_fills_total`` and ``gateway_cache_errors_total``
(Redis calls that failed or timed out; each starts a ``retry_interval`` of bypasses).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from gateway.pipeline.exchange import Exchange

if TYPE_CHECKING:
    from gateway.cache.stage import Lookup

HIT_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry, teams: set[str], child: Callable[..., Any]) -> None:
        r = registry
        self._teams = teams
        self.requests = Counter(
            "gateway_cache_requests",
            "Cacheable requests by endpoint, route, model, team and result (hit, miss, bypass).",
            ["endpoint", "route", "model", "team", "result"],
            registry=r,
        )
        self.bypasses = Counter(
            "gateway_cache_bypasses", "Requests that skipped the cache, by reason.", ["reason"], registry=r
        )
        self.saved_tokens = Counter(
            "gateway_cache_saved_tokens",
            "Tokens served from the cache instead of a backend, by route, model, team and kind.",
            ["route", "model", "team", "kind"],
            registry=r,
        )
        self.hit_seconds = Histogram(
            "gateway_cache_hit_seconds",
            "Time from arrival to the answer sent, for cache hits.",
            ["endpoint"],
            buckets=HIT_BUCKETS,
            registry=r,
        )
        self.fills = Counter("gateway_cache_fills", "Answers stored in the cache.", registry=r)
        self.errors = Counter(
            "gateway_cache_errors", "Cache calls to Redis that failed or timed out.", registry=r
        )
        self._child = child  # GatewayMetrics.child: label children looked up once

    def record(self, ex: Exchange, look: Lookup, known_model: bool) -> None:
        if ex.cache is None:  # a stored answer the limits refused to serve: no one's hit
            return
        model = ex.model if known_model else "unknown"
        team = ex.principal.team
        team_label = "none" if team is None else team if team in self._teams else "other"
        self._child(self.requests, ex.endpoint, ex.route, model, team_label, look.status).inc()
        if look.reason is not None:
            self._child(self.bypasses, look.reason).inc()
        if look.status == "hit" and ex.status == 200:
            self._child(self.hit_seconds, ex.endpoint).observe(time.perf_counter() - ex.started)
            if ex.prompt_tokens:
                self._child(self.saved_tokens, ex.route, model, team_label, "prompt").inc(ex.prompt_tokens)
            if ex.completion_tokens:
                self._child(self.saved_tokens, ex.route, model, team_label, "completion").inc(
                    ex.completion_tokens
                )
