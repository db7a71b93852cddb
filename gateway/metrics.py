"""Prometheus metrics, on a registry owned by the app (no module-level collectors).

Label values are bounded: endpoint and stream are fixed sets, `model` only
takes names a backend listed (anything else becomes ``unknown``), status is
an HTTP code. Label children are cached so the hot path does one dict lookup
per metric instead of prometheus-client's label validation.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from gateway.backends import BackendPool, BackendState
from gateway.pipeline.admit import Admission

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class _BackendCollector(Collector):
    """Backend health and queue depth read at scrape time: nothing to update per request."""

    def __init__(self, pool: BackendPool, admission: Admission) -> None:
        self._pool = pool
        self._admission = admission

    def collect(self) -> Any:
        up = GaugeMetricFamily(
            "gateway_backend_up", "1 when the backend is healthy and lists its models.", labels=["backend"]
        )
        state = GaugeMetricFamily(
            "gateway_backend_state", "Backend state (1 for the current state).", labels=["backend", "state"]
        )
        outstanding = GaugeMetricFamily(
            "gateway_backend_outstanding_requests",
            "Requests the gateway has in flight to the backend.",
            labels=["backend"],
        )
        for b in self._pool.backends:
            up.add_metric([b.label], 1.0 if b.ready else 0.0)
            for s in BackendState:
                state.add_metric([b.label, s.value], 1.0 if b.state is s else 0.0)
            outstanding.add_metric([b.label], float(b.outstanding))
        breaker = GaugeMetricFamily(
            "gateway_backend_circuit_open",
            "1 when the backend's circuit breaker is open or half-open.",
            labels=["backend"],
        )
        breaker_state = GaugeMetricFamily(
            "gateway_backend_circuit_state",
            "Circuit-breaker state (1 for the current state).",
            labels=["backend", "state"],
        )
        for b in self._pool.backends:
            if b.breaker is not None:
                current = b.breaker.state
                breaker.add_metric([b.label], 0.0 if current == "closed" else 1.0)
                for st in ("closed", "open", "half-open"):
                    breaker_state.add_metric([b.label, st], 1.0 if current == st else 0.0)
        depth = GaugeMetricFamily(
            "gateway_queue_depth",
            "Requests waiting for pool capacity, by model and priority (scale on this).",
            labels=["model", "priority"],
        )
        # Every served model and every configured priority, zeros included: an idle gateway
        # reports 0, not nothing, so sums and alerts on it stay defined.
        models = sorted({m for b in self._pool.backends for m in b.models})
        for model, priority, n in self._admission.snapshot(models):
            depth.add_metric([model, str(priority)], float(n))
        pool_in_flight = GaugeMetricFamily(
            "gateway_pool_in_flight", "Admitted requests in flight per pool.", labels=["model"]
        )
        capacity = GaugeMetricFamily(
            "gateway_pool_capacity", "Sum of max_in_flight of the pool's ready replicas.", labels=["model"]
        )
        vllm = {
            name: GaugeMetricFamily(
                f"gateway_backend_{name}",
                f"The replica's own vllm:{name}, from the background scrape.",
                labels=["backend"],
            )
            for name in ("num_requests_waiting", "num_requests_running", "kv_cache_usage_perc")
        }
        for b in self._pool.backends:
            vllm["num_requests_waiting"].add_metric([b.label], b.vllm_waiting)
            vllm["num_requests_running"].add_metric([b.label], b.vllm_running)
            vllm["kv_cache_usage_perc"].add_metric([b.label], b.kv_usage)
        yield from vllm.values()
        for model in models:
            q = self._admission.queues.get(model)
            pool_in_flight.add_metric([model], float(q.in_flight if q is not None else 0))
            capacity.add_metric([model], float(self._admission.capacity(model)))
        yield up
        yield state
        yield outstanding
        yield breaker
        yield breaker_state
        yield depth
        yield pool_in_flight
        yield capacity


class GatewayMetrics:
    def __init__(self, pool: BackendPool, admission: Admission, multiprocess_dir: str | None = None) -> None:
        # With several workers (`--workers N`) prometheus-client's multiprocess mode keeps each
        # worker's values in files under `multiprocess_dir`; a scrape of any worker sums them all.
        self._multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "gateway_requests",
            "Requests handled, by endpoint, model, route, backend, HTTP status and streaming.",
            ["endpoint", "model", "route", "backend", "status", "stream"],
            registry=r,
        )
        self.errors = Counter(
            "gateway_errors", "Failed requests by reason.", ["endpoint", "reason"], registry=r
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "End-to-end request duration as seen by the gateway.",
            ["endpoint", "stream"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "Time from request arrival to the first streamed event sent to the client.",
            ["endpoint", "model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "gateway_inter_token_latency_seconds",
            "Time between two streamed events sent to the client.",
            ["endpoint"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.upstream_ttft = Histogram(
            "gateway_upstream_time_to_first_token_seconds",
            "Time from sending the request upstream to vLLM's first event (plain: its response).",
            ["endpoint", "stream"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "Time spent inside the gateway: total minus upstream time minus queue wait.",
            ["endpoint", "stream"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "gateway_prompt_tokens",
            "Prompt tokens, from vLLM's usage, by model and team (unconfigured teams: other).",
            ["model", "team"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "gateway_completion_tokens",
            "Completion tokens, from vLLM's usage, by model and team (unconfigured teams: other).",
            ["model", "team"],
            registry=r,
        )
        self.tokens_charged = Counter(
            "gateway_ratelimit_tokens_charged",
            "Tokens charged against token budgets once a request was settled, by team.",
            ["team"],
            registry=r,
        )
        self.rate_limited = Counter(
            "gateway_ratelimit_rejections",
            "Requests refused by a limit, by kind (requests, tokens, concurrent, queue) and scope.",
            ["kind", "scope"],
            registry=r,
        )
        self.build_info = Gauge(
            "gateway_build_info",
            "Version and configuration hash of this gateway.",
            ["version", "config_hash"],
            registry=r,
            multiprocess_mode="max",
        )
        self.in_flight = Gauge(
            "gateway_requests_in_flight",
            "Proxied requests in progress.",
            ["endpoint"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.limit_storage_errors = Counter(
            "gateway_ratelimit_storage_errors",
            "Rate-limit storage (Redis) calls that failed or timed out.",
            registry=r,
        )
        self.fallbacks = Counter(
            "gateway_fallbacks",
            "Requests served by the external provider, by the local failure that caused it.",
            ["reason"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "gateway_queue_wait_seconds",
            "Time requests waited for pool capacity.",
            ["model", "priority"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 180),
            registry=r,
        )
        self._collector = _BackendCollector(pool, admission)
        r.register(self._collector)
        self._cache: dict[tuple[Any, ...], Any] = {}
        self._extra: list[Any] = []

    def add_collector(self, collector: Any) -> None:
        """A collector of this process's view (like the backends'), shown by every scrape."""
        self.registry.register(collector)
        self._extra.append(collector)

    def child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        c = self._cache.get(key)
        if c is None:
            c = self._cache[key] = metric.labels(*labels)
        return c

    def count_limit_storage_error(self) -> None:
        self.limit_storage_errors.inc()

    def render(self) -> bytes:
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        # Counters and histograms summed over every worker; backend health and queues are this
        # worker's view (each worker polls the backends itself).
        combined = CollectorRegistry()
        MultiProcessCollector(combined, path=self._multiprocess_dir)  # type: ignore[no-untyped-call]
        combined.register(self._collector)
        for c in self._extra:
            combined.register(c)
        return generate_latest(combined)

    def worker_exit(self) -> None:
        if self._multiprocess_dir is not None:
            mark_process_dead(os.getpid(), self._multiprocess_dir)  # type: ignore[no-untyped-call]
