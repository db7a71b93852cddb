"""``GET /v1/organization/usage/completions`` and ``GET /v1/organization/costs`` from the ledger.

The shapes are OpenAI's Usage and Costs APIs (``UsageResponse``: a page of time buckets, each
with results), mapped onto the gateway's identities: ``project_id`` is the team, ``user_id`` the
principal's subject, ``api_key_id`` the credential the ledger records (``key:`` + 12 hex digits of
the API key's sha256, or ``jti:`` + a JWT's id), ``batch`` whether the row is a job line, and
``line_item`` the model. Only principals with the ``admin`` scope may read them (403 otherwise;
also without authentication configured), and the caller is authenticated before the query is
read: an anonymous request is a 401 whatever its parameters. Cold path: a small connection pool
opened on first use.

Every parameter is honoured or refused: one this endpoint does not take (another endpoint's
filter, a misspelling, ``group_by=service_tier``, which the ledger does not record) is a 400
naming it, never ignored, so a filter can never silently widen into the organisation's totals.
Lists come repeated, comma-separated or as ``name[]`` (the OpenAI SDK's form).

Two fields are the gateway's own, beside OpenAI's (clients that do not know them ignore them, as
the OpenAI SDK does): a usage result's ``num_cache_hits`` (of its ``num_model_requests``, the ones
the response cache answered) and a cost result's ``cache_saved_amount`` (what those hits would
have cost, in the shape of ``amount``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.datastructures import QueryParams

from gateway.errors import Forbidden, GatewayError, InvalidRequest
from gateway.ledger.config import LedgerSettings
from gateway.ledger.usage import GROUPS, WIDTHS, bucketed, has_cache_columns, reads_events, usd

if TYPE_CHECKING:
    from gateway.pipeline.authenticate import Authenticator

ADMIN_SCOPE = "admin"
# OpenAI's limits on buckets per page, by width: (default, max).
PAGE = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
COSTS_PAGE = (7, 180)
USAGE_GROUPS = ("project_id", "user_id", "api_key_id", "model", "batch", "route", "provider")
COST_GROUPS = ("project_id", "line_item", "api_key_id", "user_id")
# OpenAI's groupings the ledger has no data for (named in the 400, so the caller knows why).
UNRECORDED_GROUPS = frozenset({"service_tier", "api_source"})
# Epoch seconds the API takes: 1970-01-01 to 9999-12-31 (inside PostgreSQL's timestamp range).
MAX_TIME = 253402300799
_CURSOR = re.compile(r"[0-9]{1,12}")
_INT = re.compile(r"[+-]?[0-9]{1,19}")  # longer cannot be in range (and int() of 5,000 digits is slow)


class LedgerUnavailable(GatewayError):
    status = 503
    code = "ledger_unavailable"
    reason = "ledger"


@dataclass(frozen=True)
class Endpoint:
    """The query one route takes: ``filters`` (lists, keys of usage.FILTERS), ``groups`` (what
    ``group_by`` takes), ``widths`` (``bucket_width``), ``batch`` (the boolean filter), pages."""

    path: str
    filters: tuple[str, ...]
    groups: tuple[str, ...]
    widths: tuple[str, ...]
    batch: bool
    pages: dict[str, tuple[int, int]]  # width -> (default, max) buckets per page
    costs: bool

    @property
    def scalars(self) -> tuple[str, ...]:
        """The parameters that take one value."""
        return (
            "start_time",
            "end_time",
            "bucket_width",
            *(("batch",) if self.batch else ()),
            "limit",
            "page",
        )

    @property
    def names(self) -> tuple[str, ...]:
        """Every parameter, in OpenAI's order."""
        batch = ("batch",) if self.batch else ()
        return ("start_time", "end_time", "bucket_width", *self.filters, *batch, "group_by", "limit", "page")


USAGE = Endpoint(
    "/v1/organization/usage/completions",
    ("project_ids", "user_ids", "api_key_ids", "models"),
    USAGE_GROUPS,
    ("1m", "1h", "1d"),
    True,
    PAGE,
    False,
)
COSTS = Endpoint(
    "/v1/organization/costs",
    ("project_ids", "api_key_ids", "line_items"),
    COST_GROUPS,
    ("1d", "1h"),
    False,
    {"1d": COSTS_PAGE, "1h": COSTS_PAGE},
    True,
)


