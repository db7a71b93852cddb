"""Fair shares in the job queue: teams take turns on a model's capacity, and the model's stream
(what KEDA's redis-streams scaler reads) counts exactly the lines waiting, whatever the shares.

Lines are queued while the only backend is unhealthy (they wait, they do not fail), so the order
the workers take them in is decided by the queue alone once it is healthy again."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
import yaml

from tests.jobs_helpers import ALICE, CAROL, chat_lines, clean_prefix, poll, sha, sim_jobs_config
from tests.procs import Gateway, Sim

DAVE = "sk-dave-" + "d" * 24  # no team: a share of its own


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Sim, Gateway, str]]:
    sim = Sim(None, "--ttft", "0.005", "--itl", "0.002")
    path, prefix = sim_jobs_config(sim, tmp_path, max_in_flight=1)
    cfg = yaml.safe_load(path.read_text())
    cfg["auth"]["api_keys"].append({"sha256": sha(DAVE), "subject": "dave"})
    path.write_text(yaml.safe_dump(cfg))
    g = Gateway([], config=path)
    try:
        yield sim, g, prefix
    finally:
        g.stop()
        sim.stop()
        clean_prefix(prefix)


def client(g: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=g.v1, api_key=key, max_retries=0)


def unhealthy(sim: Sim, g: Gateway) -> None:
    sim.control(healthy=False)
    poll(lambda: httpx.get(g.url + "/ready", timeout=5).status_code, lambda s: s == 503, 20, "not ready")


def healthy(sim: Sim, g: Gateway) -> None:
    sim.control(healthy=True)
    poll(lambda: httpx.get(g.url + "/ready", timeout=5).status_code, lambda s: s == 200, 20, "ready")


def queued_batch(c: openai.OpenAI, lines: int) -> Any:
    f = c.files.create(file=("in.jsonl", chat_lines(lines)), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    return poll(lambda: c.batches.retrieve(b.id), lambda x: x.status == "in_progress", 30, "enqueued")


def lag(r: redis.Redis, prefix: str) -> tuple[int, int]:
    """(consumer-group lag, pending) of the model's stream: what KEDA's scaler reads."""
    (group,) = r.xinfo_groups(f"{prefix}q:tiny")  # type: ignore[misc]
    return int(group["lag"]), int(group["pending"])


def pending_gauge(g: Gateway) -> float:
    text = httpx.get(g.url + "/metrics", timeout=10).text
    m = re.search(r'^gateway_jobs_pending\{model="tiny"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else -1.0


def test_a_small_batch_is_not_held_back_by_another_teams_large_one(
    setup: tuple[Sim, Gateway, str],
) -> None:
    sim, g, _ = setup
    unhealthy(sim, g)
    alice, carol = client(g, ALICE), client(g, CAROL)
    big = queued_batch(alice, 120)  # team search, queued first
    small = queued_batch(carol, 6)  # team research, queued after all of it
    job = httpx.post(
        g.v1 + "/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        headers={"Authorization": f"Bearer {DAVE}", "Prefer": "respond-async"},
        timeout=30,
    )
    assert job.status_code == 202, job.text
    healthy(sim, g)
    done = poll(
        lambda: carol.batches.retrieve(small.id), lambda x: x.status == "completed", 60, "small batch"
    )
    assert done.request_counts is not None and done.request_counts.completed == 6
    seen = alice.batches.retrieve(big.id)
    assert seen.request_counts is not None
    # Turns: the small batch's 6 lines ran among the first ~2 x 6 lines; first come, first served
    # would have run all 120 of the big one first.
    assert seen.status == "in_progress" and seen.request_counts.completed <= 40, seen.request_counts
    one = poll(
        lambda: httpx.get(
            f"{g.v1}/jobs/{job.json()['id']}", headers={"Authorization": f"Bearer {DAVE}"}, timeout=10
        ).json(),
        lambda j: j["status"] == "completed",
        30,
        "team-less job",
    )
    assert one["status"] == "completed"
    finished = poll(
        lambda: alice.batches.retrieve(big.id), lambda x: x.status == "completed", 120, "big batch"
    )
    assert finished.request_counts is not None and finished.request_counts.completed == 120


def test_the_models_stream_counts_the_waiting_lines_of_every_share(
    setup: tuple[Sim, Gateway, str],
) -> None:
    sim, g, prefix = setup
    r = redis.Redis()
    unhealthy(sim, g)
    alice, carol = client(g, ALICE), client(g, CAROL)
    big = queued_batch(alice, 30)
    small = queued_batch(carol, 7)
    assert lag(r, prefix) == (37, 0)
    poll(lambda: pending_gauge(g), lambda v: v == 37, 10, "gateway_jobs_pending 37")
    assert len(list(r.scan_iter(f"{prefix}qs:*:tiny"))) == 2  # one stream per team
    # A cancelled batch's lines leave the queue, and the scaler's count with them.
    alice.batches.cancel(big.id)
    poll(lambda: alice.batches.retrieve(big.id), lambda x: x.status == "cancelled", 30, "cancelled")
    assert lag(r, prefix) == (7, 0)
    poll(lambda: pending_gauge(g), lambda v: v == 7, 10, "gateway_jobs_pending 7")
    healthy(sim, g)
    done = poll(lambda: carol.batches.retrieve(small.id), lambda x: x.status == "completed", 60, "small")
    assert done.request_counts is not None and done.request_counts.completed == 7
    assert lag(r, prefix) == (0, 0)
    poll(lambda: pending_gauge(g), lambda v: v == 0, 10, "gateway_jobs_pending 0")
    assert sum(int(r.xlen(k)) for k in r.scan_iter(f"{prefix}qs:*:tiny")) == 0  # every line acked
