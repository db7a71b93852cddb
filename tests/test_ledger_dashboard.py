"""The ledger's Grafana dashboard (dashboards/ledger/ledger-usage.json) against the real schema:
every panel's SQL, with Grafana's macros expanded as its PostgreSQL data source expands them, runs
on a freshly migrated ledger and answers what the rollup holds."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway.ledger import migrate
from gateway.ledger.config import LedgerSettings
from tests.ledger_pg import SHARED_DSN, drop_schema, new_schema_name, run_sql, shared_server_or_fail

DASHBOARD = Path(__file__).resolve().parents[1] / "dashboards" / "ledger" / "ledger-usage.json"
FROM = "2026-11-01T00:00:00Z"
TO = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")  # the panels' time range


def expand(sql: str, schema: str) -> str:
    """Grafana's macros (PostgreSQL data source), for a range of [FROM, TO] and 1 h intervals."""
    sql = re.sub(r"\$__timeFilter\((\w+)\)", rf"\1 BETWEEN '{FROM}' AND '{TO}'", sql)
    sql = re.sub(
        r"\$__timeGroupAlias\((\w+),\s*\$__interval\)",
        r'floor(extract(epoch from \1)/3600)*3600 AS "time"',
        sql,
    )
    assert "$" not in sql, f"a macro this test does not expand: {sql}"
    return sql.replace("ledger.", f'"{schema}".')


def panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p.get("targets")]


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> Any:
    shared_server_or_fail()
    name = new_schema_name()
    settings = LedgerSettings(dsn=SHARED_DSN, schema_name=name, spool_dir=tmp_path_factory.mktemp("spool"))
    asyncio.run(migrate.upgrade(settings))
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    rows = [  # (hour, team, subject, model, requests, errors, prompt, completion, cost, hits, saved)
        (datetime(2026, 11, 30, 10, tzinfo=UTC), "search", "alice", "tiny", 10, 1, 100, 200, "0.5", 4, "0.2"),
        (datetime(2026, 11, 30, 11, tzinfo=UTC), "search", "bob", "tiny", 5, 0, 50, 70, "0.25", 1, "0.05"),
        (datetime(2026, 11, 30, 11, tzinfo=UTC), "", "anon", "big", 2, 2, 10, 0, "0", 0, "0"),
        (now, "research", "carol", "big", 3, 0, 30, 30, "1.5", 2, "1"),  # this month, for the burn-down
    ]
    for hour, team, subject, model, req, err, pt, ct, cost, hits, saved in rows:
        run_sql(
            SHARED_DSN,
            "INSERT INTO usage_hourly (hour, team, subject, model, route, provider, requests, errors,"
            " prompt_tokens, completion_tokens, cost_usd, cache_hits, cost_saved_usd)"
            " VALUES ($1, $2, $3, $4, 'default', 'local', $5, $6, $7, $8, $9, $10, $11)",
            hour,
            team,
            subject,
            model,
            req,
            err,
            pt,
            ct,
            Decimal(cost),
            hits,
            Decimal(saved),
            schema=name,
        )
    yield name
    drop_schema(SHARED_DSN, name)


@pytest.mark.parametrize("panel", panels(), ids=lambda p: p["title"])
def test_every_panel_runs_on_the_migrated_schema(panel: dict[str, Any], schema: str) -> None:
    for target in panel["targets"]:
        got = run_sql(SHARED_DSN, expand(target["rawSql"], schema), schema=schema)
        assert got, f"{panel['title']}: no rows from a rollup that has some"
        if target["format"] == "time_series":
            assert {"time", "metric"} <= set(got[0].keys()), panel["title"]


def _by_team(title: str, schema: str) -> dict[str, Any]:
    (panel,) = [p for p in panels() if p["title"] == title]
    out: dict[str, Any] = {}
    for r in run_sql(SHARED_DSN, expand(panel["targets"][0]["rawSql"], schema), schema=schema):
        out[r["metric"]] = out.get(r["metric"], 0) + r[list(r.keys())[2]]
    return out


def test_the_cache_panels_show_hits_and_savings_per_team(schema: str) -> None:
    assert _by_team("Response cache: hits per team", schema) == {"search": 5, "(no team)": 0, "research": 2}
    saved = _by_team("Response cache: spend saved per team", schema)
    assert saved == {"search": Decimal("0.25"), "(no team)": Decimal("0"), "research": Decimal("1")}
