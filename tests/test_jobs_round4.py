"""Job-queue faults an adversary found after fair shares landed, through real processes:

* a budget storage outage dead-lettered whole batches (`budget_storage` 503 counted as a failed
  delivery) instead of making their lines wait, as a rate-limit storage outage does;
* a batch cancelled while a replica was still queueing its lines kept being queued: the rest
  stayed in the queue for good, counted as waiting (the lag KEDA reads);
* a cancelled single job kept counting as waiting until a worker next took it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
import yaml

from tests.jobs_helpers import ALICE, Pair, PrivateRedis, chat_lines, clean_prefix, poll, sim_jobs_config
from tests.ledger_pg import SHARED_DSN, drop_schema, ledger_section, new_schema_name, shared_server_or_fail
from tests.procs import Gateway, Sim


def lag(r: redis.Redis, prefix: str) -> int:
    """The consumer-group lag of the model's stream (what KEDA reads); 0 before it exists."""
    if not r.exists(f"{prefix}q:tiny"):
        return 0
    (group,) = r.xinfo_groups(f"{prefix}q:tiny")  # type: ignore[misc]
    return int(group["lag"])


def unhealthy(sim: Sim, g: Gateway) -> None:
    sim.control(healthy=False)
    poll(lambda: httpx.get(g.url + "/ready", timeout=5).status_code, lambda s: s == 503, 20, "not ready")


@pytest.fixture
def sim() -> Iterator[Sim]:
    s = Sim(None, "--ttft", "0.005", "--itl", "0.001")
    yield s
    s.stop()


def test_a_cancelled_single_job_leaves_the_queue_at_once(sim: Sim, tmp_path: Path) -> None:
    path, prefix = sim_jobs_config(sim, tmp_path)
    g = Gateway([], config=path)
    r = redis.Redis()
    try:
        unhealthy(sim, g)
        auth = {"Authorization": f"Bearer {ALICE}"}
        ids = []
        for i in range(3):
            made = httpx.post(
                g.v1 + "/chat/completions",
                json={"model": "tiny", "messages": [{"role": "user", "content": f"j{i}"}], "max_tokens": 3},
                headers={**auth, "Prefer": "respond-async"},
                timeout=30,
            )
            assert made.status_code == 202, made.text
            ids.append(made.json()["id"])
        assert lag(r, prefix) == 3
        for jid in ids:
            gone = httpx.delete(f"{g.v1}/jobs/{jid}", headers=auth, timeout=10)
            assert gone.status_code == 200 and gone.json()["status"] == "cancelled", gone.text
        assert lag(r, prefix) == 0  # no worker took them: the cancel did
        assert sum(int(r.xlen(k)) for k in r.scan_iter(f"{prefix}qs:*:tiny")) == 0
    finally:
        g.stop()
        clean_prefix(prefix)


def test_a_batch_cancelled_while_its_lines_are_queued_queues_no_more(sim: Sim, tmp_path: Path) -> None:
    path, prefix = sim_jobs_config(sim, tmp_path, max_file_lines=50_000)
    pair = Pair(path, prefix, tmp_path / "files")
    r = redis.Redis()
    try:
        unhealthy(sim, pair.a)
        c_a = openai.OpenAI(base_url=pair.a.v1, api_key=ALICE, max_retries=0)
        c_b = openai.OpenAI(base_url=pair.b.v1, api_key=ALICE, max_retries=0)
        f = c_a.files.create(file=("in.jsonl", chat_lines(50_000)), purpose="batch")
        b = c_a.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        poll(lambda: lag(r, prefix), lambda n: n > 0, 30, "lines being queued")
        os.kill(pair.a.proc.pid, signal.SIGSTOP)  # replica a, queueing the lines, stands still
        assert c_b.batches.retrieve(b.id).status == "validating"
        c_b.batches.cancel(b.id)
        poll(lambda: c_b.batches.retrieve(b.id).status, lambda s: s == "cancelled", 30, "cancelled")
        assert lag(r, prefix) == 0
        os.kill(pair.a.proc.pid, signal.SIGCONT)
        # Replica a's validation ends when its next chunk is refused (or, before the fix, after
        # queueing every line): it then records the batch's total.
        done = poll(
            lambda: c_b.batches.retrieve(b.id), lambda x: (x.request_counts.total or 0) > 0, 60, "total"
        )
        assert done.status == "cancelled"
        assert done.request_counts is not None and done.request_counts.total < 50_000, done.request_counts
        assert lag(r, prefix) == 0
    finally:
        pair.stop()


def test_a_budget_storage_outage_makes_lines_wait(sim: Sim, tmp_path: Path) -> None:
    shared_server_or_fail()
    schema = new_schema_name()
    storage = PrivateRedis(tmp_path)
    storage.start()
    path, prefix = sim_jobs_config(sim, tmp_path, max_deliveries=2)
    cfg: dict[str, Any] = yaml.safe_load(path.read_text())
    cfg["rate_limits"] = {"storage": storage.url, "on_storage_error": "closed"}
    cfg["teams"]["search"]["principal_budget"] = {"monthly_tokens": 10**9}
    cfg["ledger"] = {**ledger_section(schema, tmp_path / "spool"), "auto_migrate": True}
    path.write_text(yaml.safe_dump(cfg))
    g = Gateway([], config=path)
    try:
        unhealthy(sim, g)
        c = openai.OpenAI(base_url=g.v1, api_key=ALICE, max_retries=0)
        f = c.files.create(file=("in.jsonl", chat_lines(3)), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        poll(lambda: c.batches.retrieve(b.id).status, lambda s: s == "in_progress", 30, "queued")
        storage.stop()
        sim.control(healthy=True)

        def refusals() -> int:
            return sum(1 for rec in g.log_records() if rec.get("event") == "budget storage unavailable")

        # More refusals than the lines' deliveries allow: counted as failed deliveries (before),
        # every line would be dead-lettered by now.
        poll(refusals, lambda n: n > 3 * 2, 60, "lines refused by the budget storage")
        storage.start()  # the same port, its data kept
        done = poll(
            lambda: c.batches.retrieve(b.id),
            lambda x: x.status in ("completed", "failed", "expired", "cancelled"),
            90,
            "the batch after the storage came back",
        )
        assert done.status == "completed", done
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (3, 0), done.request_counts
        assert redis.Redis().xlen(f"{prefix}dlq") == 0
    finally:
        g.stop()
        storage.stop()
        clean_prefix(prefix)
        drop_schema(SHARED_DSN, schema)
