"""The ledger's pure parts, in-process: settings, prices, the spool's codec and its locks."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.auth.principal import Principal
from gateway.errors import Fault
from gateway.ledger.config import LedgerSettings, ModelPrice
from gateway.ledger.pricing import PriceTable
from gateway.ledger.rows import ROW_COLUMNS, decode_batch, encode_batch, to_row
from gateway.ledger.spool import Spool
from gateway.pipeline.exchange import Exchange


def test_a_password_in_the_dsn_is_refused() -> None:
    with pytest.raises(ValidationError, match="no password in the DSN"):
        LedgerSettings(dsn="postgresql://u:secret@db:5432/x")
    with pytest.raises(ValidationError, match="postgresql://"):
        LedgerSettings(dsn="mysql://u@db/x")


def test_the_password_comes_from_its_variable_or_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LEDGER_PW_TEST", "s3cret")
    assert LedgerSettings(dsn="postgresql://u@db/x", password_env="LEDGER_PW_TEST").password() == "s3cret"
    (tmp_path / "pw").write_text("from-file\n")
    assert LedgerSettings(dsn="postgresql://u@db/x", password_file=tmp_path / "pw").password() == "from-file"
    with pytest.raises(ValueError, match="LEDGER_PW_UNSET is not set"):
        LedgerSettings(dsn="postgresql://u@db/x", password_env="LEDGER_PW_UNSET").password()


def test_prices_given_or_derived_from_a_gpu_hour() -> None:
    table = PriceTable(
        {
            "tiny": ModelPrice(prompt_per_million=0.5, completion_per_million=1.5),
            # 3.6 USD per GPU-hour at 1000 tokens/s: 1 USD per million completion tokens.
            "local": ModelPrice(gpu_hour=3.6, tokens_per_second=1000),
            "ext/tiny": ModelPrice(prompt_per_million=10, completion_per_million=30),
        }
    )
    assert table.cost("tiny", None, 1_000_000, 2_000_000) == Decimal("3.5")
    assert table.cost("local", None, 500, 1_000_000) == Decimal("1")
    assert table.cost("tiny", "ext", 1_000_000, 0) == Decimal("10")  # the provider's rate first
    assert table.cost("tiny", "other", 1_000_000, 0) == Decimal("0.5")
    assert table.cost("unpriced", None, 10, 10) == 0
    assert table.cost("tiny", None, None, None) == 0
    assert table.cost("tiny", None, 7, 16) == Decimal("0.0000275")
    with pytest.raises(ValidationError, match="not both"):
        ModelPrice(completion_per_million=1, gpu_hour=2, tokens_per_second=3)
    with pytest.raises(ValidationError, match="go together"):
        ModelPrice(gpu_hour=2)


def _exchange() -> Exchange:
    ex = Exchange("rid-1", "chat", started=100.0)
    ex.principal = Principal("svc", "alpha", "std", frozenset(), None, "api_key", "key:0123456789ab")
    ex.model, ex.backend, ex.route, ex.status = "tiny", "127.0.0.1:8000", "default", 200
    ex.prompt_tokens, ex.completion_tokens, ex.ttft, ex.finished = 7, 16, 0.05, 100.25
    return ex


def test_a_row_and_its_spool_line_round_trip() -> None:
    prices = PriceTable({"tiny": ModelPrice(prompt_per_million=0.5, completion_per_million=1.5)})
    row = to_row((1_800_000_000.5, _exchange(), True), prices)
    assert len(row) == len(ROW_COLUMNS)
    named = dict(zip(ROW_COLUMNS, row, strict=True))
    assert named["ts"].timestamp() == pytest.approx(1_800_000_000.25)
    assert named["provider"] == "local" and named["cost_usd"] == Decimal("0.0000275")
    assert named["credential"] == "key:0123456789ab" and named["duration_ms"] == pytest.approx(250)
    line = encode_batch([row, row])
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_batch(line) == [row, row]
    with pytest.raises(ValueError):
        decode_batch(line[: len(line) // 2])  # a torn write


def test_a_refused_or_abandoned_request_has_a_row_too() -> None:
    ex = Exchange("rid-2", "chat", started=5.0)
    ex.finished, ex.status, ex.reason, ex.fault = 5.001, 401, "invalid_api_key", Fault.CLIENT
    named = dict(zip(ROW_COLUMNS, to_row((10.0, ex, False), PriceTable({})), strict=True))
    assert (named["subject"], named["provider"], named["status"]) == ("anonymous", "-", 401)
    assert named["cost_usd"] == 0 and named["fault"] == "client"
    gone = _exchange()
    gone.disconnected, gone.response_started = True, False
    named = dict(zip(ROW_COLUMNS, to_row((10.0, gone, True), PriceTable({})), strict=True))
    assert (named["status"], named["error_reason"], named["client_disconnected"]) == (
        499,
        "client_disconnect",
        True,
    )


def test_a_segment_being_written_is_not_claimed_until_rotated(tmp_path: Path) -> None:
    writer, replayer = Spool(tmp_path), Spool(tmp_path)
    writer.append(b"[1]\n")
    (path,) = replayer.segments()
    assert writer.segments() == []  # its own open segment is not offered to itself
    assert replayer.claim(path) is None  # locked by the writer
    writer.rotate()
    claim = replayer.claim(path)
    assert claim is not None and claim.lines() == [b"[1]"]
    assert replayer.claim(path) is None  # one replayer at a time
    claim.done()
    assert replayer.segments() == []


def test_a_killed_writers_segment_is_claimable(tmp_path: Path) -> None:
    code = (
        "import os, sys; from pathlib import Path; from gateway.ledger.spool import Spool; "
        f"s = Spool(Path({str(tmp_path)!r})); s.append(b'[2]\\n'); os.kill(os.getpid(), 9)"
    )
    subprocess.run([sys.executable, "-c", code], check=False, env={**os.environ})
    (path,) = Spool(tmp_path).segments()
    claim = Spool(tmp_path).claim(path)
    assert claim is not None and claim.lines() == [b"[2]"]
    claim.release()


def test_no_ledger_section_loads_no_database_driver() -> None:
    code = (
        "import sys; from gateway.app import create_app; from gateway.config import load_settings; "
        "create_app(load_settings()); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('asyncpg', 'sqlalchemy', 'alembic')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_rows_postgres_refuses_are_set_aside_not_retried_forever(tmp_path: Path) -> None:
    """A row PostgreSQL can never take (a token count beyond integer) must not block the others."""
    from prometheus_client import CollectorRegistry

    from gateway.ledger import migrate
    from gateway.ledger.metrics import LedgerMetrics
    from gateway.ledger.writer import LedgerWriter
    from tests.ledger_pg import SHARED_DSN, drop_schema, new_schema_name, run_sql, shared_server_or_fail

    shared_server_or_fail()
    schema = new_schema_name()
    settings = LedgerSettings(dsn=SHARED_DSN, schema_name=schema, spool_dir=tmp_path, flush_interval=60)
    registry = CollectorRegistry()

    async def scenario() -> None:
        await migrate.upgrade(settings)
        writer = LedgerWriter(settings, {}, LedgerMetrics(registry))
        await writer.start()
        for i in range(5):
            ex = _exchange()
            ex.request_id = f"ok-{i}"
            if i == 2:
                ex.request_id, ex.prompt_tokens = "huge", 2**40
            writer.append(ex, True)
        await writer.stop()

    try:
        asyncio.run(scenario())
        assert registry.get_sample_value("gateway_ledger_rows_dropped_total") == 1
        assert registry.get_sample_value("gateway_ledger_rows_written_total") == 4
        (aside,) = tmp_path.glob("*.rejected")
        assert b'"huge"' in aside.read_bytes()
        assert list(tmp_path.glob("*.jsonl")) == []  # nothing left to replay
        ids = run_sql(SHARED_DSN, "SELECT request_id FROM events", schema=schema)
        assert sorted(r["request_id"] for r in ids) == ["ok-0", "ok-1", "ok-3", "ok-4"]
    finally:
        drop_schema(SHARED_DSN, schema)


def test_capture_needs_the_teams_content_consent() -> None:
    from gateway.config_auth import TeamSettings

    with pytest.raises(ValidationError, match="needs `log_content: true`"):
        TeamSettings(capture=True)
    assert TeamSettings(capture=True, log_content=True).capture
