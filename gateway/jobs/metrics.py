"""Job metrics: counters kept as lines finish, gauges from the sweeper's last look at Redis.

``gateway_jobs_pending{model}`` (lines waiting in the queue, all replicas), ``gateway_jobs_running
{model}`` (lines held by workers), ``gateway_jobs_oldest_pending_seconds{model}``,
``gateway_batches{status}`` (batches not yet expired from Redis, by status), and the counters
``gateway_job_lines_total{outcome}`` (completed, failed, dead_lettered, expired) and
``gateway_job_deliveries_total{kind}`` (first, retry, reclaimed). The gauges are the same in
every replica (they read the shared queue): aggregate them with ``max``, not ``sum``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

OUTCOMES = ("completed", "failed", "dead_lettered", "expired")


class JobsSnapshot:
    """What the sweeper last read from the queue (one replica's view of the shared queue)."""

    def __init__(self) -> None:
        self.pending: dict[str, int] = {}
        self.running: dict[str, int] = {}
        self.oldest: dict[str, float] = {}  # model → age in seconds of its oldest waiting line
        self.batches: dict[str, int] = {}


class JobsCollector(Collector):
    def __init__(self, snap: JobsSnapshot) -> None:
        self._snap = snap

    def collect(self) -> Iterator[Any]:
        s = self._snap
        pending = GaugeMetricFamily(
            "gateway_jobs_pending", "Job lines waiting in the durable queue, by model.", labels=["model"]
        )
        running = GaugeMetricFamily(
            "gateway_jobs_running", "Job lines held by a worker, by model.", labels=["model"]
        )
        oldest = GaugeMetricFamily(
            "gateway_jobs_oldest_pending_seconds",
            "Age of the oldest job line waiting in the queue, by model (0: none waiting).",
            labels=["model"],
        )
        for model in sorted({*s.pending, *s.running}):
            pending.add_metric([model], float(s.pending.get(model, 0)))
            running.add_metric([model], float(s.running.get(model, 0)))
            oldest.add_metric([model], float(s.oldest.get(model, 0.0)))
        batches = GaugeMetricFamily("gateway_batches", "Batches kept in Redis, by status.", labels=["status"])
        for status in (
            "validating",
            "in_progress",
            "finalizing",
            "completed",
            "failed",
            "expired",
            "cancelling",
            "cancelled",
        ):
            batches.add_metric([status], float(s.batches.get(status, 0)))
        yield pending
        yield running
        yield oldest
        yield batches


class JobsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.snapshot = JobsSnapshot()
        self.collector = JobsCollector(self.snapshot)
        self.lines = Counter(
            "gateway_job_lines", "Job lines finished, by outcome.", ["outcome"], registry=registry
        )
        self.deliveries = Counter(
            "gateway_job_deliveries",
            "Job lines taken by this replica's workers: first delivery, retry after a failure, or "
            "reclaimed from a worker that vanished.",
            ["kind"],
            registry=registry,
        )
        for o in OUTCOMES:
            self.lines.labels(o)
        for k in ("first", "retry", "reclaimed"):
            self.deliveries.labels(k)
