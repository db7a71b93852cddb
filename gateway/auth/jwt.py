"""JWT verification with python-jose (cryptography backend).

Algorithms come from config, never from the token, and so do keys (a token's
`jku`, `x5u`, `jwk` or `x5c` is never followed). Headers and payloads are parsed
strictly before python-jose sees them: duplicate member names, `crit` (no
extension is implemented, so any critical one is unknown) and `b64` are refused,
and `exp`/`nbf`/`iat` must be JSON numbers (RFC 7515, 7519, 8725). `exp` is required;
`nbf`/`iat` are honoured with a leeway; `iss` and `aud` are required when
configured (python-jose would pass a token without `aud` even when an
audience is given, so ``require_aud`` is set explicitly).

Verified tokens are cached until they expire (bounded, and cleared when the
JWKS changes), because SDK clients send the same token on every request and
a signature check costs far more than a dict lookup.
"""

from __future__ import annotations

import base64
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from jose import jwk
from jose import jwt as jose_jwt
from jose.backends.base import Key
from jose.exceptions import ExpiredSignatureError, JWTClaimsError, JWTError

from gateway.auth.jwks import JwksCache, JwksUnavailable
from gateway.auth.principal import Principal
from gateway.config_auth import JwtSettings

CACHE_SIZE = 4096


class TokenError(Exception):
    def __init__(self, message: str, code: str = "invalid_token") -> None:
        super().__init__(message)
        self.code = code


class AuthUnavailable(Exception):
    """Tokens cannot be checked right now (no JWKS could be fetched)."""


def hmac_secret(settings: JwtSettings) -> str | None:
    if settings.secret is not None:
        return settings.secret.get_secret_value()
    if settings.secret_env is not None:
        value = os.environ.get(settings.secret_env)
        if not value:
            raise ValueError(f"auth.jwt.secret_env: environment variable {settings.secret_env} is not set")
        return value
    return None


