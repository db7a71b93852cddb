"""``GET /v1/organization/usage/completions`` and ``GET /v1/organization/costs`` from the ledger.

The shapes are OpenAI's Usage and Costs APIs (``UsageResponse``: a page of time buckets, each
with results), mapped onto the gateway's identities: ``project_id`` is the team, ``user_id`` the
principal's subject, ``line_item`` the model. Only principals with the ``admin`` scope may read
them (403 otherwise; also without authentication configured). Cold path: a small connection pool
opened on first use.

Two fields are the gateway's own, beside OpenAI's (clients that do not know them ignore them, as
the OpenAI SDK does): a usage result's ``num_cache_hits`` (of its ``num_model_requests``, the ones
the response cache answered) and a cost result's ``cache_saved_amount`` (what those hits would
have cost, in the shape of ``amount``).
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from gateway.errors import Forbidden, GatewayError, InvalidRequest
from gateway.ledger.config import LedgerSettings
from gateway.ledger.usage import GROUPS, WIDTHS, bucketed, has_cache_columns, usd

if TYPE_CHECKING:
    from gateway.pipeline.authenticate import Authenticator

ADMIN_SCOPE = "admin"
# OpenAI's limits on buckets per page, by width: (default, max).
PAGE = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
COSTS_PAGE = (7, 180)
USAGE_GROUPS = ("project_id", "user_id", "model", "route", "provider")
COST_GROUPS = ("project_id", "line_item", "user_id")
# Epoch seconds the API takes: 1970-01-01 to 9999-12-31 (inside PostgreSQL's timestamp range).
MAX_TIME = 253402300799
_CURSOR = re.compile(r"[0-9]{1,12}")


class LedgerUnavailable(GatewayError):
    status = 503
    code = "ledger_unavailable"
    reason = "ledger"


class UsageApi:
    """The two routes, and the pool they share (``close()`` at shutdown)."""

    def __init__(self, settings: LedgerSettings, auth: Authenticator) -> None:
        self._s = settings
        self._auth = auth
        self._pool: asyncpg.Pool | None = None
        self._cache_columns = False  # migration 0004 seen (asked again until it is: no restart needed)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def _conn_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            s = self._s
            try:
                self._pool = await asyncpg.create_pool(
                    s.dsn,
                    password=s.password(),
                    min_size=0,
                    max_size=4,
                    timeout=s.write_timeout,
                    command_timeout=30,
                    server_settings={"search_path": s.schema_name, "timezone": "UTC"},
                )
            except (OSError, asyncpg.PostgresError) as exc:
                raise _unavailable(exc) from None
        return self._pool

    async def _admin(self, request: Request) -> None:
        principal = await self._auth.authenticate(request.scope)
        if ADMIN_SCOPE not in principal.scopes:
            raise Forbidden(
                f"Usage and costs need a credential with the `{ADMIN_SCOPE}` scope.", code="permission_denied"
            )

    def router(self) -> APIRouter:
        router = APIRouter()

        @router.get("/v1/organization/usage/completions", summary="Completions usage (OpenAI's Usage API)")
        async def usage_completions(
            request: Request,
            start_time: int,
            end_time: int | None = None,
            bucket_width: str = "1d",
            group_by: list[str] = Query(default=[]),  # noqa: B008 (FastAPI's idiom)
            project_ids: list[str] = Query(default=[]),  # noqa: B008
            user_ids: list[str] = Query(default=[]),  # noqa: B008
            models: list[str] = Query(default=[]),  # noqa: B008
            limit: int | None = None,
            page: str | None = None,
        ) -> Response:
            await self._admin(request)
            if bucket_width not in WIDTHS:
                raise InvalidRequest("`bucket_width` must be 1m, 1h or 1d.", param="bucket_width")
            groups = _split(group_by, USAGE_GROUPS, "group_by")
            filters = {
                k: _split(v, None, k)
                for k, v in (("project_ids", project_ids), ("user_ids", user_ids), ("models", models))
                if v
            }
            default, most = PAGE[bucket_width]
            return await self._page(
                start_time, end_time, WIDTHS[bucket_width], groups, filters, limit, default, most, page, False
            )

        @router.get("/v1/organization/costs", summary="Costs (OpenAI's Costs API)")
        async def costs(
            request: Request,
            start_time: int,
            end_time: int | None = None,
            bucket_width: str = "1d",
            group_by: list[str] = Query(default=[]),  # noqa: B008
            project_ids: list[str] = Query(default=[]),  # noqa: B008
            limit: int | None = None,
            page: str | None = None,
        ) -> Response:
            await self._admin(request)
            if bucket_width not in ("1d", "1h"):
                raise InvalidRequest("`bucket_width` must be 1d (or 1h).", param="bucket_width")
            groups = _split(group_by, COST_GROUPS, "group_by")
            filters = {"project_ids": _split(project_ids, None, "project_ids")} if project_ids else {}
            default, most = COSTS_PAGE
            return await self._page(
                start_time, end_time, WIDTHS[bucket_width], groups, filters, limit, default, most, page, True
            )

        return router

    async def _page(
        self,
        start_time: int,
        end_time: int | None,
        width: int,
        groups: list[str],
        filters: dict[str, list[str]],
        limit: int | None,
        default: int,
        most: int,
        page: str | None,
        costs: bool,
    ) -> Response:
        if limit is not None and not 1 <= limit <= most:
            raise InvalidRequest(f"`limit` must be between 1 and {most}.", param="limit")
        for name, value in (("start_time", start_time), ("end_time", end_time)):
            if value is not None and not 0 <= value <= MAX_TIME:
                raise InvalidRequest(f"`{name}` must be epoch seconds between 0 and {MAX_TIME}.", param=name)
        buckets = limit or default
        start = start_time - start_time % width
        if page is not None:
            cursor = int(page) if _CURSOR.fullmatch(page) else -1
            if cursor < start or cursor % width or cursor > MAX_TIME:
                raise InvalidRequest("`page` is not a cursor this endpoint returned.", param="page")
            start = cursor
        end = int(time.time()) if end_time is None else end_time
        if end <= start_time:
            raise InvalidRequest("`end_time` must be after `start_time`.", param="end_time")
        end = -(-end // width) * width  # up to a whole bucket
        stop = min(end, start + buckets * width)
        pool = await self._conn_pool()
        try:
            async with pool.acquire() as conn:
                if not self._cache_columns:
                    self._cache_columns = await has_cache_columns(conn)
                rows = await bucketed(conn, start, stop, width, groups, filters, self._cache_columns)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise _unavailable(exc) from None
        by_bucket: dict[int, list[dict[str, Any]]] = {}
        for r in rows:
            by_bucket.setdefault(r["bucket"], []).append(_cost(r, groups) if costs else _usage(r, groups))
        data = [
            {"object": "bucket", "start_time": b, "end_time": b + width, "results": by_bucket.get(b, [])}
            for b in range(start, stop, width)
        ]
        more = stop < end
        body = {"object": "page", "data": data, "has_more": more, "next_page": str(stop) if more else None}
        return Response(orjson.dumps(body), media_type="application/json")


def _unavailable(exc: BaseException) -> LedgerUnavailable:
    return LedgerUnavailable(f"The ledger database is unavailable ({type(exc).__name__}).", retry_after=5)


def _split(values: list[str], allowed: tuple[str, ...] | None, param: str) -> list[str]:
    """Repeated and comma-separated values, checked against ``allowed``."""
    out = [v for item in values for v in item.split(",") if v]
    if any("\x00" in v for v in out):
        raise InvalidRequest(f"`{param}` may not contain NUL characters.", param=param)
    if allowed is not None:
        bad = [v for v in out if v not in allowed]
        if bad:
            raise InvalidRequest(f"`{param}` takes {', '.join(allowed)}; not {bad[0]!r}.", param=param)
    return out


def _usage(r: asyncpg.Record, groups: list[str]) -> dict[str, Any]:
    g = {name: r[GROUPS[name]] for name in groups}
    return {
        "object": "organization.usage.completions.result",
        "input_tokens": int(r["input_tokens"]),
        "output_tokens": int(r["output_tokens"]),
        "input_cached_tokens": 0,
        "input_audio_tokens": 0,
        "output_audio_tokens": 0,
        "num_model_requests": int(r["requests"]),
        "num_cache_hits": int(r["cache_hits"]),
        "project_id": (g.get("project_id") or None),
        "user_id": g.get("user_id"),
        "api_key_id": None,
        "model": g.get("model"),
        "batch": None,
        **({"route": g["route"]} if "route" in g else {}),
        **({"provider": g["provider"]} if "provider" in g else {}),
    }


def _cost(r: asyncpg.Record, groups: list[str]) -> dict[str, Any]:
    g = {name: r[GROUPS[name]] for name in groups}
    return {
        "object": "organization.costs.result",
        "amount": {"value": usd(r["cost_usd"]), "currency": "usd"},
        "cache_saved_amount": {"value": usd(r["cost_saved_usd"]), "currency": "usd"},
        "line_item": g.get("line_item"),
        "project_id": (g.get("project_id") or None),
        "api_key_id": None,
        **({"user_id": g["user_id"]} if "user_id" in g else {}),
    }
