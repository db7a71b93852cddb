"""Adversarial tests of the usage ledger (issue #14): hostile inputs and secrets in logs.

Real gateway processes, real PostgreSQL (a fresh schema per test on the shared server).
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.ledger_pg import SHARED_DSN, drop_schema, new_schema_name, run_sql, shared_server_or_fail, wait_for
from tests.procs import Gateway, Proc, Sim, free_port, python_m


@pytest.fixture
def admin_gateway(tmp_path: Path) -> Iterator[Gateway]:
    shared_server_or_fail()
    schema = new_schema_name()
    path = tmp_path / "gw.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "auth": {"api_keys": [{"key": "sk-admin", "subject": "ops", "scopes": ["admin"]}]},
                "ledger": {
                    "dsn": SHARED_DSN,
                    "schema_name": schema,
                    "spool_dir": str(tmp_path / "spool"),
                    "auto_migrate": True,
                },
            }
        )
    )
    sim = Sim(None)
    try:
        gw = Gateway([sim.url], config=path)
        try:
            yield gw
        finally:
            gw.stop()
    finally:
        sim.stop()
        drop_schema(SHARED_DSN, schema)


HOSTILE: list[tuple[str, dict[str, str]]] = [
    # a page cursor of non-ASCII digits: str.isdigit() accepts it, int() may not
    ("/v1/organization/usage/completions", {"start_time": "0", "page": "\u00b2"}),
    ("/v1/organization/costs", {"start_time": "0", "page": "\u00b9\u00b2"}),
    # a cursor longer than Python's int-parsing limit
    ("/v1/organization/usage/completions", {"start_time": "0", "page": "1" * 5000}),
    # a cursor past PostgreSQL's timestamp range
    ("/v1/organization/usage/completions", {"start_time": "0", "page": str(10**30)}),
    # times outside PostgreSQL's timestamp range
    ("/v1/organization/usage/completions", {"start_time": str(-(10**15))}),
    ("/v1/organization/costs", {"start_time": str(-(10**30))}),
    ("/v1/organization/usage/completions", {"start_time": str(10**15), "end_time": str(10**15 + 100)}),
    # a NUL byte in a filter
    ("/v1/organization/usage/completions", {"start_time": "0", "models": "a\x00b"}),
    ("/v1/organization/costs", {"start_time": "0", "project_ids": "t\x00"}),
]


@pytest.mark.parametrize(
    ("path", "params"), HOSTILE, ids=[f"{p.rsplit('/', 1)[1]}-{i}" for i, (p, _) in enumerate(HOSTILE)]
)
def test_hostile_usage_parameters_are_clean_400s(
    admin_gateway: Gateway, path: str, params: dict[str, str]
) -> None:
    """Hostile query parameters get an OpenAI-shaped 400, never a 500 (or a 503 blaming the
    database, with a Retry-After that invites the client to repeat the same bad request)."""
    r = httpx.get(
        admin_gateway.url + path, params=params, headers={"authorization": "Bearer sk-admin"}, timeout=30
    )
    assert r.status_code == 400, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"], err
    assert admin_gateway.proc.alive()


def test_a_password_in_the_dsn_query_string_is_never_logged(tmp_path: Path) -> None:
    """`?password=` is a libpq parameter asyncpg honours: the validator refuses a password in the
    DSN's userinfo but not there, and the "ledger connected" line logs the DSN as given."""
    shared_server_or_fail()
    schema = new_schema_name()
    secret = "Hunter2-adv14-secret"
    path = tmp_path / "gw.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "ledger": {
                    "dsn": f"{SHARED_DSN}?password={secret}",
                    "schema_name": schema,
                    "spool_dir": str(tmp_path / "spool"),
                    "auto_migrate": True,
                }
            }
        )
    )
    sim = Sim(None)
    port = free_port()
    proc = Proc(
        [*python_m("gateway"), "serve", "--port", str(port), "--config", str(path), "--backend", sim.url]
    )
    try:
        # Either the configuration is refused (the process ends) or the writer connects.
        wait_for(
            lambda: not proc.alive() or "ledger connected" in proc.output(),
            60,
            "the gateway exits or logs its ledger connection",
        )
        if proc.alive():
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10)
    finally:
        proc.stop()
        sim.stop()
        drop_schema(SHARED_DSN, schema)
    assert secret not in proc.output()