@dataclass
class Query:
    """One request's parameters, checked: times in epoch seconds, ``width`` a key of WIDTHS."""

    start_time: int
    end_time: int | None
    width: str
    groups: list[str]
    filters: dict[str, list[str]]
    batch: bool | None
    limit: int | None
    page: str | None


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

        # The query is read by hand (parse_query), not declared to FastAPI: FastAPI validates
        # declared parameters before the handler runs, which answered an anonymous caller's
        # missing start_time with a 400 instead of the 401, and it drops parameters it was not
        # told about (a filter the caller believes applied). openapi_extra keeps /docs complete.
        @router.get(
            USAGE.path,
            summary="Completions usage (OpenAI's Usage API)",
            openapi_extra={"parameters": _openapi(USAGE)},
        )
        async def usage_completions(request: Request) -> Response:
            await self._admin(request)
            return await self._page(USAGE, parse_query(request.query_params, USAGE))

        @router.get(
            COSTS.path, summary="Costs (OpenAI's Costs API)", openapi_extra={"parameters": _openapi(COSTS)}
        )
        async def costs(request: Request) -> Response:
            await self._admin(request)
            return await self._page(COSTS, parse_query(request.query_params, COSTS))

        return router

    def _events_horizon(self) -> int:
        """Epoch seconds of the oldest event kept: retention drops whole UTC days before
        ``today - retention_days`` (writer.py's maintenance)."""
        today = int(time.time()) // 86400 * 86400
        return today - self._s.retention_days * 86400

    async def _page(self, ep: Endpoint, q: Query) -> Response:
        """One page of buckets (OpenAI's ``UsageResponse``). 400 on a range or page out of
        bounds, or one reaching past the events' retention when the query needs the events."""
        default, most = ep.pages[q.width]
        width = WIDTHS[q.width]
        if q.limit is not None and not 1 <= q.limit <= most:
            raise InvalidRequest(f"`limit` must be between 1 and {most}.", param="limit")
        for name, value in (("start_time", q.start_time), ("end_time", q.end_time)):
            if value is not None and not 0 <= value <= MAX_TIME:
                raise InvalidRequest(f"`{name}` must be epoch seconds between 0 and {MAX_TIME}.", param=name)
        buckets = q.limit or default
        start = q.start_time - q.start_time % width
        if q.page is not None:
            cursor = int(q.page) if _CURSOR.fullmatch(q.page) else -1
            if cursor < start or cursor % width or cursor > MAX_TIME:
                raise InvalidRequest("`page` is not a cursor this endpoint returned.", param="page")
            start = cursor
        now = time.time()
        if (q.end_time if q.end_time is not None else now) <= q.start_time:
            raise InvalidRequest("`end_time` must be after `start_time`.", param="end_time")
        end = bucket_end(q.end_time, now, width)
        stop = min(end, start + buckets * width)
        if reads_events(width, q.groups, q.filters, q.batch) and start < (horizon := self._events_horizon()):
            # The per-request rows before the horizon are gone: their buckets would read as empty
            # while the same range without the filter (from the rollup) has data.
            raise InvalidRequest(
                f"`start_time` is before {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(horizon))}: "
                f"1m buckets, `api_key_ids`, `batch` and grouping by `api_key_id` or `batch` read the "
                f"per-request rows, kept {self._s.retention_days} days. Start later, or leave those out "
                f"(1h and 1d buckets of the rest go back {self._s.rollup_retention_days} days).",
                param="start_time",
            )
        pool = await self._conn_pool()
        try:
            async with pool.acquire() as conn:
                if not self._cache_columns:
                    self._cache_columns = await has_cache_columns(conn)
                rows = await bucketed(
                    conn, start, stop, width, q.groups, q.filters, self._cache_columns, q.batch
                )
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise _unavailable(exc) from None
        by_bucket: dict[int, list[dict[str, Any]]] = {}
        for r in rows:
            by_bucket.setdefault(r["bucket"], []).append(
                _cost(r, q.groups) if ep.costs else _usage(r, q.groups)
            )
        data = [
            {"object": "bucket", "start_time": b, "end_time": b + width, "results": by_bucket.get(b, [])}
            for b in range(start, stop, width)
        ]
        more = stop < end
        body = {"object": "page", "data": data, "has_more": more, "next_page": str(stop) if more else None}
        return Response(orjson.dumps(body), media_type="application/json")


