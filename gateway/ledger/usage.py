"""Usage and cost queries over the ledger: time buckets (the API) and totals (the CLI).

``1h`` and ``1d`` buckets and totals read the hourly rollup (``usage_hourly``), so their cost does
not grow with the number of requests; ``1m`` buckets read the events themselves (a day at most).
Bucket edges are aligned to the bucket width in UTC. Cache hits and the cost they saved come from
migration 0004's columns; on a schema not yet upgraded they read as 0 (``has_cache_columns``).

What the rollup does not keep (the API key, whether a row was a job line) is only in the events:
a query that filters or groups on it reads the events at every width (``reads_events``), so it
reaches back ``retention_days``, not ``rollup_retention_days``.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = asyncpg.Connection | PoolConnectionProxy[asyncpg.Record]

WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
# Grouping names (OpenAI's, then ours) -> column. A team-less request has team '' in the rollup.
GROUPS = {
    "project_id": "team",
    "team": "team",
    "user_id": "subject",
    "principal": "subject",
    "model": "model",
    "line_item": "model",
    "route": "route",
    "provider": "provider",
    "api_key_id": "credential",
    "batch": "batch",
}
# Filter names (OpenAI's) -> column; each takes a list of values (any of them matches).
FILTERS = {
    "project_ids": "team",
    "user_ids": "subject",
    "models": "model",
    "line_items": "model",
    "api_key_ids": "credential",
}
# Columns the hourly rollup does not have: grouping or filtering on them reads the events.
EVENT_ONLY = frozenset({"credential", "batch"})
# A job line's row (a Batch API line or a `Prefer: respond-async` job): the request id a jobs
# worker gives each run of a line (gateway/jobs/service.py). The ledger has no column of its own
# for it; a client that sends an X-Request-Id of this exact shape is counted as a job line too.
# The LIKE and length come first: the regular expression only runs on rows that may match (it
# alone cost 0.27 s per million rows; the prefix test 0.02 s).
BATCH_ROW = (
    r"(request_id LIKE 'batch\_req\_%' AND length(request_id) = 34"
    r" AND request_id ~ '^batch_req_[0-9a-f]{24}$')"
)


async def has_cache_columns(conn: Conn) -> bool:
    """Whether the schema has migration 0004's ``cache_hits``/``cost_saved_usd`` (the rollup's)."""
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema ="
            " current_schema() AND table_name = 'usage_hourly' AND column_name = 'cache_hits')"
        )
    )


def reads_events(
    width: int, group_by: Sequence[str], filters: dict[str, list[str]], batch: bool | None
) -> bool:
    """Whether ``bucketed`` reads the events (``1m``, or a column the rollup lacks) rather than
    the hourly rollup: the events are kept ``retention_days``, the rollup longer."""
    return (
        width < 3600
        or batch is not None
        or any(GROUPS[g] in EVENT_ONLY for g in group_by)
        or any(FILTERS[f] in EVENT_ONLY for f in filters)
    )


def _expr(col: str, raw: bool) -> str:
    """A group or filter column as SQL: the events' NULL team is the rollup's ''."""
    if col == "batch":
        return BATCH_ROW
    return "coalesce(team, '')" if col == "team" and raw else col


async def bucketed(
    conn: Conn,
    start: int,
    end: int,
    width: int,
    group_by: Sequence[str],
    filters: dict[str, list[str]],
    cache: bool = True,
    batch: bool | None = None,
) -> list[asyncpg.Record]:
    """Rows ``(bucket, <group columns>, requests, input_tokens, output_tokens, cost_usd,
    cache_hits, cost_saved_usd)``.

    ``bucket`` is the bucket's start in epoch seconds; ``start``/``end`` are epoch seconds, ``end``
    exclusive; ``group_by`` are keys of GROUPS (a group column is named by GROUPS' value:
    ``credential`` text or NULL, ``batch`` boolean), ``filters`` keys of FILTERS with non-empty
    lists (validated by the caller); ``batch``: only job lines (True), only the others (False),
    both (None); ``cache``: the schema has migration 0004's columns (else hits and savings are 0).
    Empty buckets have no row.
    """
    raw = reads_events(width, group_by, filters, batch)
    t = "ts" if raw else "hour"
    cols = list(dict.fromkeys(GROUPS[g] for g in group_by))
    select = ", ".join(c if _expr(c, raw) == c else f"{_expr(c, raw)} AS {c}" for c in cols)
    where = [f"{t} >= to_timestamp($1)", f"{t} < to_timestamp($2)"]
    args: list[Any] = [start, end, width]
    for name, values in filters.items():
        args.append(values)
        where.append(f"{_expr(FILTERS[name], raw)} = ANY(${len(args)}::text[])")
    if batch is not None:
        where.append(BATCH_ROW if batch else f"NOT {BATCH_ROW}")
    sums = (
        "count(*) AS requests, coalesce(sum(prompt_tokens), 0) AS input_tokens,"
        " coalesce(sum(completion_tokens), 0) AS output_tokens, coalesce(sum(cost_usd), 0) AS cost_usd"
        if raw
        else "sum(requests) AS requests, sum(prompt_tokens) AS input_tokens,"
        " sum(completion_tokens) AS output_tokens, sum(cost_usd) AS cost_usd"
    )
    sums += _cache_sums(raw, cache)
    group = ", ".join(["1", *[str(i + 2) for i in range(len(cols))]])
    sql = (
        f"SELECT (floor(extract(epoch FROM {t}) / $3) * $3)::bigint AS bucket"
        f"{', ' + select if select else ''}, {sums}"
        f" FROM {'events' if raw else 'usage_hourly'} WHERE {' AND '.join(where)}"
        f" GROUP BY {group} ORDER BY {group}"
    )
    return list(await conn.fetch(sql, *args))


async def totals(
    conn: Conn, start: int, end: int, by: Sequence[str], cache: bool = True
) -> list[asyncpg.Record]:
    """Totals per group over ``[start, end)`` (epoch seconds) from the rollup, costliest first.

    Columns: the groups', ``requests``, ``errors``, ``prompt_tokens``, ``completion_tokens``,
    ``cost_usd``, ``cache_hits``, ``cost_saved_usd`` (0 unless ``cache``: see ``bucketed``).
    """
    cols = list(dict.fromkeys(GROUPS[g] for g in by))
    select = "".join(f"{c}, " for c in cols)
    group = f" GROUP BY {', '.join(cols)}" if cols else ""
    sql = (
        f"SELECT {select}sum(requests) AS requests, sum(errors) AS errors,"
        " sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,"
        f" sum(cost_usd) AS cost_usd{_cache_sums(False, cache)} FROM usage_hourly"
        " WHERE hour >= to_timestamp($1) AND hour < to_timestamp($2)"
        f"{group} ORDER BY cost_usd DESC NULLS LAST, requests DESC"
    )
    return [r for r in await conn.fetch(sql, start, end) if r["requests"] is not None]


def _cache_sums(raw: bool, cache: bool) -> str:
    """The select list's ``cache_hits`` and ``cost_saved_usd``: from the events, the rollup, or 0."""
    if not cache:
        return ", 0::bigint AS cache_hits, 0::numeric AS cost_saved_usd"
    if raw:
        return (
            ", count(*) FILTER (WHERE cache = 'hit') AS cache_hits,"
            " coalesce(sum(cost_saved_usd), 0) AS cost_saved_usd"
        )
    return ", sum(cache_hits) AS cache_hits, sum(cost_saved_usd) AS cost_saved_usd"


def usd(value: Decimal | None) -> float:
    return float(value or 0)
