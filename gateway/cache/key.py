"""Which requests the cache may answer, and the key of each.

The key is a hash, never the prompt: BLAKE2b-128 over the scope (the team, the principal or
everyone), the endpoint, the served model and its version, and the request body as canonical
JSON (keys sorted, no whitespace) without the fields that do not change the answer. Redis keys
also carry short hashes of the team and of the model, so a purge can find a team's or a
model's entries without reading them.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any, Final

import orjson

from gateway.auth.principal import Principal

# Fields that shape the response's framing or identify the caller, not the answer:
# `stream`/`stream_options` (one entry serves both forms), `user` (an end-user id for abuse
# tracking), vLLM's `request_id` and `priority` (scheduling), OpenAI's `metadata`, `store` and
# `service_tier`. The gateway's routing field was already taken out by the router.
IGNORED: Final = frozenset(
    {"stream", "stream_options", "user", "request_id", "priority", "metadata", "store", "service_tier"}
)


@dataclass(frozen=True, slots=True)
class CacheKey:
    digest: str  # hex; names the entry, its single-flight lock and its notices
    entry: str  # Redis key of the entry (suffixed with its form)
    lock: str  # Redis key of the single-flight lock


def _number(v: Any) -> Any:
    """One spelling per number among the top-level fields (sampling parameters): ``0``, ``0.0``
    and ``-0.0`` are one temperature. Only floats that are whole and exactly representable."""
    if type(v) is float and v.is_integer() and -(2.0**53) <= v <= 2.0**53:
        return int(v)
    return v


def deterministic(endpoint: str, body: dict[str, Any]) -> bool:
    """Whether the answer is reproducible: embeddings, ``temperature: 0``, or a ``seed``."""
    if endpoint == "embeddings":
        return True
    t = body.get("temperature")
    if type(t) in (int, float) and t == 0:
        return True
    seed = body.get("seed")
    return type(seed) is int


@functools.lru_cache(maxsize=1024)
def segment(name: str) -> str:
    """A short, glob-safe stand-in for a team or model name in Redis keys (hex)."""
    return hashlib.blake2b(name.encode(), digest_size=6).hexdigest()


def scope_of(principal: Principal, scope: str) -> tuple[str, str]:
    """(value hashed into the key, the team segment of the Redis key) for ``scope``."""
    if scope == "global":
        return "g", "g"
    team = principal.team
    team_seg = segment(team) if team is not None else "-"
    if scope == "team" and team is not None:
        return "t:" + team, team_seg
    # A JWT's `sub` and an API key's configured subject are different namespaces, and one
    # subject in two teams is two principals (as everywhere else: jobs' owners, budgets). The
    # team is in the hashed value, not only in the entry's key: the single-flight lock and this
    # process's waiters go by the digest alone.
    return orjson.dumps(["p", principal.via, principal.subject, team]).decode(), team_seg


def make_key(
    prefix: str,
    principal: Principal,
    scope: str,
    endpoint: str,
    model: str,
    version: str,
    body: dict[str, Any],
) -> CacheKey:
    """The cache key of a request whose body names the served model. Raises TypeError or
    orjson.JSONEncodeError for a body orjson cannot write (never a validated one)."""
    who, team_seg = scope_of(principal, scope)
    canon = orjson.dumps(
        {k: _number(v) for k, v in body.items() if k not in IGNORED}, option=orjson.OPT_SORT_KEYS
    )
    h = hashlib.blake2b(digest_size=16)
    for part in (who, endpoint, model, version):
        h.update(part.encode())
        h.update(b"\0")
    h.update(canon)
    digest = h.hexdigest()
    return CacheKey(digest, f"{prefix}e:{team_seg}:{segment(model)}:{digest}:", f"{prefix}l:{digest}")