def bucket_end(end_time: int | None, now: float, width: int) -> int:
    """The exclusive end (epoch seconds) of a usage query: ``end_time``, or when none was given
    ``now`` with its current second included, rounded up to a whole bucket of ``width`` seconds.
    (``int(now)`` at 120.3 was 120 exactly, a bucket's edge: the rows of the current second, and
    in a bucket's first second the whole current bucket, were left out of "everything so far".)"""
    end = int(now) + 1 if end_time is None else end_time
    return -(-end // width) * width


def _unavailable(exc: BaseException) -> LedgerUnavailable:
    return LedgerUnavailable(f"The ledger database is unavailable ({type(exc).__name__}).", retry_after=5)


def parse_query(params: QueryParams, ep: Endpoint) -> Query:
    """The checked query of ``ep``. 400 (``param`` naming it) on a parameter ``ep`` does not
    take, a scalar given twice or as a list, an empty filter value, a NUL, or a malformed value.

    Lists: ``name=a&name=b``, ``name=a,b`` or ``name[]=a`` (the OpenAI SDK's form), merged.
    """
    one: dict[str, str] = {}
    lists: dict[str, list[str]] = {}
    for key, value in params.multi_items():
        name = key[:-2] if key.endswith("[]") else key
        if name in ep.filters or name == "group_by":
            lists.setdefault(name, []).append(value)
        elif name in ep.scalars:
            if key != name:
                raise InvalidRequest(f"`{name}` takes one value, not a list.", param=name)
            if name in one:
                raise InvalidRequest(f"`{name}` is given more than once.", param=name)
            one[name] = value
        else:
            raise InvalidRequest(
                f"Unknown parameter `{name}`: {ep.path} takes {', '.join(ep.names)}.", param=name
            )
    if "start_time" not in one:
        raise InvalidRequest("`start_time` is required (epoch seconds).", param="start_time")
    width = one.get("bucket_width", "1d")
    if width not in ep.widths:
        raise InvalidRequest(f"`bucket_width` must be {' or '.join(ep.widths)}.", param="bucket_width")
    filters: dict[str, list[str]] = {}
    for name in ep.filters:
        if name in lists:
            values = _split(lists[name], None, name)
            if not values or any(not v for v in values):
                # An empty value names nothing: answering with every row would be the silent
                # widening this API refuses (a template whose variable was empty, say).
                raise InvalidRequest(f"`{name}` has an empty value.", param=name)
            filters[name] = values
    batch = None
    if "batch" in one:
        batch = {"true": True, "false": False}.get(one["batch"].lower())
        if batch is None:
            raise InvalidRequest("`batch` must be true or false.", param="batch")
    start_time = _int(one, "start_time")
    assert start_time is not None  # present: checked above
    return Query(
        start_time=start_time,
        end_time=_int(one, "end_time"),
        width=width,
        groups=[g for g in _split(lists.get("group_by", []), ep.groups, "group_by") if g],
        filters=filters,
        batch=batch,
        limit=_int(one, "limit"),
        page=one.get("page"),
    )


def _int(one: dict[str, str], name: str) -> int | None:
    value = one.get(name)
    if value is None:
        return None
    if not _INT.fullmatch(value):
        what = "an integer" if name == "limit" else f"epoch seconds between 0 and {MAX_TIME}"
        raise InvalidRequest(f"`{name}` must be {what}.", param=name)
    return int(value)


def _split(values: list[str], allowed: tuple[str, ...] | None, param: str) -> list[str]:
    """Repeated and comma-separated values (empty ones kept: the caller decides), checked
    against ``allowed``."""
    out = [v for item in values for v in item.split(",")]
    if any("\x00" in v for v in out):
        raise InvalidRequest(f"`{param}` may not contain NUL characters.", param=param)
    if allowed is not None:
        bad = [v for v in out if v and v not in allowed]
        if bad:
            why = " (the gateway's ledger does not record it)" if bad[0] in UNRECORDED_GROUPS else ""
            raise InvalidRequest(f"`{param}` takes {', '.join(allowed)}; not {bad[0]!r}{why}.", param=param)
    return out


def _openapi(ep: Endpoint) -> list[dict[str, Any]]:
    """The query parameters of ``ep`` for /docs (read by parse_query, not by FastAPI)."""
    out: list[dict[str, Any]] = []
    for name in ep.names:
        if name in ep.filters or name == "group_by":
            items: dict[str, Any] = {"type": "string"}
            if name == "group_by":
                items["enum"] = list(ep.groups)
            schema: dict[str, Any] = {"type": "array", "items": items}
        elif name in ("start_time", "end_time", "limit"):
            schema = {"type": "integer"}
        elif name == "batch":
            schema = {"type": "boolean"}
        elif name == "bucket_width":
            schema = {"type": "string", "enum": list(ep.widths), "default": "1d"}
        else:
            schema = {"type": "string"}
        out.append({"name": name, "in": "query", "required": name == "start_time", "schema": schema})
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
        "api_key_id": g.get("api_key_id"),
        "model": g.get("model"),
        "batch": g.get("batch"),
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
        "api_key_id": g.get("api_key_id"),
        **({"user_id": g["user_id"]} if "user_id" in g else {}),
    }
