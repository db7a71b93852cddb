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


ANONYMOUS = Principal("anonymous", None, None, frozenset(), None, "anonymous")
