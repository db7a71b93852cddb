"""Configuration sections for routing: aliases, task-type routes, affinity, the external fallback.

Part of the one Settings tree (gateway/config.py); split out only to keep modules small.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouteSettings(_Section):
    model: str | None = Field(
        None, description="Target model or alias (none: the model the client asked for)."
    )
    fallback: bool = Field(
        False,
        description=(
            "May go to the external provider when the local pool cannot serve (never for a team "
            "with `data_residency: strict`)."
        ),
    )


class RoutingSettings(_Section):
    aliases: dict[str, str] = Field(
        default_factory=dict, description="Friendly names → served model names, e.g. `default: qwen2.5-7b`."
    )
    task_header: str = Field("x-task-type", description="Request header naming the task type.")
    task_field: str = Field(
        "task_type", description="Body field naming the task type (removed before forwarding)."
    )
    routes: dict[str, RouteSettings] = Field(
        default_factory=dict, description="Task type → route, e.g. `classification: {model: clf-v2}`."
    )
    default_route: RouteSettings = Field(
        default_factory=RouteSettings, description="Route for requests with no or an unknown task type."
    )
    affinity_header: str = Field(
        "x-session-id", description="Header whose value keeps a conversation on one replica."
    )
    affinity_user_field: bool = Field(True, description="Use the body's `user` field for affinity too.")
    affinity_max_skew: int = Field(
        4,
        ge=0,
        description="Leave the sticky replica when it is this much busier than the least busy one.",
    )
    load_aware: bool = Field(
        True,
        description="Weigh replicas by their scraped vllm:num_requests_waiting and KV-cache usage too.",
    )

    @field_validator("task_header", "affinity_header")
    @classmethod
    def _lower(cls, v: str) -> str:
        if not v or not _TOKEN.fullmatch(v):
            raise ValueError(f"`{v}` is not an HTTP header name (RFC 9110 token characters only)")
        return v.lower()

    @field_validator("aliases")
    @classmethod
    def _resolve_aliases(cls, v: dict[str, str]) -> dict[str, str]:
        """Each alias mapped to the served model at the end of its chain (`chain: strong`,
        `strong: big` → `chain: big`), so routing, allowances and `/v1/models` resolve once;
        a cycle is refused."""
        out: dict[str, str] = {}
        for start in v:
            seen = {start}
            name = v[start]
            while name in v:
                if name in seen:
                    raise ValueError(f"aliases form a cycle through `{start}`")
                seen.add(name)
                name = v[name]
            out[start] = name
        return out


class ExternalSettings(_Section):
    kind: Literal["openai", "anthropic"] = Field(
        "openai", description="`openai` (chat/completions API) or `anthropic` (Messages API, chat only)."
    )
    base_url: str = Field(
        description="Base URL, e.g. https://api.openai.com/v1 or https://api.anthropic.com/v1."
    )

    @field_validator("name")
    @classmethod
    def _own_label(cls, v: str) -> str:
        if v in ("cache", "local", "-"):
            raise ValueError(
                f"`{v}` is the gateway's own label (a cache hit, the replicas, none): choose another"
            )
        return v

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        u = urlsplit(v)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"`{v}` is not an http(s) URL")
        return v

    anthropic_version: str = Field("2023-06-01", description="`anthropic-version` header (anthropic).")
    default_max_tokens: int = Field(
        1024, ge=1, description="max_tokens sent to Anthropic when the client set none (it is required)."
    )
    api_key_env: str | None = Field(None, description="Environment variable holding the provider's key.")
    models: dict[str, str] = Field(
        default_factory=dict, description="Local model → provider model, e.g. `qwen2.5-7b: gpt-4o-mini`."
    )
    name: str = Field("external", description="Label in headers, logs and metrics.")
    allow_teamless: bool = Field(
        False,
        description=(
            "Principals without a team, or with a team not in `teams`, may fall back too "
            "(default: never off-premises)."
        ),
    )
    proxy: SecretStr | None = Field(
        None,
        description=(
            "Egress proxy for the provider, `http://[user:pass@]host:port` (credentials sent as "
            "Proxy-Authorization, never logged); https is tunnelled with CONNECT and the provider's "
            "certificate still verified. Unset: the standard `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY`/"
            '`NO_PROXY` variables (either case). `""` or `none`: direct, whatever the environment '
            "says. Kept secret in `check-config`'s output. The vLLM backends never use a proxy (private "
            "network; `NO_PROXY` need not list them); the JWKS fetch follows the variables, not this key."
        ),
    )
    ca_file: str | None = Field(
        None,
        description=(
            "PEM bundle trusted for the provider's certificate in addition to the system's roots "
            "(`SSL_CERT_FILE` overrides the system's bundle), e.g. a private CA."
        ),
    )

    @field_validator("proxy")
    @classmethod
    def _check_proxy(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None or v.get_secret_value().strip().lower() in ("", "none"):
            return v
        u = urlsplit(v.get_secret_value())
        if u.scheme != "http" or not u.hostname:
            raise ValueError('must be an http:// proxy URL (http://[user:pass@]host:port), `""` or `none`')
        return v
