"""Usage and Costs APIs and the ``usage`` CLI over a ledger filled through the real writer.

Rows go through LedgerWriter (in-process, real PostgreSQL) exactly as a gateway writes them; the
API is asked through a real gateway process and checked against OpenAI's UsageResponse schema and
against direct SQL sums over the events (the API reads the hourly rollup).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.auth.principal import Principal
from gateway.ledger import migrate
from gateway.ledger.config import LedgerSettings, ModelPrice
from gateway.ledger.metrics import LedgerMetrics
from gateway.ledger.writer import LedgerWriter
from gateway.pipeline.exchange import Exchange
from tests.ledger_pg import SHARED_DSN, drop_schema, new_schema_name, run_sql, shared_server_or_fail
from tests.procs import ROOT, Gateway, Sim

# 200,000 in the suite; LEDGER_USAGE_ROWS=1000000 for the measurement (docs/ledger.md).
ROWS = int(os.environ.get("LEDGER_USAGE_ROWS", "200000"))
DAYS = 3
SCHEMA = json.loads((ROOT / "tests/fixtures/openai-openapi/usage_response.schema.json").read_text())
PRICES = {
    f"m{i}": ModelPrice(prompt_per_million=0.1 * (i + 1), completion_per_million=0.3 * (i + 1))
    for i in range(3)
}


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, float]]:
    """A schema holding ROWS synthetic requests over the last DAYS days; (schema, now)."""
    shared_server_or_fail()
    schema = new_schema_name()
    spool = tmp_path_factory.mktemp("spool")
    settings = LedgerSettings(
        dsn=SHARED_DSN, schema_name=schema, spool_dir=spool, flush_interval=60, max_buffer_rows=ROWS
    )
    now = time.time()
    rng = random.Random(7)
    principals = [
        Principal(f"s{i}", f"t{i % 5}", None, frozenset(), None, "api_key", f"key:{i:012x}")
        for i in range(20)
    ]

    async def fill() -> None:
        await migrate.upgrade(settings)
        writer = LedgerWriter(settings, PRICES, LedgerMetrics(CollectorRegistry()))
        await writer.start()
        for i in range(ROWS):
            # Arrival = end - duration: a synthetic duration spreads the arrivals over DAYS days.
            ex = Exchange(f"r{i}", "chat", 0.0, principal=principals[i % 20], model=f"m{i % 3}", backend="b")
            ex.route, ex.status, ex.finished = "default", 200, rng.uniform(0, DAYS * 86400)
            ex.prompt_tokens, ex.completion_tokens = rng.randint(1, 500), rng.randint(1, 500)
            writer.append(ex, True)
            if i % settings.batch_rows == 0:
                await asyncio.sleep(0)  # let the writer's task take full batches
        await writer.stop()

    asyncio.run(fill())
    yield schema, now
    drop_schema(SHARED_DSN, schema)


@pytest.fixture(scope="module")
def gateway(filled: tuple[str, float], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    schema, _ = filled
    path = tmp_path_factory.mktemp("cfg") / "gw.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "auth": {
                    "api_keys": [
                        {"key": "sk-admin", "subject": "ops", "scopes": ["admin"]},
                        {"key": "sk-user", "subject": "dev", "team": "t0"},
                    ]
                },
                "ledger": {"dsn": SHARED_DSN, "schema_name": schema, "spool_dir": str(path.parent / "spool")},
            }
        )
    )
    sim = Sim(None)
    try:
        gw = Gateway([sim.url], config=path)
        yield gw
        gw.stop()
    finally:
        sim.stop()


def get(gw: Gateway, path: str, key: str = "sk-admin", **params: Any) -> httpx.Response:
    return httpx.get(gw.url + path, params=params, headers={"authorization": f"Bearer {key}"}, timeout=60)


def test_only_admins_read_usage(gateway: Gateway) -> None:
    r = get(gateway, "/v1/organization/usage/completions", key="sk-user", start_time=0)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    r = get(gateway, "/v1/organization/costs", key="sk-wrong", start_time=0)
    assert r.status_code == 401


def test_usage_by_team_and_model_matches_the_events(gateway: Gateway, filled: tuple[str, float]) -> None:
    schema, now = filled
    start = int(now) - DAYS * 86400 - 86400
    began = time.perf_counter()
    r = get(
        gateway,
        "/v1/organization/usage/completions",
        start_time=start,
        end_time=int(now) + 60,
        bucket_width="1d",
        group_by=["project_id", "model"],
        limit=31,
    )
    elapsed = time.perf_counter() - began
    assert r.status_code == 200, r.text
    body = r.json()
    jsonschema.validate(body, SCHEMA)
    assert body["has_more"] is False and body["next_page"] is None
    got: dict[tuple[str, str], list[int]] = {}
    for bucket in body["data"]:
        assert bucket["end_time"] - bucket["start_time"] == 86400
        for res in bucket["results"]:
            acc = got.setdefault((res["project_id"], res["model"]), [0, 0, 0])
            acc[0] += res["num_model_requests"]
            acc[1] += res["input_tokens"]
            acc[2] += res["output_tokens"]
    want = {
        (row["team"], row["model"]): [row["n"], row["p"], row["c"]]
        for row in run_sql(
            SHARED_DSN,
            "SELECT team, model, count(*) AS n, sum(prompt_tokens) AS p, sum(completion_tokens) AS c"
            " FROM events GROUP BY team, model",
            schema=schema,
        )
    }
    assert got == want
    assert sum(v[0] for v in got.values()) == ROWS
    print(f"\n1d usage over {ROWS} rows, grouped by team and model: {elapsed * 1000:.0f} ms")


def test_usage_by_api_key_reads_the_events_and_matches_them(
    gateway: Gateway, filled: tuple[str, float]
) -> None:
    """``group_by=api_key_id`` (and the ``api_key_ids``/``batch`` filters) read the events, which
    the rollup does not key by credential: equal to direct SQL, and timed for docs/ledger.md."""
    schema, now = filled
    params: dict[str, Any] = {
        "start_time": int(now) - DAYS * 86400 - 86400,
        "end_time": int(now) + 60,
        "bucket_width": "1d",
        "limit": 31,
    }
    began = time.perf_counter()
    r = get(gateway, "/v1/organization/usage/completions", group_by=["api_key_id", "batch"], **params)
    grouped = time.perf_counter() - began
    assert r.status_code == 200, r.text
    body = r.json()
    jsonschema.validate(body, SCHEMA)
    got: dict[str, int] = {}
    for bucket in body["data"]:
        for res in bucket["results"]:
            assert res["batch"] is False  # no job line among the synthetic rows
            got[res["api_key_id"]] = got.get(res["api_key_id"], 0) + res["input_tokens"]
    want = {
        row["credential"]: row["p"]
        for row in run_sql(
            SHARED_DSN,
            "SELECT credential, sum(prompt_tokens) AS p FROM events GROUP BY credential",
            schema=schema,
        )
    }
    assert got == want and len(got) == 20
    began = time.perf_counter()
    r = get(gateway, "/v1/organization/usage/completions", api_key_ids="key:000000000003", **params)
    filtered = time.perf_counter() - began
    assert r.status_code == 200, r.text
    total = sum(res["input_tokens"] for b in r.json()["data"] for res in b["results"])
    assert total == want["key:000000000003"]
    print(
        f"\n1d usage over {ROWS} rows from the events: grouped by api key and batch"
        f" {grouped * 1000:.0f} ms, one api key {filtered * 1000:.0f} ms"
    )


def test_costs_by_team_match_the_events(gateway: Gateway, filled: tuple[str, float]) -> None:
    schema, now = filled
    r = get(
        gateway,
        "/v1/organization/costs",
        start_time=int(now) - (DAYS + 1) * 86400,
        end_time=int(now) + 60,
        group_by="project_id",
        limit=180,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    jsonschema.validate(body, SCHEMA)
    got: dict[str, Decimal] = {}
    for bucket in body["data"]:
        for res in bucket["results"]:
            assert res["amount"]["currency"] == "usd"
            got[res["project_id"]] = got.get(res["project_id"], Decimal(0)) + Decimal(
                str(res["amount"]["value"])
            )
    want = {
        row["team"]: row["usd"]
        for row in run_sql(
            SHARED_DSN, "SELECT team, sum(cost_usd) AS usd FROM events GROUP BY team", schema=schema
        )
    }
    assert set(got) == set(want)
    for team, usd in want.items():
        assert abs(got[team] - usd) < Decimal("1e-6"), team  # floats on the wire, numeric in the table


def test_hourly_buckets_page_through_the_whole_range(gateway: Gateway, filled: tuple[str, float]) -> None:
    _, now = filled
    params: dict[str, Any] = {
        "start_time": int(now) - DAYS * 86400 - 3600,
        "end_time": int(now) + 3600,
        "bucket_width": "1h",
        "limit": 24,
    }
    total, pages, last_end = 0, 0, None
    while True:
        body = get(gateway, "/v1/organization/usage/completions", **params).json()
        jsonschema.validate(body, SCHEMA)
        pages += 1
        if last_end is not None:
            assert body["data"][0]["start_time"] == last_end  # pages continue where the last one ended
        last_end = body["data"][-1]["end_time"]
        total += sum(res["num_model_requests"] for b in body["data"] for res in b["results"])
        if not body["has_more"]:
            break
        params["page"] = body["next_page"]
    assert pages == DAYS + 1 or pages == DAYS + 2
    assert total == ROWS


def test_the_usage_command_prints_totals_by_team_and_model(
    gateway: Gateway, filled: tuple[str, float]
) -> None:
    schema, _ = filled
    config = ROOT / ".cache" / f"usage-{schema}.yaml"
    config.parent.mkdir(exist_ok=True)
    config.write_text(yaml.safe_dump({"ledger": {"dsn": SHARED_DSN, "schema_name": schema}}))
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "usage",
                "--config",
                str(config),
                "--since",
                "30d",
                "--by",
                "team,model",
                "--csv",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        table = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "usage",
                "--config",
                str(config),
                "--since",
                "30d",
                "--by",
                "team",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
    finally:
        config.unlink()
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    got = {(r["team"], r["model"]): (int(r["requests"]), Decimal(r["cost_usd"])) for r in rows}
    want = {
        (row["team"], row["model"]): (row["n"], row["usd"])
        for row in run_sql(
            SHARED_DSN,
            "SELECT team, model, count(*) AS n, sum(cost_usd) AS usd FROM events GROUP BY 1, 2",
            schema=schema,
        )
    }
    assert set(got) == set(want)
    for k, (n, usd) in want.items():
        assert got[k][0] == n and abs(got[k][1] - usd) <= Decimal("0.000001"), k
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "team",
        "requests",
        "errors",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
    ]
    assert len(lines) == 1 + 5


def test_the_grafana_dashboards_queries_run_on_the_ledger(filled: tuple[str, float]) -> None:
    """Every panel of dashboards/ledger/ runs (Grafana's macros expanded as Grafana does) and has data."""
    schema, _ = filled
    dash = json.loads((ROOT / "dashboards/ledger/ledger-usage.json").read_text())
    ds = json.loads(json.dumps(dash["panels"][0]["datasource"]))
    assert (
        ds["uid"]
        == yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/ledger.yml").read_text())[
            "datasources"
        ][0]["uid"]
    )
    for panel in dash["panels"]:
        (target,) = panel["targets"]
        sql = (
            target["rawSql"]
            .replace("$__timeFilter(hour)", "hour BETWEEN now() - interval '7 days' AND now()")
            .replace("$__timeGroupAlias(hour, $__interval)", "date_trunc('hour', hour) AS time")
            .replace("ledger.", f"{schema}.")
        )
        rows = run_sql(SHARED_DSN, sql)
        assert rows, panel["title"]
