"""The ledger writer's Prometheus metrics, on the app's registry (docs/ledger.md lists them)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class LedgerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.written = Counter(
            "gateway_ledger_rows_written", "Ledger rows committed to PostgreSQL from the buffer.", registry=r
        )
        self.spooled = Counter(
            "gateway_ledger_rows_spooled",
            "Ledger rows written to the local spool (PostgreSQL down or slow).",
            registry=r,
        )
        self.replayed = Counter(
            "gateway_ledger_rows_replayed",
            "Spooled ledger rows committed to PostgreSQL (duplicates of a repeated replay included).",
            registry=r,
        )
        self.dropped = Counter(
            "gateway_ledger_rows_dropped",
            "Ledger rows lost: the buffer was full, or the spool could not be written or read back.",
            registry=r,
        )
        self.buffered = Gauge(
            "gateway_ledger_buffer_rows",
            "Rows waiting in the in-memory buffer (as of the last flush).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.up = Gauge(
            "gateway_ledger_up",
            "1 while the ledger writer has a working PostgreSQL connection.",
            registry=r,
            multiprocess_mode="livemin",
        )
