"""The ``ledger`` and ``pricing`` settings sections (docs/ledger.md)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LedgerSettings(_Section):
    dsn: str = Field(
        description=(
            "PostgreSQL to write to: `postgresql://user@host:port/database` (libpq URL, no password: "
            "give it with `password_env` or `password_file`, or libpq's own `PGPASSWORD`)."
        ),
    )
    password_env: str | None = Field(
        None, description="Name of the environment variable holding the database password."
    )
    password_file: Path | None = Field(
        None, description="File holding the database password (trailing newline ignored)."
    )
    schema_name: str = Field(
        "ledger",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="PostgreSQL schema holding the ledger's tables (created by the migrations).",
    )
    flush_interval: float = Field(
        0.25, gt=0, le=60, description="Seconds between flushes of the in-memory buffer (at most)."
    )
    batch_rows: int = Field(
        2000, ge=1, le=100_000, description="Rows per COPY; a buffer this full is flushed at once."
    )
    max_buffer_rows: int = Field(
        100_000,
        ge=1,
        description=(
            "Rows the in-memory buffer holds at most. Beyond it a row is dropped and counted in "
            "`gateway_ledger_rows_dropped_total` (only when the spool cannot keep up with the traffic)."
        ),
    )
    write_timeout: float = Field(
        5.0,
        gt=0,
        description=(
            "Seconds one batch may take to reach PostgreSQL; a slower one goes to the spool and "
            "PostgreSQL is treated as down until a probe succeeds."
        ),
    )
    retry_interval: float = Field(
        2.0, gt=0, description="Seconds between reconnection attempts while PostgreSQL is down."
    )
    spool_dir: Path = Field(
        Path("./.data/ledger-spool"),
        description=(
            "Directory of the append-only spool: batches that could not be written while PostgreSQL "
            "was down or slow (fsynced per batch), replayed when it returns or at the next start. "
            "Keep it on a persistent volume; several processes may share it."
        ),
    )
    retention_days: int = Field(
        90, ge=1, description="Days of per-request rows kept; older daily partitions are dropped."
    )
    rollup_retention_days: int = Field(
        800, ge=1, description="Days of the hourly rollup kept (usage and cost queries)."
    )
    partitions_ahead: int = Field(
        7, ge=1, le=366, description="Daily partitions created ahead of today (UTC)."
    )
    auto_migrate: bool = Field(
        False,
        description=(
            "Apply the schema migrations at start-up (under a PostgreSQL advisory lock, so replicas "
            "starting together take turns). Otherwise run `llm-gateway db upgrade` before."
        ),
    )

    @field_validator("dsn")
    @classmethod
    def _check_dsn(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("use a postgresql://user@host:port/database URL")
        # libpq and asyncpg also take the password from the query string (`?password=`).
        in_query = any(k.lower() == "password" for k, _ in parse_qsl(parts.query, keep_blank_values=True))
        if parts.password or in_query:
            raise ValueError("no password in the DSN: use `password_env` or `password_file`")
        return v

    @model_validator(mode="after")
    def _one_password_source(self) -> LedgerSettings:
        if self.password_env is not None and self.password_file is not None:
            raise ValueError("give at most one of `password_env` or `password_file`")
        return self

    def password(self) -> str | None:
        """The database password from ``password_env`` or ``password_file`` (None: libpq's defaults).

        Raises ValueError when the variable is unset or the file unreadable (start-up stops with it).
        """
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ValueError(f"ledger.password_env: the variable {self.password_env} is not set")
            return value
        if self.password_file is not None:
            try:
                return self.password_file.read_text().rstrip("\r\n")
            except OSError as exc:
                raise ValueError(f"ledger.password_file: {exc.strerror}") from None
        return None

    def safe_dsn(self) -> str:
        """The DSN for logs (it never holds a password; the validator refuses one)."""
        return self.dsn


class ModelPrice(_Section):
    prompt_per_million: float = Field(0.0, ge=0, description="USD per million prompt tokens.")
    completion_per_million: float | None = Field(
        None,
        ge=0,
        description=(
            "USD per million completion tokens (or derive it from `gpu_hour` and `tokens_per_second`)."
        ),
    )
    gpu_hour: float | None = Field(
        None, ge=0, description="Local models: USD per GPU-hour of the replica serving it."
    )
    tokens_per_second: float | None = Field(
        None,
        gt=0,
        description=(
            "Local models: completion tokens per second one GPU generates (measured, all sequences "
            "together); with `gpu_hour` gives the completion price."
        ),
    )

    @model_validator(mode="after")
    def _one_way(self) -> ModelPrice:
        derived = self.gpu_hour is not None or self.tokens_per_second is not None
        if derived and (self.gpu_hour is None or self.tokens_per_second is None):
            raise ValueError("`gpu_hour` and `tokens_per_second` go together")
        if derived and self.completion_per_million is not None:
            raise ValueError("give `completion_per_million` or `gpu_hour` + `tokens_per_second`, not both")
        return self

    @property
    def completion_usd_per_million(self) -> float:
        """USD per million completion tokens, given or derived from the GPU-hour price."""
        if self.completion_per_million is not None:
            return self.completion_per_million
        if self.gpu_hour is not None and self.tokens_per_second is not None:
            return self.gpu_hour / (self.tokens_per_second * 3600.0) * 1e6
        return 0.0


class BudgetSettings(_Section):
    monthly_usd: float | None = Field(
        None, gt=0, description="USD that may be spent per calendar month (UTC), from the ledger's costs."
    )
    monthly_tokens: int | None = Field(
        None, ge=1, description="Prompt + completion tokens that may be used per calendar month (UTC)."
    )
    soft: float = Field(
        0.8,
        gt=0,
        le=1,
        description=(
            "Fraction of the budget at which `gateway_budget_used_ratio` reaches "
            "`gateway_budget_soft_ratio` (the alert rule's threshold); requests still pass. Team "
            "budgets only: a principal's has no per-subject metric."
        ),
    )

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetSettings:
        if self.monthly_usd is None and self.monthly_tokens is None:
            raise ValueError("give `monthly_usd` and/or `monthly_tokens`")
        return self
