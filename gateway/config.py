"""The gateway's one typed configuration tree.

Sources, highest priority first: explicit overrides (CLI flags), ``GATEWAY_``
environment variables (nested keys joined by ``__``, e.g.
``GATEWAY_TIMEOUTS__CONNECT=2``), the YAML config file, then defaults.
Nothing else in the code base reads environment variables for configuration.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from gateway.cache.config import CacheSettings
from gateway.config_auth import AuthSettings, LimitValues, RateLimitSettings, TeamSettings
from gateway.config_routing import ExternalSettings, RoutingSettings
from gateway.jobs.config import JobsSettings
from gateway.ledger.config import LedgerSettings, ModelPrice

DEFAULT_BACKEND = "http://127.0.0.1:8000"
# streaming.max_response_bytes: also the bound of UpstreamResponse.read() when no limit is passed.
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8080, ge=1, le=65535, description="Port to listen on.")
    workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes.")
    max_body_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="Largest request body accepted; larger bodies get 413.",
    )
    allow_unauthenticated: bool = Field(
        False,
        description=(
            "Serve without authentication on a non-loopback address. Without auth configured the "
            "gateway refuses to bind anything but loopback unless this is true."
        ),
    )
    drain_seconds: float = Field(
        30.0,
        ge=0,
        description=(
            "On SIGTERM, how long in-flight requests may run. Those still running then are ended by "
            "the gateway: 503 `shutting_down` with Retry-After before the response started, a final "
            "SSE error event and `data: [DONE]` in a started stream (vLLM's connection closed); the "
            "process exits about a second later."
        ),
    )
    max_header_bytes: int = Field(
        64 * 1024,
        ge=1024,
        le=16 * 1024 * 1024,
        description=(
            "Largest request head (request line and headers) accepted; a larger one is answered 431 "
            "and the connection closed. Bounds the memory a connection holds before authentication."
        ),
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description=(
            "Seconds a client has to send a whole request head, from its first byte (or from "
            "connecting); then 408 and the connection is closed (slowloris)."
        ),
    )
    body_timeout: float = Field(
        60.0,
        gt=0,
        description=(
            "Seconds a client has to send a whole request body once its head has arrived; then the "
            "connection is closed."
        ),
    )
    max_connections: int = Field(
        4096,
        ge=1,
        description=(
            "Open client connections per worker process; one more is answered 503 (Retry-After: 1) "
            "and closed at once. Counts idle keep-alive connections too."
        ),
    )


class BackendSettings(_Section):
    url: str = Field(description="Base URL of a vLLM OpenAI server, without /v1.")
    name: str | None = Field(None, description="Label for logs and metrics; defaults to host:port.")
    api_key: SecretStr | None = Field(
        None, description="Sent upstream as `Authorization: Bearer` (vLLM's --api-key)."
    )
    models: list[str] = Field(
        default_factory=list,
        description="Models this backend must list before it counts as ready (empty: any).",
    )
    max_in_flight: int = Field(
        256,
        ge=1,
        description="Requests sent to this replica at once (match vLLM's --max-num-seqs); more wait.",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        if v.endswith("/v1"):
            v = v[:-3]
        return v

    @property
    def label(self) -> str:
        return self.name or self.url.split("://", 1)[1]


class ValidationSettings(_Section):
    max_tokens_ceiling: int = Field(
        32768, ge=1, description="Largest max_tokens / max_completion_tokens a client may ask for."
    )
    max_n: int = Field(8, ge=1, description="Largest `n` (choices per request).")
    max_stop_sequences: int = Field(16, ge=1, description="Most entries allowed in `stop`.")
    max_prompts: int = Field(
        256,
        ge=1,
        description=(
            "Most prompts in one /v1/completions request (a `prompt` list; vLLM generates for "
            "each, and the token reservation counts every one)."
        ),
    )


class TimeoutSettings(_Section):
    connect: float = Field(5.0, gt=0, description="Seconds to open a connection to a backend.")
    first_byte: float = Field(
        120.0,
        gt=0,
        description=(
            "Seconds one attempt of a stream may wait for its first SSE event (each retry on "
            "another replica gets its own, never beyond `total`). A plain request's wait is the "
            "whole generation (vLLM sends its headers only when done), bounded by `total` alone."
        ),
    )
    idle: float = Field(
        60.0,
        gt=0,
        description=(
            "Seconds the backend may stay silent between two SSE events once a stream has "
            "started (time spent writing to the client does not count)."
        ),
    )
    client_write: float = Field(
        30.0,
        gt=0,
        description=(
            "Seconds a write to a streaming client may stay blocked (the client is not reading) "
            "before the gateway closes the connection (reason `client_slow`, never held against "
            "the backend)."
        ),
    )
    total: float = Field(
        600.0,
        gt=0,
        description="Seconds a whole request may take, queueing and retries included; never retried after.",
    )


class StreamingSettings(_Section):
    heartbeat_interval: float = Field(
        10.0,
        ge=0,
        description=(
            "Send an SSE comment `: keep-alive` when no event was sent for this many seconds "
            "while waiting for the first token (0 disables). A stream's response starts with its "
            "first token or its first heartbeat: until then a late first token (`first_byte`) "
            "is retried on another replica, after it not."
        ),
    )
    max_event_bytes: int = Field(
        8 * 1024 * 1024,
        ge=64 * 1024,
        description=(
            "Largest SSE event (bytes) the gateway holds while waiting for its end; a backend that "
            "sends a longer one gets its stream ended with an `upstream_event_too_large` error "
            "event. vLLM's largest legitimate events are the first chunk with `return_token_ids` "
            "(about 7 bytes per prompt token: under 1 MiB at 128k context) and chunks with "
            "`top_logprobs: 20` (about 1.5 KiB per token, several tokens when vLLM merges outputs "
            "for a slow reader): 8 MiB leaves room for both; raise it for million-token contexts."
        ),
    )
    max_response_bytes: int = Field(
        DEFAULT_MAX_RESPONSE_BYTES,
        ge=64 * 1024,
        description=(
            "Largest non-streamed answer (bytes) the gateway reads from a backend or the external "
            "provider; past it the gateway stops reading, closes that connection and answers 502 "
            "`upstream_response_too_large` (blamed on the backend, not retried). Error bodies are "
            "read only up to 64 KiB (for their message), health polls up to 4 MiB. The largest "
            "legitimate answers are embeddings: 2,048 inputs of 4,096 dimensions are 43 MiB as "
            "`base64`, and 2,048 of 1,024 dimensions 42 MiB as floats (~21 bytes per float); 64 "
            "MiB fits both, and 32,768 tokens with `top_logprobs: 20` (~1.5 KiB per token). Raise "
            "it for float embeddings of many large vectors (2,048 of 4,096 dimensions: 172 MiB)."
        ),
    )


class HealthSettings(_Section):
    interval: float = Field(2.0, gt=0, description="Seconds between background /health polls.")
    timeout: float = Field(2.0, gt=0, description="Timeout of one health poll.")
    startup_grace: float = Field(
        600.0,
        ge=0,
        description=(
            "Seconds after start-up during which a backend that does not answer is reported as "
            "`loading` rather than `down` (vLLM only answers once its weights are loaded)."
        ),
    )


class ResilienceSettings(_Section):
    breaker_fail_max: int = Field(
        5,
        ge=1,
        description=(
            "Consecutive backend failures (5xx, connection errors, backend silence) that open a "
            "breaker; client-caused failures, 4xx and the total deadline never count."
        ),
    )
    breaker_reset_seconds: float = Field(
        30.0,
        gt=0,
        description=(
            "Seconds an open breaker waits before letting trial requests through. When every "
            "replica of a pool is open, requests are routed to them anyway (panic routing)."
        ),
    )
    half_open_trials: int = Field(1, ge=1, description="Trial requests at once while half-open.")
    retry_attempts: int = Field(
        2,
        ge=0,
        description=(
            "Extra attempts on other replicas, only before the first byte reaches the client: on "
            "connection errors, vLLM 503s and first-byte timeouts."
        ),
    )
    retry_budget_ratio: float = Field(
        0.2, ge=0, description="Retries may add at most this fraction of the request rate."
    )
    retry_backoff: float = Field(0.05, ge=0, description="Base of the jittered exponential backoff.")
    readmit_after: int = Field(
        2, ge=1, description="Consecutive good health checks before a down replica is used again."
    )


class AdmissionSettings(_Section):
    max_queue: int = Field(1000, ge=0, description="Requests that may wait per pool; more get 429.")
    queue_timeout: float = Field(
        30.0, gt=0, description="Seconds a request may wait for capacity before a 503."
    )
    cold_start_wait: float = Field(
        180.0,
        ge=0,
        description="Seconds a request may wait while no replica is ready (deploy, scale from zero).",
    )
    default_priority: int = Field(
        10, description="Priority of principals whose tier sets none (lower is served first)."
    )


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    format: Literal["json", "console"] = Field("json", description="json (default) or console.")
    access_log: bool = Field(True, description="One audit line per request.")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    server: ServerSettings = Field(
        default_factory=ServerSettings,
        description=(
            "The listener. Its own limits bound what one connection can cost before authentication: "
            "the request head's size (`max_header_bytes`) and time (`header_timeout`), the body's "
            "time (`body_timeout`) and the number of open connections (`max_connections`). They are "
            "per process and blind to who the client is, so exposed beyond a trusted network the "
            "gateway still needs an ingress or load balancer in front for what it cannot do: TLS, "
            "per-client connection and request-rate limits (otherwise one client can take every "
            "connection slot), a cap on the rate of new connections, and buffering of slow uploads. "
            "Without authentication it binds loopback only and refuses browser cross-site and DNS "
            "rebinding requests (a `Host` or `Origin` that is not loopback, or a body that is not "
            "`application/json`), on every path, the probes included."
        ),
    )
    backends: Annotated[list[BackendSettings], NoDecode] = Field(
        default_factory=lambda: [BackendSettings(url=DEFAULT_BACKEND)],
        description=(
            "vLLM servers. In env: GATEWAY_BACKENDS=url1,url2 (comma-separated URLs) or a JSON list."
        ),
    )
    validation: ValidationSettings = Field(default_factory=ValidationSettings)
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)
    streaming: StreamingSettings = Field(default_factory=StreamingSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    resilience: ResilienceSettings = Field(default_factory=ResilienceSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    external: ExternalSettings | None = Field(
        None,
        description=(
            "The external fallback provider. Reached with its own client (aiohttp) through the egress "
            "proxy, `external.proxy` or the standard `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` variables "
            "(~90 µs more CPU per request than the replicas' client, measured over loopback: nothing "
            "next to a provider's latency); the vLLM backends never go through a proxy. A provider's "
            "answer the gateway cannot read is a 502 (or the final SSE error event of a started "
            "stream) and counts against the provider's breaker; its 4xx are passed on in OpenAI's "
            "shape and do not."
        ),
    )
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    tiers: dict[str, LimitValues] = Field(
        default_factory=dict, description="Per-principal limits by tier name."
    )
    teams: dict[str, TeamSettings] = Field(
        default_factory=dict, description="Teams: allowed models, team-wide limits, tier overrides."
    )
    rate_limits: RateLimitSettings = Field(default_factory=RateLimitSettings)
    jobs: JobsSettings = Field(
        default_factory=JobsSettings,
        description="Async jobs: Files and Batch APIs, `Prefer: respond-async` (docs/jobs.md).",
    )
    cache: CacheSettings | None = Field(
        None,
        description=(
            "The response cache on Redis: exact-match answers, scoped per team, streams replayed, "
            "one upstream call for identical concurrent misses (docs/cache.md). None: off."
        ),
    )
    ledger: LedgerSettings | None = Field(
        None,
        description=(
            "The usage ledger: one PostgreSQL row per request with its cost, written in batches off "
            "the request path, spooled to disk while PostgreSQL is down (docs/ledger.md). None: off."
        ),
    )
    pricing: dict[str, ModelPrice] = Field(
        default_factory=dict,
        description=(
            "Prices by model name (or `provider/model` for an external provider's rate), used for the "
            "ledger's cost column when a row is written. A model without a price costs 0."
        ),
    )

    @model_validator(mode="after")
    def _secure_by_default(self) -> Settings:
        loopback = is_loopback(self.server.host)
        if not self.auth.enabled and not loopback and not self.server.allow_unauthenticated:
            raise ValueError(
                f"server.host is {self.server.host} but no authentication is configured: configure "
                "auth, bind a loopback address, or set server.allow_unauthenticated "
                "(--allow-unauthenticated)"
            )
        known = set(self.tiers)
        for name, team in self.teams.items():
            if team.limits.priority is not None:
                raise ValueError(f"teams.{name}.limits.priority: priorities are set on `tiers` only")
            for tier, values in team.tiers.items():
                if tier not in known:
                    raise ValueError(f"teams.{name}.tiers.{tier}: no such tier in `tiers`")
                if values.priority is not None:
                    raise ValueError(
                        f"teams.{name}.tiers.{tier}.priority: priorities are set on `tiers` only"
                    )
        if self.cache is not None:
            for route in self.cache.routes:
                if route != "default" and route not in self.routing.routes:
                    raise ValueError(
                        f"cache.routes.{route}: no such route (a task type of `routing.routes`, or `default`)"
                    )
        if self.auth.default_tier is not None and self.auth.default_tier not in known:
            raise ValueError(f"auth.default_tier: no such tier `{self.auth.default_tier}`")
        return self

    @field_validator("backends", mode="before")
    @classmethod
    def _parse_backends(cls, v: Any) -> Any:
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                import orjson

                return orjson.loads(text)
            v = [part for part in text.split(",") if part.strip()]
        if isinstance(v, (list, tuple)):
            return [{"url": item} if isinstance(item, str) else item for item in v]
        return v

    @field_validator("backends")
    @classmethod
    def _non_empty(cls, v: list[BackendSettings]) -> list[BackendSettings]:
        if not v:
            raise ValueError("at least one backend is required")
        return v


def is_loopback(host: str) -> bool:
    """Whether a listen address is loopback only (``localhost`` or a loopback IP)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it could resolve anywhere


class ConfigError(Exception):
    """A configuration problem, phrased with the offending key."""


def _settings_class(config_file: Path | None) -> type[Settings]:
    if config_file is None:
        return Settings

    class FileSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (
                init_settings,
                env_settings,
                YamlConfigSettingsSource(settings_cls, yaml_file=config_file),
            )

    return FileSettings


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"{key}: {err['msg']}")
    return "\n".join(lines)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings tree; raise ConfigError naming the bad key."""
    path = Path(config_file) if config_file is not None else None
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return _settings_class(path)(**clean)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from exc


def settings_to_json(settings: Settings) -> str:
    """Serialise with secrets revealed: for handing settings to worker processes and the config hash.

    Covers every value type the Settings tree holds (``SecretStr``, ``Path``); the result
    round-trips through :func:`settings_from_json`. Raises TypeError on a type it does not know.
    """
    import orjson

    def reveal(obj: Any) -> Any:
        if isinstance(obj, SecretStr):
            return obj.get_secret_value()
        if isinstance(obj, PurePath):
            return str(obj)
        raise TypeError(type(obj).__name__)

    return orjson.dumps(settings.model_dump(), default=reveal).decode()


def settings_from_json(text: str) -> Settings:
    return Settings.model_validate_json(text)
