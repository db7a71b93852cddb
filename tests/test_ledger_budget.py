"""Team budgets across two gateways on one Redis and one PostgreSQL, and after a Redis flush."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from tests.ledger_pg import SHARED_DSN, db_upgrade, drop_schema, new_schema_name, shared_server_or_fail
from tests.procs import Gateway, Sim, free_port

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}
BUDGETED_REQUESTS = 10


class OwnRedis:
    """A redis-server of the test's own on a free port (the test flushes it); stopped by PID."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = redis.Redis(port=self.port, socket_timeout=2)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                return
            except redis.RedisError:
                assert time.monotonic() < deadline, (
                    "redis-server (apt-get install redis-server) did not start"
                )
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    r = OwnRedis()
    yield r
    r.stop()


@pytest.fixture
def schema() -> Iterator[str]:
    shared_server_or_fail()
    name = new_schema_name()
    yield name
    drop_schema(SHARED_DSN, name)


def post(gw: Gateway, key: str) -> httpx.Response:
    return httpx.post(
        gw.v1 + "/chat/completions", json=BODY, headers={"authorization": f"Bearer {key}"}, timeout=30
    )


def test_a_team_budget_holds_across_replicas_and_a_redis_flush(
    own_redis: OwnRedis, schema: str, tmp_path: Path
) -> None:
    sim = Sim(None, "--ttft", "0.005", "--itl", "0.001")
    try:
        usage = httpx.post(sim.url + "/v1/chat/completions", json=BODY, timeout=30).json()["usage"]
        per_request = usage["prompt_tokens"] + usage["completion_tokens"]
        config: dict[str, Any] = {
            "auth": {
                "api_keys": [
                    {"key": "sk-alpha", "subject": "svc-alpha", "team": "alpha"},
                    {"key": "sk-beta", "subject": "svc-beta", "team": "beta"},
                ]
            },
            "teams": {
                "alpha": {"budget": {"monthly_tokens": BUDGETED_REQUESTS * per_request}},
                "beta": {},
            },
            "rate_limits": {"storage": f"redis://127.0.0.1:{own_redis.port}/0"},
            "ledger": {
                "dsn": SHARED_DSN,
                "schema_name": schema,
                "spool_dir": str(tmp_path / "spool"),
                "flush_interval": 0.2,
                "auto_migrate": True,
            },
        }
        path = tmp_path / "gw.yaml"
        path.write_text(yaml.safe_dump(config))
        db_upgrade(path)
        gateways = [Gateway([sim.url], config=path), Gateway([sim.url], config=path)]
        try:
            passed, refused, remaining = 0, None, []
            for i in range(3 * BUDGETED_REQUESTS):  # alternating replicas
                r = post(gateways[i % 2], "sk-alpha")
                if r.status_code == 429:
                    refused = r
                    break
                assert r.status_code == 200, r.text
                remaining.append(int(r.headers["x-budget-remaining-tokens"]))
                passed += 1
            assert refused is not None
            assert passed in (BUDGETED_REQUESTS, BUDGETED_REQUESTS + 1)  # within one request
            err = refused.json()["error"]
            assert err["code"] == "budget_exceeded" and err["type"] == "insufficient_quota"
            assert "alpha" in err["message"] and "tokens" in err["message"] and "resets at" in err["message"]
            assert int(refused.headers["retry-after"]) > 0
            assert refused.headers["x-budget-remaining-tokens"] == "0"
            assert refused.headers["x-budget-reset"].endswith("T00:00:00Z")
            # What was left before each request: the whole budget first, then less (a charge lands
            # just after its response, so a count may repeat, never grow).
            assert remaining[0] == BUDGETED_REQUESTS * per_request
            assert remaining == sorted(remaining, reverse=True) and remaining[-1] <= 2 * per_request
            assert post(gateways[0], "sk-alpha").status_code == 429
            assert post(gateways[1], "sk-alpha").status_code == 429
            beta = post(gateways[0], "sk-beta")
            assert beta.status_code == 200  # a team without a budget: no budget headers
            assert "x-budget-remaining-tokens" not in beta.headers
        finally:
            for g in gateways:
                g.stop()  # SIGTERM: the ledger flushes every row
        own_redis.client.flushall()
        gateways = [Gateway([sim.url], config=path), Gateway([sim.url], config=path)]
        try:
            for g in gateways:  # the month's spend comes back from the ledger, not from zero
                r = post(g, "sk-alpha")
                assert r.status_code == 429, r.text
                assert r.json()["error"]["code"] == "budget_exceeded"
        finally:
            for g in gateways:
                g.stop()
    finally:
        sim.stop()
