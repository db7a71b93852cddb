"""A request that can never fit its token budget, and cancels of jobs waiting on back-pressure.

A request whose token reservation is more than the principal's (or team's) whole budget per
minute is refused at once (429, code ``tokens_exceed_limit``, ``x-should-retry: false``, no
Retry-After): waiting cannot help. Before, it was answered as a retryable rate limit: the OpenAI
SDK sent it three times, ``Prefer: respond-async`` took it (202) and the job retried it every
30 s for a day, holding a worker (``DELETE /v1/jobs/{id}`` answered 200 and left it running),
and a batch line of that kind kept its batch (and a worker) for the whole window. A job or batch
line waiting on a retryable limit now notices a cancel within a second or so.

Real processes (simulator, gateway), real Redis (127.0.0.1:6379, a key prefix of the test's
own), the official OpenAI SDK and httpx.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import yaml

from tests.jobs_helpers import CAROL, Pair, jsonl, poll, sha, sim_jobs_config
from tests.procs import Gateway, Sim

DAVE = "sk-dave-" + "e" * 24  # tier small: 2,000 tokens per minute
ERIN = "sk-erin-" + "f" * 24  # tier rpm1: one request per minute
FRANK = "sk-frank-" + "9" * 24  # tier rpm1
GRACE = "sk-grace-" + "8" * 24  # tier rpm1
HEIDI = "sk-heidi-" + "7" * 24  # team search, no tier
TERMINAL = ("completed", "failed", "expired", "cancelled")

MESSAGES = [{"role": "user", "content": "hi"}]
# 5 choices of 500 tokens: 2,500 tokens and more, whatever the wait, against 2,000 a minute
NEVER_FITS = {"model": "tiny", "messages": MESSAGES, "max_tokens": 500, "n": 5}
FITS = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4}


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    s = Sim(None, "--model", "tiny", "--ttft", "0.01", "--itl", "0.001")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def slow_sim() -> Iterator[Sim]:
    """Answers after ten minutes: a job sent to it is running for the whole test."""
    s = Sim(None, "--model", "tiny", "--ttft", "600")
    yield s
    s.stop()


def _gateway(sim: Sim, tmp: Path, **jobs: Any) -> Pair:
    keys = {HEIDI: ("heidi", "search")}
    config, prefix = sim_jobs_config(sim, tmp, keys, max_in_flight=4, **jobs)
    cfg = yaml.safe_load(config.read_text())
    cfg["tiers"] = {"small": {"tokens_per_minute": 2000}, "rpm1": {"requests_per_minute": 1}}
    cfg["auth"]["api_keys"] += [
        {"sha256": sha(DAVE), "subject": "dave", "team": "search", "tier": "small"},
        {"sha256": sha(ERIN), "subject": "erin", "team": "search", "tier": "rpm1"},
        {"sha256": sha(FRANK), "subject": "frank", "team": "search", "tier": "rpm1"},
        {"sha256": sha(GRACE), "subject": "grace", "team": "search", "tier": "rpm1"},
    ]
    config.write_text(yaml.safe_dump(cfg))
    return Pair(config, prefix, tmp / "files", replicas=1)


@pytest.fixture(scope="module")
def one(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One replica with ONE job worker: a line that holds it holds every job."""
    p = _gateway(sim, tmp_path_factory.mktemp("never-fits"), concurrency=1)
    yield p.a
    p.stop()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _submit(g: Gateway, key: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(
        g.v1 + "/chat/completions",
        json=body,
        headers={**_auth(key), "Prefer": "respond-async", **headers},
        timeout=30,
    )


def _job(g: Gateway, key: str, jid: str) -> dict[str, Any]:
    r = httpx.get(g.v1 + f"/jobs/{jid}", headers=_auth(key), timeout=30)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def _client(g: Gateway, key: str, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=g.v1, api_key=key, **kw)


def _assert_never_fits(status: int, headers: Any, body: dict[str, Any]) -> None:
    assert status == 429, body
    err = body["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "tokens_exceed_limit", err
    assert "2000 tokens per minute" in err["message"] and "max_tokens" in err["message"], err
    assert headers.get("x-should-retry") == "false"
    assert "retry-after" not in headers  # waiting cannot help


def test_a_request_that_can_never_fit_is_refused_once_and_the_sdk_does_not_retry_it(one: Gateway) -> None:
    sent: list[str] = []
    hooks = {"request": [lambda req: sent.append(str(req.url))]}
    with httpx.Client(event_hooks=hooks) as http:
        c = _client(one, DAVE, http_client=http)  # the SDK's default: 2 retries of a 429
        with pytest.raises(openai.RateLimitError) as info:
            c.chat.completions.create(**NEVER_FITS)
    resp = info.value.response
    _assert_never_fits(resp.status_code, resp.headers, resp.json())
    assert len(sent) == 1, sent  # before: sent three times, each refused the same way
    # A request that fits is served, and a retryable refusal keeps its Retry-After.
    r = httpx.post(one.v1 + "/chat/completions", json=FITS, headers=_auth(ERIN), timeout=30)
    assert r.status_code == 200, r.text
    r = httpx.post(one.v1 + "/chat/completions", json=FITS, headers=_auth(ERIN), timeout=30)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded", r.text
    assert int(r.headers["retry-after"]) >= 1 and "x-should-retry" not in r.headers


def test_an_async_request_that_can_never_fit_is_refused_at_submission(one: Gateway) -> None:
    r = _submit(one, DAVE, NEVER_FITS, **{"Idempotency-Key": "never-fits-1"})
    _assert_never_fits(r.status_code, r.headers, r.json())  # before: 202, then a day of retries
    # The refusal left the key unused: the same key makes a job of a request that fits... as a
    # new request (another body) is 422 only once the key was used.
    r = _submit(one, DAVE, FITS, **{"Idempotency-Key": "never-fits-1"})
    assert r.status_code == 202, r.text
    done = poll(lambda: _job(one, DAVE, r.json()["id"]), lambda j: j["status"] in TERMINAL, 20, "job")
    assert done["status"] == "completed" and done["response"]["status_code"] == 200, done


def test_a_batch_line_that_can_never_fit_is_answered_at_once_and_holds_no_worker(one: Gateway) -> None:
    lines = b"\n".join(
        orjson.dumps(line)
        for line in (
            {"custom_id": "never", "method": "POST", "url": "/v1/chat/completions", "body": NEVER_FITS},
            {"custom_id": "fits", "method": "POST", "url": "/v1/chat/completions", "body": FITS},
        )
    )
    c = _client(one, DAVE, max_retries=0)
    f = c.files.create(file=("in.jsonl", io.BytesIO(lines)), purpose="batch")
    batch = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    # Another team's job queued behind it runs: the one worker is not held by the line.
    other = _submit(one, CAROL, FITS)
    assert other.status_code == 202, other.text
    done = poll(lambda: _job(one, CAROL, other.json()["id"]), lambda j: j["status"] in TERMINAL, 20, "job")
    assert done["status"] == "completed", done
    b = poll(lambda: c.batches.retrieve(batch.id), lambda b: b.status in TERMINAL, 20, "batch end")
    assert b.status == "completed" and b.request_counts is not None, b
    assert (b.request_counts.completed, b.request_counts.failed) == (1, 1), b.request_counts
    assert b.error_file_id and b.output_file_id
    (err_line,) = jsonl(c.files.content(b.error_file_id).read())
    assert err_line["custom_id"] == "never" and err_line["error"] is None, err_line
    response = err_line["response"]
    assert response["status_code"] == 429, response
    assert response["body"]["error"]["code"] == "tokens_exceed_limit", response
    (out_line,) = jsonl(c.files.content(b.output_file_id).read())
    assert out_line["custom_id"] == "fits" and out_line["response"]["status_code"] == 200


def _wait_refused(g: Gateway, subject: str) -> None:
    """The worker ran the line once and was refused by the rate limit: it waits now."""
    g.wait_log(
        lambda r: r.get("event") == "request" and r.get("subject") == subject and r.get("status") == 429,
        timeout=20,
    )


def test_a_job_waiting_on_a_rate_limit_is_cancelled_and_frees_its_worker(one: Gateway) -> None:
    r = httpx.post(one.v1 + "/chat/completions", json=FITS, headers=_auth(FRANK), timeout=30)
    assert r.status_code == 200, r.text  # frank's one request this minute
    job = _submit(one, FRANK, FITS)
    assert job.status_code == 202, job.text
    jid = job.json()["id"]
    _wait_refused(one, "frank")  # now waiting (Retry-After: up to a minute) in the one worker
    # The DELETE may meet the worker between its attempt and its wait: then 400 invalid_state.
    cancel = poll(
        lambda: httpx.delete(one.v1 + f"/jobs/{jid}", headers=_auth(FRANK), timeout=30),
        lambda resp: resp.status_code != 400,
        10,
        "DELETE of the waiting job",
    )
    assert cancel.status_code == 200, cancel.text
    assert cancel.json()["status"] == "cancelled", cancel.json()  # before: 200, still in_progress
    # The worker noticed: another team's job runs now, long before frank's minute is over.
    other = _submit(one, CAROL, FITS)
    assert other.status_code == 202, other.text
    done = poll(lambda: _job(one, CAROL, other.json()["id"]), lambda j: j["status"] in TERMINAL, 10, "job")
    assert done["status"] == "completed", done
    assert _job(one, FRANK, jid)["status"] == "cancelled"
    # Cancelling it again answers the same (idempotent).
    again = httpx.delete(one.v1 + f"/jobs/{jid}", headers=_auth(FRANK), timeout=30)
    assert again.status_code == 200 and again.json()["status"] == "cancelled", again.text


def test_a_batch_line_waiting_on_a_rate_limit_lets_its_cancel_end_promptly(one: Gateway) -> None:
    r = httpx.post(one.v1 + "/chat/completions", json=FITS, headers=_auth(GRACE), timeout=30)
    assert r.status_code == 200, r.text  # grace's one request this minute
    line = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": FITS}
    c = _client(one, GRACE, max_retries=0)
    f = c.files.create(file=("in.jsonl", io.BytesIO(orjson.dumps(line))), purpose="batch")
    batch = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    _wait_refused(one, "grace")
    assert c.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    # Before: the line slept out its Retry-After (30 s) before it looked at the batch again.
    b = poll(lambda: c.batches.retrieve(batch.id), lambda b: b.status == "cancelled", 10, "cancelled")
    assert b.request_counts is not None and b.request_counts.completed == 0
    other = _submit(one, CAROL, FITS)
    done = poll(lambda: _job(one, CAROL, other.json()["id"]), lambda j: j["status"] in TERMINAL, 10, "job")
    assert done["status"] == "completed", done


def test_delete_says_so_when_a_job_can_no_longer_be_cancelled(
    slow_sim: Sim, tmp_path_factory: pytest.TempPathFactory, one: Gateway
) -> None:
    # Ended: 400 invalid_state, and the job is unchanged.
    r = _submit(one, HEIDI, FITS)
    jid = r.json()["id"]
    poll(lambda: _job(one, HEIDI, jid), lambda j: j["status"] == "completed", 20, "completed")
    gone = httpx.delete(one.v1 + f"/jobs/{jid}", headers=_auth(HEIDI), timeout=30)
    assert gone.status_code == 400, gone.text  # before: 200 with the completed job
    assert gone.json()["error"]["code"] == "invalid_state", gone.text
    assert _job(one, HEIDI, jid)["status"] == "completed"
    # Running at a backend: cannot be cancelled either (its answer will be its result).
    p = _gateway(slow_sim, tmp_path_factory.mktemp("never-fits-slow"), concurrency=1)
    try:
        g = p.a
        r = _submit(g, HEIDI, FITS)
        jid = r.json()["id"]
        poll(lambda: slow_sim.stats()["running"], lambda n: n >= 1, 20, "the job at the backend")
        running = httpx.delete(g.v1 + f"/jobs/{jid}", headers=_auth(HEIDI), timeout=30)
        assert running.status_code == 400, running.text  # before: 200 with the job in_progress
        assert running.json()["error"]["code"] == "invalid_state", running.text
        assert "in_progress" in running.json()["error"]["message"]
        assert _job(g, HEIDI, jid)["status"] == "in_progress"
    finally:
        p.stop()