class JwtVerifier:
    def __init__(self, settings: JwtSettings, default_tier: str | None) -> None:
        self._s = settings
        self._default_tier = default_tier
        self._allowed = frozenset(settings.algorithms)
        self._static: dict[str, Key] = {}
        secret = hmac_secret(settings)
        pem = settings.public_key
        if settings.public_key_file is not None:
            pem = Path(settings.public_key_file).read_text()
        for alg in settings.algorithms:
            material = secret if alg.startswith("HS") else pem
            if material is not None:
                self._static[alg] = jwk.construct(material, alg)
        self.jwks = JwksCache(settings, self._cache_clear) if settings.jwks_url else None
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._options = {
            "require_exp": True,
            "require_aud": settings.audience is not None,
            "require_iss": settings.issuer is not None,
            "verify_aud": settings.audience is not None,
            "verify_iss": settings.issuer is not None,
            "verify_at_hash": False,
            "leeway": settings.leeway,
        }

    def _cache_clear(self) -> None:
        self._cache.clear()

    async def verify(self, token: str) -> Principal:
        if self.jwks is not None and self.jwks.stale():
            await self.jwks.refresh()  # a withdrawn key must also end cached verdicts
        hit = self._cache.get(token)
        if hit is not None:
            if time.time() < hit[1]:
                return hit[0]
            del self._cache[token]
        if len(token) > self._s.max_token_bytes:
            raise TokenError("The bearer token is too long.")
        if token.count(".") != 2:
            raise TokenError("The bearer token is not a JWT.")
        header, payload = _decode_segments(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._allowed:
            raise TokenError(f"Token algorithm {str(alg)[:10]!r} is not accepted.")
        _check_header(header)
        _check_dates(payload)
        key = await self._key(header.get("kid"), alg)
        try:
            claims: dict[str, Any] = jose_jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._s.audience,
                issuer=self._s.issuer,
                options=self._options,
            )
        except ExpiredSignatureError:
            raise TokenError("The token has expired.", "token_expired") from None
        except JWTClaimsError as exc:
            raise TokenError(f"The token's claims are not valid: {exc}") from None
        except JWTError as exc:
            raise TokenError(f"The token is not valid: {exc}") from None
        except (TypeError, ValueError, OverflowError):
            # python-jose only catches ValueError around int(exp/nbf/iat): null, lists, huge numbers.
            raise TokenError("The token's time claims are not valid.") from None
        principal = self._principal(claims)
        try:
            expires = float(claims["exp"])
        except (TypeError, ValueError, OverflowError):
            raise TokenError("The token's `exp` claim is not valid.") from None
        if not math.isfinite(expires):
            raise TokenError("The token's `exp` claim is not valid.")
        if len(self._cache) >= CACHE_SIZE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[token] = (principal, expires)
        return principal

    async def _key(self, kid: Any, alg: str) -> Key:
        if kid is not None and not isinstance(kid, str):
            raise TokenError("The token's `kid` is not a string.")
        if self.jwks is not None:
            try:
                key = await self.jwks.key_for(kid, alg)
            except JwksUnavailable:
                raise AuthUnavailable from None
            if key is not None:
                return key
            if alg not in self._static:
                raise TokenError("The token's signing key (`kid`) is not known.")
        key = self._static.get(alg)
        if key is None:
            raise TokenError("No key is configured for this token.")
        return key

    def _principal(self, claims: dict[str, Any]) -> Principal:
        s = self._s
        subject = claims.get(s.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise TokenError(f"The token has no `{s.subject_claim}` claim.")
        _check_name(subject, s.subject_claim)
        # Fail closed on a team or tier that is not a string: str() of a list or a number would
        # make a team name of it (and share its cache scope, limits and budget with whoever else
        # got the same junk). An empty team is no team (the principal is its own scope).
        team = claims.get(s.team_claim)
        if team is not None and not isinstance(team, str):
            raise TokenError(f"The token's `{s.team_claim}` claim must be a string.")
        tier = claims.get(s.tier_claim)
        if tier is not None and not isinstance(tier, str):
            raise TokenError(f"The token's `{s.tier_claim}` claim must be a string.")
        for value, claim in ((team, s.team_claim), (tier, s.tier_claim), (claims.get("jti"), "jti")):
            if isinstance(value, str):
                _check_name(value, claim)
        tier = tier or self._default_tier
        scopes = claims.get(s.scopes_claim) or []
        if isinstance(scopes, str):
            scopes = scopes.split()
        models = claims.get(s.models_claim)
        if isinstance(models, str):
            models = models.split()
        elif models is not None and not isinstance(models, list):
            # Fail closed: an allowance we cannot read must not mean "every model".
            raise TokenError(f"The token's `{s.models_claim}` claim must be a list.")
        return Principal(
            subject=subject,
            team=team or None,
            tier=tier,
            scopes=frozenset(str(x) for x in scopes) if isinstance(scopes, list) else frozenset(),
            models=frozenset(str(m) for m in models) if isinstance(models, list) else None,
            via="jwt",
            credential=f"jti:{jti[:128]}" if isinstance(jti := claims.get("jti"), str) and jti else None,
        )


MAX_NAME_CHARS = 512


def _check_name(value: str, claim: str) -> None:
    """A claim that names someone (subject, team, tier, jti) must be text every store can keep:
    no control characters (PostgreSQL refuses NUL, logs and keys would carry the rest), no lone
    UTF-16 surrogate (JSON's ``\\ud800``: not UTF-8 at all), at most ``MAX_NAME_CHARS``. Else one
    token's principal could escape its budget (its month never seeded) or fail a request (500)."""
    if len(value) > MAX_NAME_CHARS:
        raise TokenError(f"The token's `{claim}` claim is longer than {MAX_NAME_CHARS} characters.")
    if not value.isprintable():  # C0 and C1 controls, DEL, U+2028, lone surrogates...
        raise TokenError(
            f"The token's `{claim}` claim holds a control character or is not valid Unicode text."
        )


def _decode_segments(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and payload of a compact JWS, parsed strictly.

    Duplicate member names are refused (RFC 7515 section 5.2 allows refusing them, and a
    token whose readers could disagree on its `alg` or `sub` must not pass), and so are
    NaN/Infinity, which are not JSON. Raises TokenError.
    """
    head, payload, _ = token.split(".")
    return _json_object(head, "header"), _json_object(payload, "payload")


def _json_object(segment: str, what: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, TypeError, RecursionError):
        raise TokenError(f"The token {what} cannot be decoded.") from None
    if not isinstance(value, dict):
        raise TokenError(f"The token {what} is not a JSON object.")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate member name")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Header parameters that change how a token must be processed, none of which this verifier
# implements: `crit` lists extensions a recipient must understand or reject the token (RFC 7515
# section 4.1.11); `b64: false` (RFC 7797) signs the payload unencoded and requires `crit`.
_UNSUPPORTED_HEADERS = ("crit", "b64")


def _check_header(header: dict[str, Any]) -> None:
    """Refuse what RFC 7515/8725 say a recipient that does not understand it must refuse.

    `jku`, `x5u`, `jwk` and `x5c` need no check: keys come only from the configuration or its
    JWKS URL, never from the token (RFC 8725 section 3.10), so a token naming its own key is
    verified against ours and fails.
    """
    for name in _UNSUPPORTED_HEADERS:
        if name in header:
            raise TokenError(f"The token's header uses `{name}`, which this gateway does not support.")


_DATE_CLAIMS = ("exp", "nbf", "iat")


def _check_dates(payload: dict[str, Any]) -> None:
    """`exp`, `nbf`, `iat` must be NumericDate: a JSON number (RFC 7519 section 2), finite.

    python-jose would take a string ("9999999999") through int(); a boolean is a number to
    Python but not to JSON.
    """
    for name in _DATE_CLAIMS:
        if name in payload:
            value = payload[name]
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or (isinstance(value, float) and not math.isfinite(value))
            ):
                raise TokenError(f"The token's `{name}` claim is not a number.")


def issue_token(
    settings: JwtSettings,
    subject: str,
    team: str | None = None,
    tier: str | None = None,
    ttl: int = 3600,
    extra: dict[str, Any] | None = None,
) -> str:
    """A development token signed with the configured HS* secret (`llm-gateway token`)."""
    secret = hmac_secret(settings)
    if secret is None:
        raise ValueError("auth.jwt has no HS* secret to sign with")
    now = int(time.time())
    claims: dict[str, Any] = {settings.subject_claim: subject, "iat": now, "exp": now + ttl}
    if team is not None:
        claims[settings.team_claim] = team
    if tier is not None:
        claims[settings.tier_claim] = tier
    if settings.issuer is not None:
        claims["iss"] = settings.issuer
    if settings.audience is not None:
        claims["aud"] = settings.audience
    claims.update(extra or {})
    alg = next(a for a in settings.algorithms if a.startswith("HS"))
    token: str = jose_jwt.encode(claims, secret, algorithm=alg)
    return token
