"""``DELETE /v1/cache``: purge entries (admin scope), by team and/or by model.

Query parameters ``team`` and ``model`` (each optional, both: their intersection; neither:
every entry). Answers ``{"object": "cache.purge", "deleted": N, "team": ..., "model": ...}``;
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


def build_cache_router(cache: ResponseCache, auth: Authenticator) -> APIRouter:
    router = APIRouter()

    @router.delete("/v1/cache", summary="Purge response-cache entries (admin)")
    async def purge(request: Request, team: str | None = None, model: str | None = None) -> Response:
        principal = await auth.authenticate(request.scope)
        if ADMIN_SCOPE not in principal.scopes:
            raise Forbidden(
                f"Purging the cache needs a credential with the `{ADMIN_SCOPE}` scope.",
                code="permission_denied",
            )
        for name, value in (("team", team), ("model", model)):
            if value is not None and not value:
                raise InvalidRequest(f"`{name}` must not be empty.", param=name)
        try:
            deleted = await cache.purge(team, model)
        except Exception as exc:
            raise CacheUnavailable(f"The cache's Redis did not answer ({type(exc).__name__}).") from None
        body = {"object": "cache.purge", "deleted": deleted, "team": team, "model": model}
        return Response(orjson.dumps(body), media_type="application/json")

    return router
