"""Adversarial tests of the jobs (issue #13): each one a promise the implementation broke.

Real processes (simulator, gateway), real Redis (127.0.0.1:6379, a key prefix of the test's own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import redis
import yaml

from tests.jobs_helpers import ALICE, CAROL, chat_lines, jobs_config, poll
from tests.procs import Gateway, Sim, free_port

TERMINAL = ("completed", "failed", "expired", "cancelled")


def _batch(g: Gateway, key: str, file_id: str, window: str = "24h") -> dict[str, Any]:
    r = httpx.post(
        g.v1 + "/batches",
        json={"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": window},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def _get(g: Gateway, key: str, bid: str) -> dict[str, Any]:
    r = httpx.get(g.v1 + f"/batches/{bid}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_a_task_route_to_a_forbidden_model_fails_the_batch_at_validation(tmp_path: Path) -> None:
    """Model allowances apply to the model a line's task route resolves to, at validation.

    Carol's team may use `tiny` only; the route `heavy` sends work to `big`. A line asking for
    `tiny` with `task_type: heavy` is work for `big`: the batch must fail at validation with the
    line number (as a synchronous request is refused 403), not be enqueued.
    """
    sim = Sim(None, "--model", "tiny")
    big = Sim(None, "--model", "big")
    path, _ = jobs_config(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["routing"] = {"routes": {"heavy": {"model": "big"}}}
    path.write_text(yaml.safe_dump(cfg))
    g = Gateway([sim.url, big.url], config=path)
    try:
        # The synchronous request is refused: the serving model is what counts.
        sync = httpx.post(
            g.v1 + "/chat/completions",
            json={"model": "tiny", "task_type": "heavy", "messages": [{"role": "user", "content": "x"}]},
            headers={"Authorization": f"Bearer {CAROL}"},
            timeout=30,
        )
        assert sync.status_code == 403, sync.text
        line = {
            "custom_id": "r1",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "tiny",
                "task_type": "heavy",
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 2,
            },
        }
        c = openai.OpenAI(base_url=g.v1, api_key=CAROL, max_retries=0)
        f = c.files.create(file=("in.jsonl", orjson.dumps(line) + b"\n"), purpose="batch")
        b = _batch(g, CAROL, f.id)
        done = poll(lambda: _get(g, CAROL, b["id"]), lambda x: x["status"] in TERMINAL, 60, "terminal")
        assert done["status"] == "failed", done
        errors = done["errors"]["data"]
        assert errors[0]["code"] == "model_not_allowed" and errors[0]["line"] == 1, errors
        assert big.stats()["received"] == 0
    finally:
        g.stop()
        sim.stop()
        big.stop()


def test_a_batch_whose_input_file_was_deleted_still_expires(tmp_path: Path) -> None:
    """Deleting the input file (allowed by the Files API) must not wedge the batch.

    No replica is ready, so the lines wait; at the completion window the batch must end
    `expired` (unrun lines in the error file as batch_expired, or at least a terminal status),
    not stay `finalizing` forever.
    """
    path, _ = jobs_config(tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"
    g = Gateway([dead], config=path, wait_ready=False)
    try:
        c = openai.OpenAI(base_url=g.v1, api_key=ALICE, max_retries=0)
        f = c.files.create(file=("in.jsonl", chat_lines(3)), purpose="batch")
        b = _batch(g, ALICE, f.id, window="6s")
        poll(lambda: _get(g, ALICE, b["id"]), lambda x: x["status"] == "in_progress", 30, "in_progress")
        assert c.files.delete(f.id).deleted
        done = poll(lambda: _get(g, ALICE, b["id"]), lambda x: x["status"] in TERMINAL, 40, "terminal")
        assert done["status"] == "expired", done
        assert done["expired_at"] is not None
    finally:
        g.stop()


def test_a_line_larger_than_a_request_may_be_fails_at_validation(tmp_path: Path) -> None:
    """A huge line is bad input: refused at validation with its line number, nothing enqueued.

    A synchronous request of that size is refused 413 (``server.max_body_bytes``); a batch
    line of that size must not be accepted, stored in the queue and only then refused.
    """
    sim = Sim(None, "--model", "tiny")
    path, prefix = jobs_config(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["server"] = {"max_body_bytes": 4096}
    path.write_text(yaml.safe_dump(cfg))
    g = Gateway([sim.url], config=path)
    try:
        big = {
            "custom_id": "huge",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "tiny",
                "messages": [{"role": "user", "content": "x" * 20_000}],
                "max_tokens": 2,
            },
        }
        data = chat_lines(1) + orjson.dumps(big) + b"\n"
        c = openai.OpenAI(base_url=g.v1, api_key=ALICE, max_retries=0)
        f = c.files.create(file=("in.jsonl", data), purpose="batch")
        b = _batch(g, ALICE, f.id)
        done = poll(lambda: _get(g, ALICE, b["id"]), lambda x: x["status"] in TERMINAL, 60, "terminal")
        assert done["status"] == "failed", done
        assert [e["line"] for e in done["errors"]["data"]] == [2], done["errors"]
        r = redis.Redis()
        streams = [*r.scan_iter(f"{prefix}q:*"), *r.scan_iter(f"{prefix}qs:*")]
        assert not any(r.xlen(k) for k in streams), "lines were enqueued"
        assert sim.stats()["received"] == 0
    finally:
        g.stop()
        sim.stop()


def test_an_async_job_for_a_model_nobody_serves_is_404_like_the_synchronous_call(tmp_path: Path) -> None:
    """`Prefer: respond-async` validates as a synchronous request would: an unknown model is 404
    at once (the sync answer), not 202 and a job that waits a day for a model that is not there."""
    sim = Sim(None, "--model", "tiny")
    path, _ = jobs_config(tmp_path)
    g = Gateway([sim.url], config=path)
    try:
        body = {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        h = {"Authorization": f"Bearer {ALICE}"}
        sync = httpx.post(g.v1 + "/chat/completions", json=body, headers=h, timeout=30)
        assert sync.status_code == 404, sync.text
        r = httpx.post(
            g.v1 + "/chat/completions", json=body, headers={**h, "Prefer": "respond-async"}, timeout=30
        )
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == sync.json()["error"]["code"]
    finally:
        g.stop()
        sim.stop()


def test_a_batch_line_for_a_model_nobody_serves_does_not_hold_the_batch_for_its_window(
    tmp_path: Path,
) -> None:
    """A line naming a model no backend lists (a typo), while the pool is up and says so, is
    bad input: the batch fails at validation with the line number, as a synchronous request is
    answered 404; it must not stay `in_progress` until its 24h window expires."""
    sim = Sim(None, "--model", "tiny")
    path, _ = jobs_config(tmp_path)
    g = Gateway([sim.url], config=path)
    try:
        c = openai.OpenAI(base_url=g.v1, api_key=ALICE, max_retries=0)
        data = chat_lines(2) + chat_lines(1, model="tiyn", start=2)
        f = c.files.create(file=("in.jsonl", data), purpose="batch")
        b = _batch(g, ALICE, f.id)
        done = poll(lambda: _get(g, ALICE, b["id"]), lambda x: x["status"] in TERMINAL, 60, "terminal")
        assert done["status"] == "failed", done
        assert [(e["line"], e["code"]) for e in done["errors"]["data"]] == [(3, "model_not_found")]
    finally:
        g.stop()
        sim.stop()


def test_a_high_worker_concurrency_does_not_starve_the_api_of_redis_connections(tmp_path: Path) -> None:
    """`jobs.concurrency` may be set up to 1024; the workers must not take every connection of the
    Redis client so that the Files/Batch API answers 503 jobs_unavailable while Redis is fine."""
    sim = Sim(None, "--model", "tiny")
    path, _ = jobs_config(tmp_path, concurrency=200)
    g = Gateway([sim.url], config=path)
    try:
        c = openai.OpenAI(base_url=g.v1, api_key=ALICE, max_retries=0)
        for _ in range(5):
            f = c.files.create(file=("in.jsonl", chat_lines(20)), purpose="batch")
            b = _batch(g, ALICE, f.id)
            assert c.batches.list(limit=5).data
        done = poll(lambda: _get(g, ALICE, b["id"]), lambda x: x["status"] in TERMINAL, 60, "terminal")
        assert done["status"] == "completed", done
        assert done["request_counts"]["completed"] == 20
    finally:
        g.stop()
        sim.stop()


def test_lines_finishing_while_an_expiring_batch_finalizes_appear_exactly_once(tmp_path: Path) -> None:
    """Expiry with lines in flight: every custom_id is in the output or the error file, once.

    Many lines are running (latencies spread over ~2 s) when the window ends; the expiring
    finalize writes the output file, then marks the lines without a result `batch_expired`. A
    line that finishes between those two steps must not vanish from both files.
    """
    # Lines of up to 500 tokens at 30 ms each (up to 15 s): some are always running when the 6 s
    # window ends, however fast the machine (at 10 ms the whole batch could finish in time).
    sim = Sim(None, "--model", "tiny", "--ttft", "0.02", "--itl", "0.03", "--max-num-seqs", "1024")
    path, _ = jobs_config(tmp_path, concurrency=300)
    cfg = yaml.safe_load(path.read_text())
    cfg["backends"] = [{"url": sim.url, "max_in_flight": 512}]
    path.write_text(yaml.safe_dump(cfg))
    g = Gateway([], config=path)
    try:
        n = 6000
        lines = [
            orjson.dumps(
                {
                    "custom_id": f"r{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {
                        "model": "tiny",
                        "messages": [{"role": "user", "content": f"m{i}"}],
                        "max_tokens": 1 + (i * 37) % 500,
                    },
                }
            )
            for i in range(n)
        ]
        c = openai.OpenAI(base_url=g.v1, api_key=ALICE, max_retries=0)
        f = c.files.create(file=("in.jsonl", b"\n".join(lines) + b"\n"), purpose="batch")
        b = _batch(g, ALICE, f.id, window="6s")
        done = poll(lambda: _get(g, ALICE, b["id"]), lambda x: x["status"] in TERMINAL, 90, "terminal")
        assert done["status"] == "expired", done
        ids: list[str] = []
        for fid in (done["output_file_id"], done["error_file_id"]):
            if fid:
                ids += [orjson.loads(x)["custom_id"] for x in c.files.content(fid).content.splitlines() if x]
        assert len(ids) == len(set(ids)), "a custom_id appears twice"
        missing = {f"r{i}" for i in range(n)} - set(ids)
        assert not missing, f"{len(missing)} lines in neither file, e.g. {sorted(missing)[:5]}"
        assert done["request_counts"]["completed"] + done["request_counts"]["failed"] == n, done
    finally:
        g.stop()
        sim.stop()


def _pending(g: Gateway, model: str) -> float:
    for line in httpx.get(g.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(f'gateway_jobs_pending{{model="{model}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_lines_of_an_expired_batch_do_not_stay_pending_and_drive_scale_up(tmp_path: Path) -> None:
    """Scale from zero: no replica is up, the batch expires. Its lines will never run, so they
    must leave the queue (gateway_jobs_pending, what KEDA/ECS scale on, back to 0); else the
    autoscaler keeps starting GPU replicas for work that was already given up."""
    path, _ = jobs_config(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    dead = f"http://127.0.0.1:{free_port()}"
    cfg["backends"] = [{"url": dead, "models": ["tiny"]}]
    path.write_text(yaml.safe_dump(cfg))
    g = Gateway([], config=path, wait_ready=False)
    try:
        c = openai.OpenAI(base_url=g.v1, api_key=ALICE, max_retries=0)
        f = c.files.create(file=("in.jsonl", chat_lines(5)), purpose="batch")
        b = _batch(g, ALICE, f.id, window="4s")
        poll(lambda: _pending(g, "tiny"), lambda n: n == 5, 30, "5 lines pending")
        done = poll(lambda: _get(g, ALICE, b["id"]), lambda x: x["status"] in TERMINAL, 40, "terminal")
        assert done["status"] == "expired", done
        poll(lambda: _pending(g, "tiny"), lambda n: n == 0, 20, "no line of the expired batch pending")
    finally:
        g.stop()


def test_lines_enqueued_while_the_batch_is_still_validating_are_not_dropped(tmp_path: Path) -> None:
    """A batch's lines are put on the queue in chunks while it is still `validating`; a worker
    that takes one before the batch is `in_progress` must not throw it away (0 lines lost)."""
    sim = Sim(None, "--model", "tiny", "--ttft", "0", "--itl", "0", "--max-num-seqs", "256")
    path, _ = jobs_config(tmp_path, concurrency=16)
    g = Gateway([sim.url], config=path)
    try:
        c = openai.OpenAI(base_url=g.v1, api_key=ALICE, max_retries=0)
        # A model stream that exists already, so idle workers are polling it when lines arrive.
        warm = c.files.create(file=("w.jsonl", chat_lines(1)), purpose="batch")
        w = _batch(g, ALICE, warm.id)
        poll(lambda: _get(g, ALICE, w["id"]), lambda x: x["status"] == "completed", 60, "warm-up done")
        n = 5000
        f = c.files.create(file=("in.jsonl", chat_lines(n, max_tokens=1)), purpose="batch")
        b = _batch(g, ALICE, f.id)
        done = poll(lambda: _get(g, ALICE, b["id"]), lambda x: x["status"] in TERMINAL, 120, "terminal")
        assert done["status"] == "completed", done
        assert done["request_counts"] == {"total": n, "completed": n, "failed": 0}, done
    finally:
        g.stop()
        sim.stop()
