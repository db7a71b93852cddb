"""The ledger records what the response cache did: a hit costs 0 and saves its tokens' price.

Real gateway, simulator, Redis and PostgreSQL (docs/cache.md, docs/ledger.md migration 0004).
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.ledger.rows import ROW_COLUMNS, decode_batch
from tests.jobs_helpers import poll
from tests.ledger_pg import SHARED_DSN, drop_schema, new_schema_name, run_sql, shared_server_or_fail, wait_for
from tests.procs import ROOT, Gateway, Sim
from tests.test_ledger import db_upgrade, expected_cost, write_config


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


def with_cache(config: Path) -> Path:
    data = yaml.safe_load(config.read_text())
    data["cache"] = {"key_prefix": f"test:cache-ledger:{secrets.token_hex(4)}:"}
    config.write_text(yaml.safe_dump(data))
    return config


def ask(gw: Gateway, rid: str, tag: str) -> httpx.Response:
    body: dict[str, Any] = {
        "model": "tiny",
        "messages": [{"role": "user", "content": f"hi {tag}"}],
        "temperature": 0,
        "max_tokens": 5,
    }
    return httpx.post(
        gw.v1 + "/chat/completions",
        json=body,
        headers={"authorization": "Bearer sk-alpha", "x-request-id": rid},
        timeout=30,
    )


def test_a_hit_costs_nothing_and_records_what_it_saved(sim: Sim, schema: str, tmp_path: Path) -> None:
    config = with_cache(write_config(tmp_path / "gw.yaml", SHARED_DSN, schema, tmp_path / "spool"))
    db_upgrade(config)
    gw = Gateway([sim.url], config=config)
    try:
        tag = secrets.token_hex(4)
        miss = ask(gw, "first", tag)
        assert miss.headers["x-gateway-cache"] == "miss"
        usage = miss.json()["usage"]
        n = iter(range(100))
        hit = poll(
            lambda: ask(gw, f"again-{next(n)}", tag),
            lambda r: r.headers["x-gateway-cache"] == "hit",
            10,
            "hit",
        )
        rid = hit.headers["x-request-id"]
        rows = wait_for(
            lambda: (
                run_sql(
                    SHARED_DSN,
                    "SELECT request_id, cache, backend, provider, cost_usd, cost_saved_usd, prompt_tokens,"
                    " completion_tokens FROM events WHERE request_id = ANY($1::text[]) ORDER BY ts",
                    ["first", rid],
                    schema=schema,
                )
                if len(run_sql(SHARED_DSN, "SELECT 1 FROM events WHERE request_id = $1", rid, schema=schema))
                == 1
                else None
            ),
            10,
            "both rows",
        )
        by_id = {r["request_id"]: r for r in rows}
        price = expected_cost(usage["prompt_tokens"], usage["completion_tokens"])
        first, second = by_id["first"], by_id[rid]
        assert (first["cache"], first["provider"], first["cost_usd"], first["cost_saved_usd"]) == (
            "miss",
            "local",
            price,
            Decimal(0),
        )
        assert (second["cache"], second["backend"], second["provider"]) == ("hit", "cache", "cache")
        assert second["cost_usd"] == Decimal(0) and second["cost_saved_usd"] == price
        assert (second["prompt_tokens"], second["completion_tokens"]) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
        rollup = wait_for(
            lambda: run_sql(
                SHARED_DSN,
                "SELECT sum(cache_hits) AS hits, sum(cost_saved_usd) AS saved FROM usage_hourly"
                " WHERE provider = 'cache'",
                schema=schema,
            )[0]["hits"],
            10,
            "the rollup",
        )
        assert rollup >= 1
    finally:
        gw.stop()


def test_a_schema_before_the_cache_migration_still_takes_rows(sim: Sim, schema: str, tmp_path: Path) -> None:
    """Deployed before `db upgrade`: rows are written without the cache columns, none spooled."""
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
    gw = Gateway([sim.url], config=config)
    try:
        assert ask(gw, "old-schema", secrets.token_hex(4)).status_code == 200
        wait_for(
            lambda: run_sql(
                SHARED_DSN, "SELECT 1 FROM events WHERE request_id = 'old-schema'", schema=schema
            ),
            10,
            "the row in a 0003 schema",
        )
    finally:
        gw.stop()
    cols = run_sql(
        SHARED_DSN,
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = $1 AND table_name = 'events'",
        schema,
    )
    assert "cache" not in {c["column_name"] for c in cols}  # the gateway did not migrate it


def test_rows_spooled_by_the_previous_version_replay() -> None:
    """A spool line written before migration 0004 (two columns fewer) decodes, cache columns empty."""
    old = [[1_700_000_000_000_000, 7, "rid", "chat", "s", None, "t", "std", "api_key", "default", "tiny",
            "tiny", "b", "local", False, 200, None, None, 3, 5, None, 12.5, 0.0, None, False, "0.0000012",
            None, None]]  # fmt: skip
    assert len(old[0]) == len(ROW_COLUMNS) - 2
    import orjson

    (row,) = decode_batch(orjson.dumps(old))
    cols = dict(zip(ROW_COLUMNS, row, strict=True))
    assert cols["cost_usd"] == Decimal("0.0000012")
    assert cols["cache"] is None and cols["cost_saved_usd"] == Decimal(0)
    assert cols["request_id"] == "rid" and cols["completion_tokens"] == 5
