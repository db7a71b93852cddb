"""Configuration sections for authentication, teams, tiers and rate limits.

Part of the one Settings tree (gateway/config.py); split out only to keep modules small.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from gateway.ledger.config import BudgetSettings
from gateway.redis_url import check_redis_url


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


JwtAlgorithm = Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512"]


class JwtSettings(_Section):
    algorithms: list[JwtAlgorithm] = Field(
        ["HS256"],
        min_length=1,
        description="Accepted algorithms, pinned here: a token's own `alg` never widens them.",
    )
    secret: SecretStr | None = Field(None, description="HS* shared secret (prefer `secret_env`).")
    secret_env: str | None = Field(
        None, description="Name of the environment variable holding the HS* secret."
    )
    public_key: str | None = Field(None, description="RS*/ES* public key, PEM text.")
    public_key_file: Path | None = Field(None, description="RS*/ES* public key, PEM file.")
    jwks_url: str | None = Field(None, description="JWKS URL of the identity provider.")
    jwks_cache_seconds: float = Field(300.0, gt=0, description="Refetch the JWKS this often.")
    jwks_min_refresh_seconds: float = Field(
        10.0,
        ge=0,
        description="At most one JWKS refetch per this many seconds when an unknown `kid` appears.",
    )
    issuer: str | None = Field(None, description="Required `iss` (checked when set).")
    audience: str | None = Field(None, description="Required `aud` (a token without `aud` fails).")
    leeway: float = Field(30.0, ge=0, description="Seconds of clock skew allowed for exp/nbf/iat.")
    subject_claim: str = Field("sub", description="Claim naming the principal.")
    team_claim: str = Field("team", description="Claim naming the team, e.g. `team` or `org_id`.")
    tier_claim: str = Field("tier", description="Claim naming the tier.")
    scopes_claim: str = Field("scope", description="Claim with scopes (space-separated or a list).")
    models_claim: str = Field("models", description="Claim listing the models the caller may use.")
    max_token_bytes: int = Field(8192, ge=256, description="Longer bearer tokens are rejected unread.")

    @model_validator(mode="after")
    def _keys_match_algorithms(self) -> JwtSettings:
        hmac = {a for a in self.algorithms if a.startswith("HS")}
        if hmac and len(hmac) != len(self.algorithms):
            # Mixing HMAC with public-key algorithms invites algorithm confusion.
            raise ValueError("do not mix HS* with RS*/ES* algorithms in one configuration")
        if hmac and self.secret is None and self.secret_env is None:
            raise ValueError("HS* algorithms need `secret` or `secret_env`")
        if not hmac and not (self.public_key or self.public_key_file or self.jwks_url):
            raise ValueError("RS*/ES* algorithms need `public_key`, `public_key_file` or `jwks_url`")
        return self


class ApiKeySettings(_Section):
    sha256: str | None = Field(None, description="Hex sha256 of the key (store this, not the key).")
    key: SecretStr | None = Field(None, description="The key itself (hashed at start-up; avoid).")
    subject: str = Field(description="Principal the key stands for.")
    team: str | None = Field(None, description="Team of the principal.")
    tier: str | None = Field(None, description="Tier of the principal.")
    scopes: list[str] = Field(default_factory=list, description="Scopes granted.")
    models: list[str] | None = Field(
        None,
        description=(
            "Models allowed (none: all the team may use). Checked on the model that serves the request "
            "after task routes and aliases; naming an alias allows the model it resolves to."
        ),
    )
    revoked: bool = Field(False, description="A revoked key is answered 401 `revoked_api_key`.")
    budget: BudgetSettings | None = Field(
        None,
        description=(
            "Monthly spend limit of this key's principal (its `subject` in its `team`; needs `ledger`), "
            "instead of the team's `principal_budget`. Keys of one subject and team share one count and "
            "must give the same budget."
        ),
    )

    @field_validator("subject", "team", "tier")
    @classmethod
    def _printable(cls, v: str | None) -> str | None:
        if v is not None and not v.isprintable():
            raise ValueError("must not hold control characters (or other unprintable ones)")
        return v

    @model_validator(mode="after")
    def _one_secret(self) -> ApiKeySettings:
        if (self.sha256 is None) == (self.key is None):
            raise ValueError("give exactly one of `sha256` or `key`")
        if self.sha256 is not None:
            h = self.sha256.lower()
            if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                raise ValueError("`sha256` must be 64 hex characters")
        return self


class AuthSettings(_Section):
    jwt: JwtSettings | None = Field(None, description="JWT bearer tokens.")
    api_keys: list[ApiKeySettings] = Field(default_factory=list, description="API keys.")
    api_keys_file: Path | None = Field(
        None, description="YAML file with a list of API keys (same fields), loaded at start-up."
    )
    default_tier: str | None = Field(None, description="Tier of principals that name none.")

    @property
    def enabled(self) -> bool:
        return self.jwt is not None or bool(self.api_keys) or self.api_keys_file is not None


class LimitValues(_Section):
    requests_per_minute: int | None = Field(None, ge=1, description="Requests per minute.")
    tokens_per_minute: int | None = Field(
        None, ge=1, description="Tokens per minute (prompt + completion, reserved then reconciled)."
    )
    max_concurrent: int | None = Field(None, ge=1, description="Requests in flight at once.")
    priority: int | None = Field(
        None, description="Tiers only: admission-queue priority, lower first (interactive 0, batch 10)."
    )

    def merged(self, override: LimitValues | None) -> LimitValues:
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_none=True))


class TeamSettings(_Section):
    models: list[str] | None = Field(
        None,
        description=(
            "Models the team may use (none: all). Checked on the model that serves the request after "
            "task routes and aliases, whatever the client typed; naming an alias allows the model it "
            "resolves to. The external fallback is judged on the local model name."
        ),
    )
    limits: LimitValues = Field(default_factory=LimitValues, description="Limits on the whole team together.")
    tiers: dict[str, LimitValues] = Field(
        default_factory=dict, description="Per-principal tier limits overridden for this team."
    )
    log_content: bool = Field(
        False,
        description="Log prompt and completion text for this team (redacted of secrets). Off by default.",
    )
    data_residency: Literal["strict", "any"] = Field(
        "any", description="`strict`: never sent off-premises (used by the fallback routes)."
    )
    capture: bool = Field(
        False,
        description=(
            "Store this team's request messages and responses (redacted of secrets) with its ledger "
            "rows, for `llm-gateway export-dataset` (fine-tuning JSONL). Needs `ledger` and "
            "`log_content: true` (the team's consent to content being kept); `llm-gateway purge` "
            "deletes it."
        ),
    )
    budget: BudgetSettings | None = Field(
        None,
        description=(
            "Monthly spend limit of the whole team (needs `ledger`): over it, 429 `budget_exceeded` "
            "until the month ends (UTC). Counted in the rate-limit storage (Redis: shared by replicas), "
            "rebuilt from the ledger when missing (docs/ledger.md)."
        ),
    )
    principal_budget: BudgetSettings | None = Field(
        None,
        description=(
            "Monthly spend limit of each principal of the team on its own (by subject: a JWT's `sub`, "
            "an API key's `subject`; needs `ledger`), checked beside the team's `budget`. An API "
            "key's own `budget` replaces it for that key's subject."
        ),
    )

    @model_validator(mode="after")
    def _capture_needs_consent(self) -> TeamSettings:
        if self.capture and not self.log_content:
            raise ValueError("`capture: true` needs `log_content: true` (content may be kept)")
        return self


class RateLimitSettings(_Section):
    storage: str = Field(
        "memory://",
        description=(
            "`memory://` (one process) or `redis://host:port/db` (shared by all replicas; one Redis "
            "server or primary, not Redis Cluster)."
        ),
    )
    on_storage_error: Literal["open", "closed"] = Field(
        "open", description="Redis unreachable: `open` serves (and counts it), `closed` answers 503."
    )
    storage_timeout: float = Field(0.25, gt=0, description="Seconds before a storage call fails.")
    completion_estimate: int = Field(
        1024, ge=1, description="Completion tokens reserved when a request sets no max_tokens."
    )
    bytes_per_token: float = Field(
        4.0, gt=0, description="Prompt tokens are estimated as request body bytes / this."
    )

    @field_validator("storage")
    @classmethod
    def _check_storage(cls, v: str) -> str:
        if v.startswith("memory://"):
            return v
        if not v.startswith(("redis://", "rediss://")):
            raise ValueError("use memory:// or redis://host:port/db")
        return check_redis_url(v)
