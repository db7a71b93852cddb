"""The ledger records what the response cache did: a hit costs 0 and saves its tokens' price.

Real gateway, simulator, Redis and PostgreSQL (docs/cache.md, docs/ledger.md migration 0004):
the rows, the rollup, the Usage/Costs APIs and the ``usage`` command; budgets that charge a hit
nothing, live and when seeded from the ledger; a schema upgraded from 0003 under a running
gateway; a spool written by the previous version replayed.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import orjson
import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry

from gateway.auth.principal import Principal
from gateway.ledger import migrate
from gateway.ledger import writer as writer_module
from gateway.ledger.config import LedgerSettings, ModelPrice
from gateway.ledger.metrics import LedgerMetrics
from gateway.ledger.rows import ROW_COLUMNS, decode_batch
from gateway.ledger.writer import LedgerWriter
from gateway.pipeline.exchange import Exchange
from tests.jobs_helpers import poll
from tests.ledger_pg import SHARED_DSN, drop_schema, new_schema_name, run_sql, shared_server_or_fail, wait_for
from tests.procs import ROOT, Gateway, Sim
from tests.test_ledger import COMPLETION_PRICE, PROMPT_PRICE, db_upgrade, expected_cost, write_config

SCHEMA = json.loads((ROOT / "tests/fixtures/openai-openapi/usage_response.schema.json").read_text())
REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    s = Sim(None, "--ttft", "0.01", "--itl", "0.005")
    yield s
    s.stop()


@pytest.fixture
def schema() -> Iterator[str]:
    shared_server_or_fail()
    name = new_schema_name()
    yield name
    drop_schema(SHARED_DSN, name)


def with_cache(config: Path, **extra: Any) -> Path:
    """The ledger test config with the cache on (a prefix of its own) and an admin key."""
    data = yaml.safe_load(config.read_text())
    data["cache"] = {"key_prefix": f"test:cache-ledger:{secrets.token_hex(4)}:"}
    data["auth"]["api_keys"].append({"key": "sk-admin", "subject": "ops", "scopes": ["admin"]})
    data.update(extra)
    config.write_text(yaml.safe_dump(data))
    return config


def ask(gw: Gateway, rid: str, tag: str, key: str = "sk-alpha") -> httpx.Response:
    body: dict[str, Any] = {
        "model": "tiny",
        "messages": [{"role": "user", "content": f"hi {tag}"}],
        "temperature": 0,
        "max_tokens": 5,
    }
    return httpx.post(
        gw.v1 + "/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}", "x-request-id": rid},
        timeout=30,
    )


def hit(gw: Gateway, tag: str, prefix: str, key: str = "sk-alpha") -> list[httpx.Response]:
    """Ask until the cache answers (the miss's fill lands in a task): every response, the hit last."""
    seen: list[httpx.Response] = []
    n = iter(range(1000))

    def once() -> httpx.Response:
        r = ask(gw, f"{prefix}-{next(n)}", tag, key)
        assert r.status_code == 200, r.text
        seen.append(r)
        return r

    poll(once, lambda r: r.headers["x-gateway-cache"] == "hit", 10, "a cache hit")
    return seen


def rows_of(schema: str, rids: list[str], what: str) -> dict[str, Any]:
    """The events rows of ``rids`` by request id, once all are written."""
    query = (
        "SELECT request_id, cache, backend, provider, status, cost_usd, cost_saved_usd, prompt_tokens,"
        " completion_tokens FROM events WHERE request_id = ANY($1::text[])"
    )

    def written() -> list[Any] | None:
        rows = run_sql(SHARED_DSN, query, rids, schema=schema)
        return rows if len(rows) == len(rids) else None

    return {r["request_id"]: r for r in wait_for(written, 10, what)}


def api(gw: Gateway, path: str, **params: Any) -> dict[str, Any]:
    r = httpx.get(gw.url + path, params=params, headers={"authorization": "Bearer sk-admin"}, timeout=30)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    jsonschema.validate(body, SCHEMA)
    return body


def results(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [res for bucket in body["data"] for res in bucket["results"]]


def usage_command(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "usage", "--config", str(config), "--since", "1d", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


@dataclass
class Served:
    """A gateway (cache and ledger on) that answered one miss and then, for the same request, a hit."""

    gw: Gateway
    schema: str
    config: Path
    responses: list[httpx.Response]  # the first miss, maybe more misses, the hit last
    usage: dict[str, int]  # the first miss's usage (the hit's stored answer)


@pytest.fixture(scope="module")
def served(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    shared_server_or_fail()
    schema = new_schema_name()
    tmp = tmp_path_factory.mktemp("served")
    config = with_cache(write_config(tmp / "gw.yaml", SHARED_DSN, schema, tmp / "spool"))
    db_upgrade(config)
    gw = Gateway([sim.url], config=config)
    try:
        tag = secrets.token_hex(4)
        first = ask(gw, "first", tag)
        assert first.headers["x-gateway-cache"] == "miss"
        responses = [first, *hit(gw, tag, "again")]
        rows_of(schema, [r.headers["x-request-id"] for r in responses], "every row")
        yield Served(gw, schema, config, responses, first.json()["usage"])
    finally:
        gw.stop()
        drop_schema(SHARED_DSN, schema)


def test_a_hit_costs_nothing_and_records_what_it_saved(served: Served) -> None:
    rid = served.responses[-1].headers["x-request-id"]
    rows = rows_of(served.schema, ["first", rid], "both rows")
    price = expected_cost(served.usage["prompt_tokens"], served.usage["completion_tokens"])
    assert price > 0
    first, second = rows["first"], rows[rid]
    assert (first["cache"], first["provider"], first["cost_usd"], first["cost_saved_usd"]) == (
        "miss",
        "local",
        price,
        Decimal(0),
    )
    assert (second["cache"], second["backend"], second["provider"], second["status"]) == (
        "hit",
        "cache",
        "cache",
        200,
    )
    assert (second["cost_usd"], second["cost_saved_usd"]) == (Decimal(0), price)
    assert (second["prompt_tokens"], second["completion_tokens"]) == (
        served.usage["prompt_tokens"],
        served.usage["completion_tokens"],
    )


def test_the_rollup_counts_hits_and_savings_as_the_events_do(served: Served) -> None:
    rollup = run_sql(
        SHARED_DSN,
        "SELECT provider, sum(requests) AS n, sum(cache_hits) AS hits, sum(cost_usd) AS usd,"
        " sum(cost_saved_usd) AS saved FROM usage_hourly GROUP BY provider ORDER BY provider",
        schema=served.schema,
    )
    events = run_sql(
        SHARED_DSN,
        "SELECT provider, count(*) AS n, count(*) FILTER (WHERE cache = 'hit') AS hits,"
        " sum(cost_usd) AS usd, sum(cost_saved_usd) AS saved FROM events GROUP BY provider ORDER BY provider",
        schema=served.schema,
    )
    assert [dict(r) for r in rollup] == [dict(r) for r in events]
    assert [(r["provider"], r["hits"], r["n"]) for r in rollup] == [
        ("cache", 1, 1),
        ("local", 0, len(served.responses) - 1),
    ]


def test_the_usage_and_costs_apis_report_hits_and_savings(served: Served) -> None:
    sums = run_sql(
        SHARED_DSN,
        "SELECT count(*) AS n, count(*) FILTER (WHERE cache = 'hit') AS hits,"
        " sum(cost_usd) AS usd, sum(cost_saved_usd) AS saved FROM events WHERE team = 'alpha'",
        schema=served.schema,
    )[0]
    start = int(time.time()) - 3600
    for width in ("1d", "1m"):  # the rollup, and the events themselves
        params: dict[str, Any] = {
            "start_time": start,
            "bucket_width": width,
            "limit": 2 if width == "1d" else 62,
        }
        body = api(served.gw, "/v1/organization/usage/completions", group_by="provider", **params)
        by_provider = results(body)
        got = {r["provider"]: (r["num_model_requests"], r["num_cache_hits"]) for r in by_provider}
        assert got == {"cache": (1, 1), "local": (sums["n"] - 1, 0)}, (
            width,
            start,
            time.time(),
            [(b["start_time"], len(b["results"])) for b in body["data"] if b["results"]][:5],
            [(bd["start_time"], bd["end_time"]) for bd in (body["data"][0], body["data"][-1])],
            run_sql(SHARED_DSN, "SELECT extract(epoch FROM ts), provider FROM events", schema=served.schema),
        )
    costs = results(
        api(
            served.gw,
            "/v1/organization/costs",
            start_time=start,
            group_by="project_id",
            bucket_width="1h",
            limit=25,
        )
    )
    (alpha,) = [r for r in costs if r["project_id"] == "alpha"]
    assert alpha["amount"] == {"value": float(sums["usd"]), "currency": "usd"}
    assert alpha["cache_saved_amount"] == {"value": float(sums["saved"]), "currency": "usd"}
    assert sums["saved"] > 0


def test_the_usage_command_shows_hits_and_savings(served: Served) -> None:
    out = usage_command(served.config, "--by", "team,provider", "--csv")
    assert out.returncode == 0, out.stderr
    got = {(r["team"], r["provider"]): r for r in csv.DictReader(io.StringIO(out.stdout))}
    price = expected_cost(served.usage["prompt_tokens"], served.usage["completion_tokens"])
    assert (got["alpha", "cache"]["cache_hits"], Decimal(got["alpha", "cache"]["cost_saved_usd"])) == (
        "1",
        price.quantize(Decimal("1e-6")),
    )
    assert got["alpha", "local"]["cache_hits"] == "0"
    table = usage_command(served.config, "--by", "provider")
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split()[-2:] == ["cache_hits", "cost_saved_usd"]
    assert {line.split()[0]: line.split()[-2] for line in lines} == {"cache": "1", "local": "0"}


def test_a_hit_charges_nothing_against_the_team_budget(sim: Sim, schema: str, tmp_path: Path) -> None:
    """Misses are charged their tokens, hits nothing; a month seeded from the ledger agrees."""
    team, budget = f"cl-{secrets.token_hex(4)}", 1_000_000
    config = write_config(tmp_path / "gw.yaml", SHARED_DSN, schema, tmp_path / "spool")
    data = yaml.safe_load(config.read_text())
    data["auth"]["api_keys"].append({"key": "sk-budget", "subject": "svc-budget", "team": team})
    data["teams"][team] = {"budget": {"monthly_tokens": budget}}
    config.write_text(yaml.safe_dump(data))
    with_cache(config, rate_limits={"storage": REDIS_URL})
    db_upgrade(config)
    store = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    key = f"llmgw:budget:{team}:{time.gmtime().tm_year}{time.gmtime().tm_mon:02d}"
    gw = Gateway([sim.url], config=config)
    try:
        tag = secrets.token_hex(4)
        responses = [ask(gw, "b-first", tag, "sk-budget"), *hit(gw, tag, "b-again", "sk-budget")]
        responses.append(ask(gw, "b-other", secrets.token_hex(4), "sk-budget"))
        assert responses[-1].headers["x-gateway-cache"] == "miss"
        kinds = [r.headers["x-gateway-cache"] for r in responses]
        assert kinds.count("hit") == 1
        missed = sum(
            r.json()["usage"]["prompt_tokens"] + r.json()["usage"]["completion_tokens"]
            for r in responses
            if r.headers["x-gateway-cache"] == "miss"
        )
        # The last miss's charge is sent after the hit's would have been: once it landed, the sum is whole.
        charged = poll(lambda: int(store.hget(key, "tokens") or 0), lambda t: t >= missed, 10, "the charges")
        assert charged == missed
        rows_of(schema, [r.headers["x-request-id"] for r in responses], "the team's rows")
        store.delete(key)  # the month is seeded again from the ledger's rollup
        after = ask(gw, "b-seeded", secrets.token_hex(4), "sk-budget")
        assert after.status_code == 200
        assert int(after.headers["x-budget-remaining-tokens"]) == budget - missed
    finally:
        gw.stop()
        store.delete(key)
        store.close()


def test_a_schema_upgraded_from_0003_under_a_running_gateway(sim: Sim, schema: str, tmp_path: Path) -> None:
    """Deployed before `db upgrade`: rows go in without the cache columns; after the upgrade the
    old rows read as not looked up, the next gateway writes them, and the rollup adds up."""
    config = with_cache(write_config(tmp_path / "gw.yaml", SHARED_DSN, schema, tmp_path / "spool"))
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "db", "upgrade", "--config", str(config), "--revision", "0003"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "at revision 0003" in out.stdout
    tag = secrets.token_hex(4)
    gw = Gateway([sim.url], config=config)
    try:
        before = [ask(gw, "old-first", tag), *hit(gw, tag, "old-again")]
        old_rids = [r.headers["x-request-id"] for r in before]
        wait_for(
            lambda: (
                len(
                    run_sql(
                        SHARED_DSN,
                        "SELECT 1 FROM events WHERE request_id = ANY($1::text[])",
                        old_rids,
                        schema=schema,
                    )
                )
                == len(old_rids)
            ),
            10,
            "the rows in a 0003 schema",
        )
        cols = run_sql(
            SHARED_DSN,
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = $1 AND table_name = 'events'",
            schema,
        )
        assert "cache" not in {c["column_name"] for c in cols}  # the gateway did not migrate it
        # The Usage and Costs APIs answer on a schema without the columns: no hits, nothing saved.
        costs = results(
            api(
                gw, "/v1/organization/costs", start_time=int(time.time()) - 86400, bucket_width="1h", limit=25
            )
        )
        assert {r["cache_saved_amount"]["value"] for r in costs} == {0.0}
        db_upgrade(config)  # while the gateway runs
        during = ask(gw, "during-upgrade", tag)
        assert during.headers["x-gateway-cache"] == "hit"
        wait_for(
            lambda: run_sql(
                SHARED_DSN, "SELECT 1 FROM events WHERE request_id = 'during-upgrade'", schema=schema
            ),
            10,
            "a row written across the upgrade",
        )
    finally:
        gw.stop()
    old = rows_of(schema, old_rids, "the rows before the upgrade")
    assert {(r["cache"], r["cost_saved_usd"]) for r in old.values()} == {(None, Decimal(0))}
    assert old[old_rids[-1]]["cost_usd"] == Decimal(0) and old[old_rids[-1]]["provider"] == "cache"
    gw = Gateway([sim.url], config=config)
    try:
        after = ask(gw, "after-upgrade", tag)
        assert after.headers["x-gateway-cache"] == "hit"
        row = rows_of(schema, ["after-upgrade"], "the row after the upgrade")["after-upgrade"]
    finally:
        gw.stop()
    usage = before[0].json()["usage"]
    assert (row["cache"], row["cost_usd"]) == ("hit", Decimal(0))
    assert row["cost_saved_usd"] == expected_cost(usage["prompt_tokens"], usage["completion_tokens"])
    # The hits' rollup row from before the upgrade (hits 0) took the new hit's count and savings.
    rollup = run_sql(
        SHARED_DSN,
        "SELECT sum(requests) AS n, sum(cache_hits) AS hits, sum(cost_saved_usd) AS saved"
        " FROM usage_hourly WHERE provider = 'cache'",
        schema=schema,
    )[0]
    events = run_sql(
        SHARED_DSN,
        "SELECT count(*) AS n, count(*) FILTER (WHERE cache = 'hit') AS hits, sum(cost_saved_usd) AS saved"
        " FROM events WHERE provider = 'cache'",
        schema=schema,
    )[0]
    assert dict(rollup) == dict(events)
    assert rollup["n"] == 3 and rollup["hits"] >= 1


def test_a_running_writer_takes_up_the_upgrade_at_its_maintenance(
    schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No restart needed: the writer re-reads the schema's revision at each maintenance."""
    monkeypatch.setattr(writer_module, "MAINTENANCE_INTERVAL", 0.2)
    settings = LedgerSettings(
        dsn=SHARED_DSN, schema_name=schema, spool_dir=tmp_path / "spool", flush_interval=0.1
    )
    prices = {"tiny": ModelPrice(prompt_per_million=PROMPT_PRICE, completion_per_million=COMPLETION_PRICE)}
    principal = Principal("svc", "alpha", None, frozenset(), None, "api_key", "key:000000000000")

    def a_hit(rid: str) -> Exchange:
        ex = Exchange(rid, "chat", 0.0, principal=principal, model="tiny", backend="cache")
        ex.route, ex.status, ex.finished, ex.cache = "default", 200, 0.01, "hit"
        ex.prompt_tokens, ex.completion_tokens = 11, 5
        return ex

    async def row(rid: str) -> Any:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = await asyncio.to_thread(
                run_sql, SHARED_DSN, "SELECT * FROM events WHERE request_id = $1", rid, schema=schema
            )
            if found:
                return found[0]
            await asyncio.sleep(0.1)
        raise AssertionError(f"the row {rid}: not after 10s")

    async def go() -> tuple[Any, Any]:
        await migrate.upgrade(settings, "0003")
        writer = LedgerWriter(settings, prices, LedgerMetrics(CollectorRegistry()))
        await writer.start()
        try:
            writer.append(a_hit("w-before"), True)
            await row("w-before")
            await migrate.upgrade(settings)
            deadline = time.monotonic() + 10
            n = 0
            while True:  # rows written until the writer has seen the new columns
                n += 1
                writer.append(a_hit(f"w-after-{n}"), True)
                got = await row(f"w-after-{n}")
                if got["cache"] is not None or time.monotonic() > deadline:
                    return await row("w-before"), got
        finally:
            await writer.stop()

    before, after = asyncio.run(go())
    assert (before["cache"], before["cost_usd"], before["cost_saved_usd"]) == (None, Decimal(0), Decimal(0))
    assert (after["cache"], after["cost_usd"], after["cost_saved_usd"]) == (
        "hit",
        Decimal(0),
        expected_cost(11, 5),
    )


def old_spool_line(ts: float, rid: str) -> bytes:
    """A batch as the version before migration 0004 spooled it: the events' 26 columns, then the
    capture's two; ``cost_usd`` a decimal string."""
    row = [int(ts * 1_000_000), secrets.randbits(62), rid, "chat", "svc-alpha", "key:0123456789ab",
           "alpha", "std", "api_key", "default", "tiny", "tiny", "b", "local", False, 200, None, None, 3, 5,
           None, 12.5, 0.0, None, False, "0.0000012", None, None]  # fmt: skip
    assert len(row) == len(ROW_COLUMNS) - 2
    return orjson.dumps([row]) + b"\n"


def test_rows_spooled_by_the_previous_version_decode() -> None:
    """Two columns fewer decode to a row with the cache columns empty."""
    (row,) = decode_batch(old_spool_line(1_700_000_000, "rid"))
    cols = dict(zip(ROW_COLUMNS, row, strict=True))
    assert cols["cost_usd"] == Decimal("0.0000012")
    assert cols["cache"] is None and cols["cost_saved_usd"] == Decimal(0)
    assert cols["request_id"] == "rid" and cols["completion_tokens"] == 5


def test_a_spool_of_the_previous_version_is_replayed(sim: Sim, schema: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    # A segment left by a gateway of the previous version (its process gone: nobody holds the lock).
    (spool / f"{time.time_ns()}-{os.getpid()}.jsonl").write_bytes(
        old_spool_line(time.time() - 5, "spooled-old")
    )
    config = write_config(tmp_path / "gw.yaml", SHARED_DSN, schema, spool)
    db_upgrade(config)
    gw = Gateway([sim.url], config=config)
    try:
        row = rows_of(schema, ["spooled-old"], "the spooled row")["spooled-old"]
        wait_for(lambda: not list(spool.glob("*.jsonl")), 10, "the segment deleted")
    finally:
        gw.stop()
    assert (row["cache"], row["cost_usd"], row["cost_saved_usd"]) == (None, Decimal("0.0000012"), Decimal(0))
    rollup = run_sql(SHARED_DSN, "SELECT requests, cache_hits, cost_usd FROM usage_hourly", schema=schema)
    assert [tuple(r) for r in rollup] == [(1, 0, Decimal("0.0000012"))]
