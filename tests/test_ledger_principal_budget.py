"""Principal budgets: each principal of a team on its own (by subject), an API key's own budget,
held across two gateways on one Redis and one PostgreSQL, and rebuilt from the ledger after a
Redis flush; the configuration refuses what cannot work."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from jose import jwt as jose_jwt

from tests.ledger_pg import SHARED_DSN, db_upgrade
from tests.procs import Gateway, Sim
from tests.test_auth import run_cli
from tests.test_ledger_budget import OwnRedis, own_redis, schema  # noqa: F401 - fixtures

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}
SECRET = "principal-budget-test-secret-0123456789"
EACH = 4  # requests each principal of the team may make in a month


def jwt_for(sub: str, team: str) -> str:
    claims = {"sub": sub, "team": team, "exp": int(time.time()) + 3600}
    return str(jose_jwt.encode(claims, SECRET, algorithm="HS256"))


def post(gw: Gateway, cred: str) -> httpx.Response:
    return httpx.post(
        gw.v1 + "/chat/completions", json=BODY, headers={"authorization": f"Bearer {cred}"}, timeout=30
    )


def spend_until_refused(gateways: list[Gateway], cred: str, most: int) -> tuple[int, httpx.Response]:
    """Requests alternating replicas until a 429: (how many passed, the refusal)."""
    for i in range(most):
        r = post(gateways[i % 2], cred)
        if r.status_code == 429:
            return i, r
        assert r.status_code == 200, r.text
    raise AssertionError(f"{cred[:8]}...: no 429 after {most} requests")


def test_each_principal_has_its_own_budget_across_replicas_and_a_redis_flush(
    own_redis: OwnRedis,  # noqa: F811 - the fixtures of tests/test_ledger_budget.py
    schema: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    sim = Sim(None, "--ttft", "0.005", "--itl", "0.001")
    try:
        usage = httpx.post(sim.url + "/v1/chat/completions", json=BODY, timeout=30).json()["usage"]
        per_request = usage["prompt_tokens"] + usage["completion_tokens"]
        config: dict[str, Any] = {
            "auth": {
                "jwt": {"algorithms": ["HS256"], "secret": SECRET},
                "api_keys": [
                    # two keys of one subject share its count
                    {"key": "sk-alice-1", "subject": "alice", "team": "alpha"},
                    {"key": "sk-alice-2", "subject": "alice", "team": "alpha"},
                    {"key": "sk-bob", "subject": "bob", "team": "alpha"},
                    # a key's own budget instead of the team's default for its subject
                    {
                        "key": "sk-carol",
                        "subject": "carol",
                        "team": "alpha",
                        "budget": {"monthly_tokens": 2 * per_request},
                    },
                    # a subject spelled to collide with another's hash if keys were not quoted
                    {"key": "sk-colon", "subject": "a:b", "team": "alpha"},
                ],
            },
            "teams": {
                "alpha": {
                    "budget": {"monthly_tokens": 1000 * per_request},
                    "principal_budget": {"monthly_tokens": EACH * per_request},
                },
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
            first = post(gateways[0], "sk-bob")
            assert first.status_code == 200, first.text
            # The least left of the team's and bob's own budgets: bob's.
            assert int(first.headers["x-budget-remaining-tokens"]) == EACH * per_request

            # alice, through both of her keys and both replicas: one count.
            passed = 0
            refusal = None
            for i in range(3 * EACH):
                r = post(gateways[i % 2], ("sk-alice-1", "sk-alice-2")[i // 2 % 2])
                if r.status_code == 429:
                    refusal = r
                    break
                assert r.status_code == 200, r.text
                passed += 1
            assert refusal is not None
            assert passed in (EACH, EACH + 1)  # within one request
            err = refusal.json()["error"]
            assert err["code"] == "budget_exceeded" and err["type"] == "insufficient_quota"
            assert "Principal 'alice' of team 'alpha'" in err["message"], err["message"]
            assert refusal.headers["x-budget-remaining-tokens"] == "0"
            assert int(refusal.headers["retry-after"]) > 0

            # Others of the team are not affected by alice's month; carol has her own, smaller one.
            assert post(gateways[1], "sk-bob").status_code == 200
            assert post(gateways[0], "sk-colon").status_code == 200
            carol_passed, carol_refusal = spend_until_refused(gateways, "sk-carol", 3 * EACH)
            assert carol_passed in (2, 3)
            assert "Principal 'carol'" in carol_refusal.json()["error"]["message"]

            # A JWT principal of the team gets the team's default for its own subject.
            dave = jwt_for("dave", "alpha")
            dave_passed, _ = spend_until_refused(gateways, dave, 3 * EACH)
            assert dave_passed in (EACH, EACH + 1)
            assert post(gateways[0], jwt_for("erin", "alpha")).status_code == 200

            metrics = httpx.get(gateways[0].url + "/metrics", timeout=10).text
            assert 'gateway_budget_exceeded_total{budget="principal",team="alpha"}' in metrics
        finally:
            for g in gateways:
                g.stop()  # SIGTERM: the ledger flushes every row
        own_redis.client.flushall()
        gateways = [Gateway([sim.url], config=path), Gateway([sim.url], config=path)]
        try:
            for g in gateways:  # each principal's month comes back from the ledger, not from zero
                for cred in ("sk-alice-2", "sk-carol", dave):
                    r = post(g, cred)
                    assert r.status_code == 429, (cred[:8], r.text)
                    assert r.json()["error"]["code"] == "budget_exceeded"
            ok = post(gateways[0], "sk-bob")  # bob spent 2 of his 4
            assert ok.status_code == 200, ok.text
            assert int(ok.headers["x-budget-remaining-tokens"]) == (EACH - 2) * per_request
        finally:
            for g in gateways:
                g.stop()
    finally:
        sim.stop()


def check_config(tmp_path: Path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    return run_cli("check-config", "--config", str(path))


def test_principal_budgets_need_the_ledger_and_one_budget_per_subject(tmp_path: Path) -> None:
    no_ledger = check_config(tmp_path, {"teams": {"alpha": {"principal_budget": {"monthly_usd": 5}}}})
    assert no_ledger.returncode != 0
    assert "teams.alpha.principal_budget: budgets need a `ledger` section" in no_ledger.stderr

    key_no_ledger = check_config(
        tmp_path,
        {
            "auth": {
                "api_keys": [{"key": "sk-x", "subject": "x", "team": "alpha", "budget": {"monthly_usd": 5}}]
            }
        },
    )
    assert key_no_ledger.returncode != 0
    assert "auth.api_keys.0.budget: budgets need a `ledger` section" in key_no_ledger.stderr

    keys_disagree = check_config(
        tmp_path,
        {
            "auth": {
                "api_keys": [
                    {"key": "sk-1", "subject": "x", "team": "alpha", "budget": {"monthly_usd": 5}},
                    {"key": "sk-2", "subject": "x", "team": "alpha", "budget": {"monthly_usd": 9}},
                ]
            },
            "ledger": {"dsn": SHARED_DSN},
        },
    )
    assert keys_disagree.returncode != 0
    assert "subject 'x'" in keys_disagree.stderr and "different budgets" in keys_disagree.stderr
