"""Job lines in the usage ledger: every run of a line is one row, the answering run's id is the
output line's request_id (issue #14 records job lines like any request)."""

from __future__ import annotations

from pathlib import Path

import openai
import yaml

from tests.jobs_helpers import chat_lines, jobs_config, jsonl, poll
from tests.ledger_pg import (
    SHARED_DSN,
    drop_schema,
    ledger_section,
    new_schema_name,
    run_sql,
    shared_server_or_fail,
    wait_for,
)
from tests.procs import Gateway, Sim
from tests.test_ledger import db_upgrade


def test_every_run_of_a_job_line_is_one_ledger_row(tmp_path: Path) -> None:
    shared_server_or_fail()
    schema = new_schema_name()
    sim = Sim(None, "--model", "tiny", "--error-rate", "0.3", "--seed", "7")
    path, _ = jobs_config(tmp_path, max_deliveries=10)
    cfg = yaml.safe_load(path.read_text())
    cfg["auth"]["api_keys"].append({"key": "sk-ledger-jobs", "subject": "etl", "team": "search"})
    cfg["ledger"] = ledger_section(schema, tmp_path / "spool")
    cfg["pricing"] = {"tiny": {"prompt_per_million": 1.0, "completion_per_million": 2.0}}
    path.write_text(yaml.safe_dump(cfg))
    db_upgrade(path)
    g = Gateway([sim.url], config=path)
    try:
        c = openai.OpenAI(base_url=g.v1, api_key="sk-ledger-jobs", max_retries=0)
        f = c.files.create(file=("in.jsonl", chat_lines(20)), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        done = poll(lambda: c.batches.retrieve(b.id), lambda x: x.status == "completed", 120, "completed")
        out = jsonl(c.files.content(done.output_file_id or "").content)
        assert len(out) == 20
        answered = {x["response"]["request_id"] for x in out}

        def rows() -> list[object]:
            found = run_sql(SHARED_DSN, "SELECT request_id, status, subject FROM events", schema=schema)
            ids = {r["request_id"] for r in found}
            return found if answered <= ids else []

        found = wait_for(rows, 30, "a ledger row for every answering run")
        assert len({r["request_id"] for r in found}) == len(found)  # one row per run
        assert len(found) >= 20
        ok = [r for r in found if r["status"] == 200]
        assert {r["request_id"] for r in ok} == answered
        assert len(found) > 20, "with a 30 % error rate some line was run more than once"
        assert all(r["status"] in (200, 500, 502) for r in found), {r["status"] for r in found}
    finally:
        g.stop()
        sim.stop()
        drop_schema(SHARED_DSN, schema)
