"""FastAPI routes for the cold endpoints: models, probes, metrics.

The proxied endpoints (chat, completions, embeddings) do not pass through
FastAPI; see gateway/proxy.py.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from gateway import __version__
from gateway.errors import GatewayError, ModelNotFound, error_body

if TYPE_CHECKING:
    from gateway.app import Gateway


class JSONBytes(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
# RFC 9110 9.1: a server that serves GET serves HEAD (the same headers, no body: uvicorn drops it).
GET_HEAD = ["GET", "HEAD"]


def build_router(gw: Gateway) -> APIRouter:
    router = APIRouter()
    pool = gw.pool

    aliases = gw.settings.routing.aliases

    def cards() -> list[dict[str, Any]]:
        """Served models of ready replicas, plus the aliases whose target is among them."""
        served = pool.model_cards()
        ids = {c["id"] for c in served}
        extra = [
            {
                "id": alias,
                "object": "model",
                "created": 0,
                "owned_by": "gateway",
                "root": target,
                "parent": target,
            }
            for alias, target in aliases.items()
            if target in ids and alias not in ids
        ]
        return served + extra

    async def visible(request: Request) -> list[dict[str, Any]]:
        """What this caller may use: healthy models and aliases within its allowance."""
        principal = await gw.auth.authenticate(request.scope)
        # Listed iff a request naming it would be allowed: judged on the model that would serve it.
        return [c for c in cards() if gw.auth.may_use(principal, aliases.get(c["id"], c["id"]))]

    @router.api_route("/v1/models", methods=GET_HEAD, summary="Models the ready backends serve, and aliases")
    async def list_models(request: Request) -> Response:
        return JSONBytes({"object": "list", "data": await visible(request)})

    @router.api_route("/v1/models/{model_id:path}", methods=GET_HEAD, summary="One model")
    async def get_model(model_id: str, request: Request) -> Response:
        for card in await visible(request):
            if card.get("id") == model_id:
                return JSONBytes(card)
        raise ModelNotFound(f"The model `{model_id}` does not exist.", param="model")

    @router.api_route("/live", methods=GET_HEAD, summary="Liveness: the process is up")
    async def live() -> Response:
        return JSONBytes({"status": "alive"})

    @router.api_route(
        "/ready", methods=GET_HEAD, summary="Readiness: a backend is healthy and lists its model"
    )
    async def ready() -> Response:
        if gw.drain.draining:
            return JSONBytes({"status": "draining", "reason": "shutting down"}, status_code=503)
        ready = [b.label for b in pool.backends if b.ready]
        if ready:
            return JSONBytes({"status": "ready", "backends": ready})
        reasons = {b.label: f"{b.state.value}: {b.reason}" for b in pool.backends}
        return JSONBytes({"status": "not_ready", "reason": reasons}, status_code=503)

    @router.api_route("/health", methods=GET_HEAD, summary="Per-backend health detail")
    async def health() -> Response:
        ready = pool.any_ready
        return JSONBytes(
            {
                "status": "ready" if ready else "not_ready",
                "version": __version__,
                "uptime_seconds": round(time.monotonic() - pool.started, 3),
                "backends": [b.describe() for b in pool.backends],
            },
            status_code=200 if ready else 503,
        )

    @router.api_route("/metrics", methods=GET_HEAD, summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(gw.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return router


def install_error_handlers(app: FastAPI) -> None:
    """Every error FastAPI/Starlette produce on the cold paths, OpenAI-shaped."""

    async def gateway_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        headers = {k.decode(): v.decode() for k, v in exc.headers()}
        return Response(exc.body(), status_code=exc.status, media_type="application/json", headers=headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = "Not found." if exc.status_code == 404 else str(exc.detail)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route whose path matched; RFC 9110
            # 15.5.6 wants every method the path serves (GET and DELETE of one file, say).
            routes = request.app.router.routes
            methods = [
                m
                for m in _METHODS
                if any(r.matches({**request.scope, "method": m})[0] is Match.FULL for r in routes)
            ]
            if methods:
                headers = {k: v for k, v in headers.items() if k.lower() != "allow"}
                headers["allow"] = ", ".join(methods)
        return Response(
            error_body(message, "invalid_request_error", None, code),
            status_code=exc.status_code,
            media_type="application/json",
            headers=headers,
        )

    async def validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in err["loc"][1:]) or None
        return Response(
            error_body(f"Invalid request: {err['msg']}", "invalid_request_error", param, "invalid_request"),
            status_code=400,
            media_type="application/json",
        )

    app.add_exception_handler(GatewayError, gateway_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
