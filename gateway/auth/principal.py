"""Who is calling: the same shape whether a JWT or an API key said so."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    team: str | None
    tier: str | None
    scopes: frozenset[str]
    models: frozenset[str] | None  # None: any model the team may use
    via: str  # "jwt" | "api_key" | "anonymous"
    # Which credential, never the secret: "key:" + the first 12 hex digits of an API key's sha256,
    # or "jti:" + a JWT's `jti` claim (None when the token has none).
    credential: str | None = None


ANONYMOUS = Principal("anonymous", None, None, frozenset(), None, "anonymous")
# The anonymous caller of a gateway without authentication bound to loopback: this machine's own
# clients, who could read Redis and the database themselves (gateway/pipeline/authenticate.py).
LOCAL_OPERATOR = Principal("anonymous", None, None, frozenset({"admin"}), None, "anonymous")