def test_a_stream_the_client_leaves_before_its_usage_still_counts(tmp_path: Path) -> None:
    """A client that reads a stream's tokens and leaves before the final usage chunk: the ledger
    row has NULL tokens and cost 0, and the team's token budget is never charged, so a 300-token
    budget lets through 6 x 300 streamed tokens (and any number more)."""
    shared_server_or_fail()
    schema = new_schema_name()
    team = f"adv{secrets.token_hex(4)}"
    streamed = 300
    path = tmp_path / "gw.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "auth": {"api_keys": [{"key": "sk-a", "subject": "svc-a", "team": team}]},
                "teams": {team: {"budget": {"monthly_tokens": streamed}}},
                "rate_limits": {"storage": "redis://127.0.0.1:6379/0"},
                "ledger": {
                    "dsn": SHARED_DSN,
                    "schema_name": schema,
                    "spool_dir": str(tmp_path / "spool"),
                    "flush_interval": 0.2,
                    "auto_migrate": True,
                },
            }
        )
    )
    sim = Sim(None, "--ttft", "0.005", "--itl", "0.005", "--output-tokens", "400", "--max-model-len", "4096")
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_tokens": 400,
    }
    statuses: list[int] = []
    try:
        gw = Gateway([sim.url], config=path)
        try:
            for _ in range(6):
                with httpx.stream(
                    "POST",
                    gw.v1 + "/chat/completions",
                    json=body,
                    headers={"authorization": "Bearer sk-a"},
                    timeout=30,
                ) as r:
                    statuses.append(r.status_code)
                    if r.status_code != 200:
                        break
                    events = 0
                    for line in r.iter_lines():  # one content event per token, as vLLM sends them
                        events += line.startswith("data: {")
                        if events >= streamed:
                            break  # leave before the usage chunk

            def all_rows() -> list[Any]:
                got = run_sql(SHARED_DSN, "SELECT * FROM events", schema=schema)
                return got if len(got) >= len(statuses) else []

            rows = wait_for(all_rows, 20, "the streams' ledger rows")
        finally:
            gw.stop()
    finally:
        sim.stop()
        drop_schema(SHARED_DSN, schema)
        redis_del_budget(team)
    # The tokens the client received are in the ledger (vLLM generated at least that many) ...
    served = [row for row in rows if row["status"] == 200]
    assert served
    for row in served:
        assert row["completion_tokens"] is not None and row["completion_tokens"] >= streamed, dict(row)
    # ... and the budget, spent by the first stream, refuses a later one.
    assert 429 in statuses, statuses


def redis_del_budget(team: str) -> None:
    import redis

    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        for key in client.scan_iter(f"llmgw:budget:{team}:*"):
            client.delete(key)
    finally:
        client.close()


