"""Stage 2, authenticate: bearer credential → Principal, before the body is read.

``Authorization: Bearer <jwt>`` or ``Bearer <api key>`` (what the OpenAI SDK
sends as ``api_key``), or ``x-api-key``. A JWT is recognised by its shape
(three dot-separated parts). With no authentication configured every
request is the anonymous principal (the gateway then binds loopback only).
"""

from __future__ import annotations

from gateway.asgi import Scope
from gateway.auth.apikeys import ApiKeyError, ApiKeyStore, load_api_keys
from gateway.auth.jwt import AuthUnavailable as KeysUnavailable
from gateway.auth.jwt import JwtVerifier, TokenError
from gateway.auth.principal import ANONYMOUS, LOCAL_OPERATOR, Principal
from gateway.config import Settings, is_loopback
from gateway.errors import AuthUnavailable, Forbidden, Unauthenticated


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        a = settings.auth
        self.enabled = a.enabled
        # Without authentication on loopback (local-only mode, gateway/local_only.py) the only
        # callers are this machine's own: they may also purge the cache and read usage (the
        # `admin` scope). Without authentication elsewhere (allow_unauthenticated), nobody may.
        self._anonymous = LOCAL_OPERATOR if not a.enabled and is_loopback(settings.server.host) else ANONYMOUS
        self.jwt = JwtVerifier(a.jwt, a.default_tier) if a.jwt is not None else None
        self.api_keys = ApiKeyStore(load_api_keys(a), a.default_tier)
        self._team_models = {
            name: frozenset(t.models) if t.models is not None else None for name, t in settings.teams.items()
        }
        self._tiers = frozenset(settings.tiers)
        # served model → the names that allow it: itself and every alias resolving to it
        names: dict[str, set[str]] = {}
        for alias, target in settings.routing.aliases.items():
            names.setdefault(target, {target}).add(alias)
        self._allowing = {model: frozenset(n) for model, n in names.items()}

    async def start(self) -> None:
        if self.jwt is not None and self.jwt.jwks is not None:
            await self.jwt.jwks.start()

    async def stop(self) -> None:
        if self.jwt is not None and self.jwt.jwks is not None:
            await self.jwt.jwks.stop()

    async def authenticate(self, scope: Scope) -> Principal:
        if not self.enabled:
            return self._anonymous
        raw = key = None
        for name, value in scope["headers"]:
            if name == b"authorization" or name == b"x-api-key":
                if (raw if name == b"authorization" else key) is not None:
                    # A second copy: a proxy in front that reads another copy than the gateway
                    # would authorize one caller while the gateway serves another.
                    raise Unauthenticated(
                        f"Send one {name.decode()} header, not several.", code="duplicate_credentials"
                    )
                if name == b"authorization":
                    raw = value
                else:
                    key = value
        if raw is not None:
            scheme, _, credential = raw.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer":
                raise Unauthenticated("Use `Authorization: Bearer <token>`.", code="missing_credentials")
            credential = credential.strip(" \t")  # HTTP's whitespace only: not NBSP or NEL
            if key is not None and key.decode("latin-1").strip(" \t") != credential:
                # Two credentials: whichever the gateway chose, a proxy in front may have
                # authorized the other (RFC 6750 3.1: more than one method is invalid_request).
                raise Unauthenticated(
                    "Send one credential: `Authorization` and `x-api-key` name different ones.",
                    code="duplicate_credentials",
                )
        else:
            credential = key.decode("latin-1").strip(" \t") if key is not None else ""
        if not credential:
            raise Unauthenticated(
                "No credential: send `Authorization: Bearer <token or API key>`.", code="missing_credentials"
            )
        principal = await self._verify(credential)
        if principal.tier is not None and self._tiers and principal.tier not in self._tiers:
            raise Forbidden(f"Tier `{principal.tier}` is not configured here.", code="unknown_tier")
        return principal

    async def _verify(self, credential: str) -> Principal:
        if self.jwt is not None and credential.count(".") == 2:
            try:
                return await self.jwt.verify(credential)
            except TokenError as exc:
                raise Unauthenticated(str(exc), code=exc.code) from None
            except KeysUnavailable:
                raise AuthUnavailable(
                    "The identity provider's keys cannot be fetched right now.", retry_after=5
                ) from None
        try:
            return self.api_keys.verify(credential)
        except ApiKeyError as exc:
            raise Unauthenticated(str(exc), code=exc.code) from None

    def may_use(self, principal: Principal, served: str) -> bool:
        """Whether ``principal`` may have ``served`` (the model that will answer) do the work.

        Both the principal's own allowance (API key ``models``, JWT models claim) and its
        team's ``models`` must allow it. An allowance names served models or aliases; an alias
        allows the model it resolves to. What the client typed, and the task route or alias
        that led from it to ``served``, never widens this.
        """
        own = principal.models
        team = self._team_models.get(principal.team) if principal.team is not None else None
        if own is None and team is None:
            return True
        names = self._allowing.get(served)
        if names is None:
            return (own is None or served in own) and (team is None or served in team)
        return (own is None or not own.isdisjoint(names)) and (team is None or not team.isdisjoint(names))

    def authorize(self, principal: Principal, requested: str, served: str) -> None:
        """Raise Forbidden (403 ``model_not_allowed``) unless ``served`` is allowed (see may_use)."""
        if self.may_use(principal, served):
            return
        if served == requested:
            raise Forbidden(f"You may not use the model `{served}`.", param="model")
        raise Forbidden(
            f"The model `{requested}` is served by `{served}` here, which you may not use.", param="model"
        )
