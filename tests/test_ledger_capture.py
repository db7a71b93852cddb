"""Training-data capture: a consenting team's requests are kept (redacted) and export as
OpenAI fine-tuning JSONL; ``purge`` removes them; other teams are never captured."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from gateway.redact import redact
from tests.ledger_pg import SHARED_DSN, drop_schema, new_schema_name, run_sql, shared_server_or_fail, wait_for
from tests.procs import ROOT, Gateway, Sim

SECRET = "sk-abcdefghijklmnop1234567890"


@pytest.fixture
def schema() -> Iterator[str]:
    shared_server_or_fail()
    name = new_schema_name()
    yield name
    drop_schema(SHARED_DSN, name)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_captured_pairs_export_as_fine_tuning_jsonl_and_purge_removes_them(
    schema: str, tmp_path: Path
) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "auth": {
                    "api_keys": [
                        {"key": "sk-fin-key-000000", "subject": "svc-fin", "team": "fin"},
                        {"key": "sk-ops-key-000000", "subject": "svc-ops", "team": "ops"},
                    ]
                },
                "teams": {"fin": {"log_content": True, "capture": True}, "ops": {"log_content": True}},
                "ledger": {
                    "dsn": SHARED_DSN,
                    "schema_name": schema,
                    "spool_dir": str(tmp_path / "spool"),
                    "flush_interval": 0.2,
                },
            }
        )
    )
    up = cli("db", "upgrade", "--config", str(config))
    assert up.returncode == 0, up.stderr
    sim = Sim(None, "--ttft", "0.005", "--itl", "0.001")
    try:
        gw = Gateway([sim.url], config=config)
    except BaseException:
        sim.stop()  # never leave a process behind
        raise
    answers: list[str] = []
    try:
        with httpx.Client(base_url=gw.v1, timeout=30) as http:
            for i in range(3):
                body: dict[str, Any] = {
                    "model": "tiny",
                    "max_tokens": 6,
                    "messages": [
                        {"role": "system", "content": "You are terse."},
                        {"role": "user", "content": f"question {i}: my key is {SECRET}"},
                    ],
                }
                r = http.post(
                    "/chat/completions", json=body, headers={"authorization": "Bearer sk-fin-key-000000"}
                )
                assert r.status_code == 200
                answers.append(r.json()["choices"][0]["message"]["content"])
            for _ in range(2):  # a team without capture
                r = http.post(
                    "/chat/completions",
                    json={"model": "tiny", "messages": [{"role": "user", "content": "not kept"}]},
                    headers={"authorization": "Bearer sk-ops-key-000000"},
                )
                assert r.status_code == 200
        wait_for(
            lambda: len(run_sql(SHARED_DSN, "SELECT 1 FROM events", schema=schema)) == 5, 20, "5 ledger rows"
        )
    finally:
        gw.stop()
        sim.stop()
    captured = run_sql(SHARED_DSN, "SELECT team, messages::text AS m FROM captures", schema=schema)
    assert [r["team"] for r in captured] == ["fin"] * 3
    assert all(SECRET not in r["m"] and "[REDACTED]" in r["m"] for r in captured)

    out = tmp_path / "dataset.jsonl"
    exported = cli(
        "export-dataset", "--config", str(config), "--team", "fin", "--since", "1d", "--out", str(out)
    )
    assert exported.returncode == 0, exported.stderr
    examples = [orjson.loads(line) for line in out.read_text().splitlines()]
    assert len(examples) == 3
    for example, answer in zip(examples, answers, strict=True):  # in the order they were made
        assert list(example) == ["messages"]
        roles = [m["role"] for m in example["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert example["messages"][-1]["content"] == redact(answer)  # the simulator echoes the prompt
        assert SECRET not in orjson.dumps(example).decode()

    purged = cli("purge", "--config", str(config), "--team", "fin")
    assert purged.returncode == 0 and "deleted 3" in purged.stdout, purged.stdout + purged.stderr
    again = cli("export-dataset", "--config", str(config), "--team", "fin", "--since", "1d")
    assert again.returncode == 0 and again.stdout == ""
    assert len(run_sql(SHARED_DSN, "SELECT 1 FROM events", schema=schema)) == 5  # usage rows stay