def test_a_budget_check_never_waits_for_a_locked_ledger(tmp_path: Path) -> None:
    """The request path never waits for the database: but a team with a budget and no month hash
    in Redis (a new month, a Redis flush or restart) is seeded from the ledger *in the request*,
    which waits as long as PostgreSQL does (up to `write_timeout` per request, every request while
    the seed keeps failing). A lock held on the rollup makes every such request wait."""
    shared_server_or_fail()
    schema = new_schema_name()
    team = f"adv{secrets.token_hex(4)}"
    path = tmp_path / "gw.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "auth": {"api_keys": [{"key": "sk-a", "subject": "svc-a", "team": team}]},
                "teams": {team: {"budget": {"monthly_usd": 100}}},
                "rate_limits": {"storage": "redis://127.0.0.1:6379/0"},
                "ledger": {
                    "dsn": SHARED_DSN,
                    "schema_name": schema,
                    "spool_dir": str(tmp_path / "spool"),
                    "auto_migrate": True,
                    "write_timeout": 300.0,  # a slow database, as far as the gateway can tell
                },
            }
        )
    )
    out = subprocess.run(
        [*python_m("gateway"), "db", "upgrade", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    # Another session holds the rollup (a migration, a VACUUM FULL, an operator's LOCK TABLE).
    locker = subprocess.Popen(
        ["psql", "-X", "-q", SHARED_DSN], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    assert locker.stdin is not None
    locker.stdin.write(f'BEGIN; LOCK TABLE "{schema}".usage_hourly IN ACCESS EXCLUSIVE MODE;\n')
    locker.stdin.flush()
    sim = Sim(None)
    try:
        wait_for(
            lambda: run_sql(
                SHARED_DSN,
                "SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = $1 AND c.relname = 'usage_hourly' AND l.granted"
                " AND l.mode = 'AccessExclusiveLock'",
                schema,
            ),
            20,
            "the lock on usage_hourly",
        )
        gw = Gateway([sim.url], config=path)
        try:
            # The lock is held for the whole request: an answer proves the request did not wait.
            r = httpx.post(
                gw.v1 + "/chat/completions",
                json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                headers={"authorization": "Bearer sk-a"},
                timeout=30,
            )
            assert r.status_code == 200, r.text
        finally:
            gw.stop()
    finally:
        locker.stdin.close()
        locker.kill()
        locker.wait(10)
        sim.stop()
        drop_schema(SHARED_DSN, schema)
        redis_del_budget(team)


def test_captured_tool_call_arguments_are_redacted(tmp_path: Path) -> None:
    """Capture redacts every text content part, but an assistant message's `tool_calls`
    (function arguments) and other string fields go to the `captures` table as the client sent
    them: a key in a tool call's arguments is stored in clear."""
    shared_server_or_fail()
    schema = new_schema_name()
    secret = "sk-adv14abcdefghijklmnop123456"
    path = tmp_path / "gw.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "auth": {"api_keys": [{"key": "sk-cap-key-000000", "subject": "svc-cap", "team": "cap"}]},
                "teams": {"cap": {"log_content": True, "capture": True}},
                "ledger": {
                    "dsn": SHARED_DSN,
                    "schema_name": schema,
                    "spool_dir": str(tmp_path / "spool"),
                    "flush_interval": 0.2,
                    "auto_migrate": True,
                },
            }
        )
    )
    sim = Sim(None, "--ttft", "0.005", "--itl", "0.001")
    body = {
        "model": "tiny",
        "max_tokens": 4,
        "messages": [
            {"role": "user", "content": "deploy it"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "deploy", "arguments": f'{{"api_key": "{secret}"}}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "done"},
        ],
    }
    try:
        gw = Gateway([sim.url], config=path)
        try:
            r = httpx.post(
                gw.v1 + "/chat/completions",
                json=body,
                headers={"authorization": "Bearer sk-cap-key-000000"},
                timeout=30,
            )
            assert r.status_code == 200, r.text
            rows = wait_for(
                lambda: run_sql(SHARED_DSN, "SELECT messages::text AS m FROM captures", schema=schema),
                20,
                "the captured request",
            )
        finally:
            gw.stop()
    finally:
        sim.stop()
        drop_schema(SHARED_DSN, schema)
    assert "deploy" in rows[0]["m"]  # captured ...
    assert secret not in rows[0]["m"]  # ... redacted


def test_purge_is_not_undone_by_a_spool_replayed_later(tmp_path: Path) -> None:
    """`purge --team T` deletes the captures in PostgreSQL, but captured content waiting in a
    gateway's spool (PostgreSQL was down when the gateway stopped) is inserted by the next replay,
    after the purge: the purged team's content comes back."""
    shared_server_or_fail()
    schema = new_schema_name()
    spool = tmp_path / "spool"
    ledger: dict[str, Any] = {"schema_name": schema, "spool_dir": str(spool), "flush_interval": 0.2}
    base: dict[str, Any] = {
        "auth": {"api_keys": [{"key": "sk-cap-key-000000", "subject": "svc-cap", "team": "cap"}]},
        "teams": {"cap": {"log_content": True, "capture": True}},
    }
    down = tmp_path / "down.yaml"  # PostgreSQL unreachable: rows go to the spool
    down.write_text(
        yaml.safe_dump(
            {**base, "ledger": {**ledger, "dsn": f"postgresql://postgres@127.0.0.1:{free_port()}/test"}}
        )
    )
    up = tmp_path / "up.yaml"
    up.write_text(yaml.safe_dump({**base, "ledger": {**ledger, "dsn": SHARED_DSN}}))
    cli = [*python_m("gateway")]
    out = subprocess.run(
        [*cli, "db", "upgrade", "--config", str(up)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    sim = Sim(None, "--ttft", "0.005", "--itl", "0.001")
    body = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "private words"}]}
    headers = {"authorization": "Bearer sk-cap-key-000000"}
    try:
        gw = Gateway([sim.url], config=down)
        try:
            assert (
                httpx.post(gw.v1 + "/chat/completions", json=body, headers=headers, timeout=30).status_code
                == 200
            )
        finally:
            gw.stop()  # SIGTERM: the buffered row goes to the spool
        assert any(spool.glob("*.jsonl")), "the row was spooled"
        out = subprocess.run(
            [*cli, "purge", "--config", str(up), "--team", "cap"], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        gw = Gateway([sim.url], config=up)  # replays the spool
        try:
            wait_for(
                lambda: run_sql(SHARED_DSN, "SELECT 1 FROM events", schema=schema),
                30,
                "the spooled row replayed",
            )
            captured = run_sql(SHARED_DSN, "SELECT messages::text AS m FROM captures", schema=schema)
        finally:
            gw.stop()
    finally:
        sim.stop()
        drop_schema(SHARED_DSN, schema)
    assert captured == [], "purged content came back from the spool"
