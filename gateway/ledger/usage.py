"""Usage and cost queries over the ledger: time buckets (the API) and totals (the CLI).

``1h`` and ``1d`` buckets and totals read the hourly rollup (``usage_hourly``), so their cost does
not grow with the number of requests; ``1m`` buckets read the events themselves (a day at most).
Bucket edges are aligned to the bucket width in UTC.
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
}
FILTERS = {"project_ids": "team", "user_ids": "subject", "models": "model"}


async def bucketed(
    conn: Conn,
    start: int,
    end: int,
    width: int,
    group_by: Sequence[str],
    filters: dict[str, list[str]],
) -> list[asyncpg.Record]:
    """Rows ``(bucket, <group columns>, requests, input_tokens, output_tokens, cost_usd)``.

    ``bucket`` is the bucket's start in epoch seconds; ``start``/``end`` are epoch seconds, ``end``
    exclusive; ``group_by`` are keys of GROUPS, ``filters`` keys of FILTERS (validated by the
    caller). Empty buckets have no row.
    """
    raw = width < 3600
    t = "ts" if raw else "hour"
    cols = list(dict.fromkeys(GROUPS[g] for g in group_by))
    select = ", ".join("coalesce(team, '') AS team" if c == "team" and raw else c for c in cols)
    where = [f"{t} >= to_timestamp($1)", f"{t} < to_timestamp($2)"]
    args: list[Any] = [start, end, width]
    for name, values in filters.items():
        args.append(values)
        col = FILTERS[name]
        expr = "coalesce(team, '')" if col == "team" and raw else col
        where.append(f"{expr} = ANY(${len(args)}::text[])")
    sums = (
        "count(*) AS requests, coalesce(sum(prompt_tokens), 0) AS input_tokens,"
        " coalesce(sum(completion_tokens), 0) AS output_tokens, coalesce(sum(cost_usd), 0) AS cost_usd"
        if raw
        else "sum(requests) AS requests, sum(prompt_tokens) AS input_tokens,"
        " sum(completion_tokens) AS output_tokens, sum(cost_usd) AS cost_usd"
    )
    group = ", ".join(["1", *[str(i + 2) for i in range(len(cols))]])
    sql = (
        f"SELECT (floor(extract(epoch FROM {t}) / $3) * $3)::bigint AS bucket"
        f"{', ' + select if select else ''}, {sums}"
        f" FROM {'events' if raw else 'usage_hourly'} WHERE {' AND '.join(where)}"
        f" GROUP BY {group} ORDER BY {group}"
    )
    return list(await conn.fetch(sql, *args))


async def totals(conn: Conn, start: int, end: int, by: Sequence[str]) -> list[asyncpg.Record]:
    """Totals per group over ``[start, end)`` (epoch seconds) from the rollup, costliest first."""
    cols = list(dict.fromkeys(GROUPS[g] for g in by))
    select = "".join(f"{c}, " for c in cols)
    group = f" GROUP BY {', '.join(cols)}" if cols else ""
    sql = (
        f"SELECT {select}sum(requests) AS requests, sum(errors) AS errors,"
        " sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,"
        " sum(cost_usd) AS cost_usd FROM usage_hourly"
        " WHERE hour >= to_timestamp($1) AND hour < to_timestamp($2)"
        f"{group} ORDER BY cost_usd DESC NULLS LAST, requests DESC"
    )
    return [r for r in await conn.fetch(sql, start, end) if r["requests"] is not None]


def usd(value: Decimal | None) -> float:
    return float(value or 0)
