"""``DELETE /v1/cache``: purge entries (admin scope), by team and/or by model.

Query parameters ``team`` and/or ``model`` (both: their intersection; a model alias is resolved
to the served model), or ``all=true`` for every entry; anything else is a 400 (a typo must not
purge everything). Answers ``{"object": "cache.purge", "deleted": N, "team": ..., "model": ...}``;
403 without the ``admin`` scope, 503 ``cache_unavailable`` (Retry-After) when Redis is away.
With ``cache.scope: global`` entries belong to no team: purge them by model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.errors import Forbidden, GatewayError, InvalidRequest

if TYPE_CHECKING:
    from gateway.cache.stage import ResponseCache
    from gateway.pipeline.authenticate import Authenticator

ADMIN_SCOPE = "admin"


class CacheUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "cache_unavailable"
    reason = "cache_unavailable"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", b"5")]


def build_cache_router(cache: ResponseCache, auth: Authenticator, aliases: dict[str, str]) -> APIRouter:
    router = APIRouter()

    @router.delete("/v1/cache", summary="Purge response-cache entries (admin)")
    async def purge(request: Request) -> Response:
        principal = await auth.authenticate(request.scope)
        if ADMIN_SCOPE not in principal.scopes:
            raise Forbidden(
                f"Purging the cache needs a credential with the `{ADMIN_SCOPE}` scope.",
                code="permission_denied",
            )
        params = request.query_params
        for name in params:
            if name not in _PARAMS:
                raise InvalidRequest(
                    f"Unknown parameter `{name}`: use `team`, `model` or `all=true`.", param=name
                )
            if len(params.getlist(name)) > 1:
                raise InvalidRequest(f"`{name}` given more than once.", param=name)
        team, model, everything = params.get("team"), params.get("model"), params.get("all")
        for name, value in (("team", team), ("model", model)):
            if value is not None and not value:
                raise InvalidRequest(f"`{name}` must not be empty.", param=name)
        if everything not in (None, "true"):
            raise InvalidRequest("`all` must be `true`.", param="all")
        if team is None and model is None and everything is None:
            raise InvalidRequest(
                "Name a `team` or a `model` to purge, or purge every entry with `all=true`.", param="all"
            )
        if everything is not None and (team is not None or model is not None):
            raise InvalidRequest("`all=true` purges everything: do not combine it with `team` or `model`.")
        served = None if model is None else aliases.get(model, model)  # entries are keyed by it
        try:
            deleted = await cache.purge(team, served)
        except Exception as exc:
            raise CacheUnavailable(f"The cache's Redis did not answer ({type(exc).__name__}).") from None
        body = {"object": "cache.purge", "deleted": deleted, "team": team, "model": served}
        return Response(orjson.dumps(body), media_type="application/json")

    return router


_PARAMS = frozenset({"team", "model", "all"})
