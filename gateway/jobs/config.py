"""The ``jobs`` settings section (docs/jobs.md)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.redis_url import check_redis_url


class JobsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        False,
        description=(
            "Serve the Files and Batch APIs and `Prefer: respond-async` jobs, and run job workers in "
            "every replica. Needs `queue` (Redis)."
        ),
    )
    queue: str = Field(
        "redis://127.0.0.1:6379/0",
        description=(
            "The durable queue and the job records: a `redis://` or `rediss://` URL (Redis Streams "
            "with consumer groups; one Redis server or primary, ElastiCache works)."
        ),
    )

    @field_validator("queue")
    @classmethod
    def _check_queue(cls, v: str) -> str:
        return check_redis_url(v)

    key_prefix: str = Field(
        "llmgw:jobs:",
        min_length=1,
        description="Prefix of every Redis key the jobs use (several gateways may share one Redis).",
    )
    files: str = Field(
        "file://./.data/files",
        description=(
            "Where uploaded and produced files live: `file:///path` (one node, or a shared volume) "
            "or `s3://bucket/prefix` (several replicas; credentials from the standard AWS chain)."
        ),
    )
    max_file_bytes: int = Field(
        200 * 1024 * 1024, ge=1, description="Largest upload to `POST /v1/files`, in bytes."
    )
    max_file_lines: int = Field(50_000, ge=1, description="Most lines in a batch input file.")
    max_stored_bytes: int = Field(
        10 * 1024**3,
        ge=1,
        description=(
            "Bytes of files one principal may keep (uploads and the output and error files of its "
            "batches, until deleted or expired). An upload past it is refused, 429 "
            "`storage_quota_exceeded`; a batch's own output is never refused, but counts."
        ),
    )
    max_files: int = Field(
        10_000, ge=1, description="Files one principal may keep (counted as `max_stored_bytes`)."
    )
    max_active_batches: int = Field(
        10,
        ge=1,
        description=(
            "Batches one principal may have not yet ended (validating, in progress, finalizing, "
            "cancelling); one more is refused, 429 `too_many_active_batches` with `Retry-After`. "
            "A batch's lines wait in Redis, so this bounds one principal's share of Redis' "
            "memory (about `max_active_batches` times `max_file_bytes`) and of the queue."
        ),
    )
    max_active_jobs: int = Field(
        1000,
        ge=1,
        description=(
            "`Prefer: respond-async` jobs one principal may have queued or running; one more is "
            "refused, 429 `too_many_active_jobs` with `Retry-After` (Redis holds each one's body: "
            "at most `max_active_jobs` times `server.max_body_bytes` per principal)."
        ),
    )
    visibility_timeout: float = Field(
        300.0,
        gt=0,
        description=(
            "Seconds a line may stay with a worker without progress before another worker reclaims "
            "it (a worker that died). Longer than the slowest generation (`timeouts.total`)."
        ),
    )
    max_deliveries: int = Field(
        5,
        ge=1,
        description=(
            "Times a line is delivered (retries after worker loss or backend failure) before it is "
            "dead-lettered and written to the batch's error file."
        ),
    )
    concurrency: int = Field(4, ge=1, le=1024, description="Lines one gateway replica runs at once.")
    retention: float = Field(
        7 * 86400.0,
        ge=1,
        description="Seconds finished batches, jobs and their files are kept after completion.",
    )
    tier: str | None = Field(
        None,
        description=(
            "Rate-limit tier that batch lines are charged under (none: the submitter's own tier). "
            "Job lines are admitted at a priority below every interactive tier."
        ),
    )
