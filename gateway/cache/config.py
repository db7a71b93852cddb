"""The ``cache`` settings section (docs/cache.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.redis_url import check_redis_url

When = Literal["deterministic", "always", "never"]


class CacheRouteSettings(BaseModel):
    """What one route (a task type, or ``default``) changes of the cache's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    when: When | None = Field(None, description="Overrides `cache.when` for this route.")
    ttl: float | None = Field(None, gt=0, description="Overrides `cache.ttl` for this route, in seconds.")
    max_entry_bytes: int | None = Field(
        None, ge=1, description="Overrides `cache.max_entry_bytes` for this route."
    )


class CacheSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    storage: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Where entries live: a `redis://` or `rediss://` URL (one server or a primary).",
    )

    @field_validator("storage")
    @classmethod
    def _check_storage(cls, v: str) -> str:
        return check_redis_url(v)

    key_prefix: str = Field(
        "llmgw:cache:", min_length=1, description="Prefix of every Redis key and channel the cache uses."
    )
    ttl: float = Field(3600.0, gt=0, description="Seconds an entry is kept.")
    scope: Literal["team", "principal", "global"] = Field(
        "team",
        description=(
            "Who shares entries: the principal's team (default; a principal without a team is its own "
            "scope), each principal alone, or everyone (only for data every caller may see)."
        ),
    )
    when: When = Field(
        "deterministic",
        description=(
            "Which requests are cached: `deterministic` (`temperature: 0` or a `seed`; embeddings "
            "always), `always`, or `never`."
        ),
    )
    max_entry_bytes: int = Field(
        1024 * 1024, ge=1, description="Largest answer stored, in bytes (larger ones are served, not kept)."
    )
    timeout: float = Field(
        0.1,
        gt=0,
        description=(
            "Seconds one cache call to Redis may take before the request goes on without the cache "
            "(a bypass). After a failure the cache is skipped for `retry_interval` seconds."
        ),
    )
    retry_interval: float = Field(
        5.0, gt=0, description="Seconds the cache is skipped after Redis failed or was slow."
    )
    single_flight_wait: float = Field(
        30.0,
        ge=0,
        description=(
            "Seconds an identical request waits for the one already asking the backend (on any "
            "replica) before asking itself; 0 turns single flight off."
        ),
    )
    charge_tokens: bool = Field(
        False,
        description=(
            "Whether a hit consumes tokens from `tokens_per_minute` limits (it always counts as a "
            "request for `requests_per_minute`)."
        ),
    )
    connections: int = Field(
        2,
        ge=1,
        le=64,
        description=(
            "Pipelined Redis connections per gateway process for lookups and fills (each carries "
            "many calls at once)."
        ),
    )
    routes: dict[str, CacheRouteSettings] = Field(
        default_factory=dict,
        description="Per-route overrides by route name (a task type of `routing.routes`, or `default`).",
    )
    model_versions: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "A version per served model, part of every key: change it to drop a model's entries. "
            "Unset: the `root` vLLM reports in `/v1/models` (the weights' path), so a rollout of new "
            "weights invalidates by itself."
        ),
    )
