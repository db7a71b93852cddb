"""Batch API and 202 + poll jobs through a gateway process, the real OpenAI SDK and real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis

from tests.jobs_helpers import ALICE, BOB, CAROL, chat_lines, jobs_config, jsonl, poll
from tests.procs import Gateway, Sim


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    s = Sim(None, "--model", "tiny", "--model", "big", "--ttft", "0.01", "--itl", "0.002")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gw(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, str]]:
    path, prefix = jobs_config(tmp_path_factory.mktemp("jobs"))
    g = Gateway([sim.url], config=path)
    yield g, prefix
    g.stop()


def client(g: Gateway, key: str = ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=g.v1, api_key=key, max_retries=0)


def run_batch(c: openai.OpenAI, data: bytes, timeout: float = 60, **kw: Any) -> Any:
    f = c.files.create(file=("in.jsonl", data), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h", **kw)
    assert b.status in ("validating", "in_progress")
    return poll(
        lambda: c.batches.retrieve(b.id),
        lambda x: x.status in ("completed", "failed", "expired", "cancelled"),
        timeout,
        f"batch {b.id} finished",
    )


def test_batch_flow_with_the_sdk(gw: tuple[Gateway, str]) -> None:
    g, _ = gw
    c = client(g)
    done = run_batch(c, chat_lines(25), metadata={"job": "nightly"})
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (
        25,
        25,
        0,
    )
    assert done.metadata == {"job": "nightly"}
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert done.output_file_id and not done.error_file_id
    lines = jsonl(c.files.content(done.output_file_id).content)
    assert sorted(x["custom_id"] for x in lines) == sorted(f"req-{i}" for i in range(25))
    for x in lines:
        assert x["error"] is None
        assert x["response"]["status_code"] == 200
        assert x["response"]["body"]["object"] == "chat.completion"
        assert x["response"]["body"]["usage"]["completion_tokens"] >= 1
        assert x["id"].startswith("batch_req_")
    listed = c.batches.list(limit=100)
    assert done.id in [b.id for b in listed.data]
    # The output file is the owner's, like any file.
    assert c.files.retrieve(done.output_file_id).purpose == "batch_output"


def test_batch_pagination(gw: tuple[Gateway, str]) -> None:
    g, _ = gw
    c = client(g, BOB)
    f = c.files.create(file=("in.jsonl", chat_lines(1)), purpose="batch")
    ids = [
        c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id
        for _ in range(3)
    ]
    page1 = c.batches.list(limit=2)
    assert [b.id for b in page1.data] == ids[::-1][:2] and page1.has_more
    page2 = c.batches.list(limit=2, after=page1.data[-1].id)
    assert [b.id for b in page2.data] == [ids[0]]


def test_bad_input_fails_at_validation_with_line_numbers(gw: tuple[Gateway, str]) -> None:
    g, prefix = gw
    c = client(g, CAROL)  # team research may use `tiny` only
    good = orjson.loads(chat_lines(1).splitlines()[0])
    lines = [
        orjson.dumps(good),  # 1 ok
        b"{not json",  # 2 malformed
        orjson.dumps({**good, "custom_id": "x2", "url": "/v1/completions"}),  # 3 url mismatch
        orjson.dumps(good),  # 4 duplicate custom_id
        orjson.dumps({**good, "custom_id": "x4", "body": {**good["body"], "stream": True}}),  # 5 stream
        orjson.dumps({**good, "custom_id": "x5", "body": {**good["body"], "model": "big"}}),  # 6 not allowed
    ]
    r = redis.Redis()
    before = r.xlen(f"{prefix}q:tiny")
    done = run_batch(c, b"\n".join(lines) + b"\n")
    assert done.status == "failed", done
    assert done.errors is not None and done.errors.data is not None
    got = {e.line for e in done.errors.data}
    assert {2, 3, 4, 5, 6} <= got and 1 not in got, done.errors
    for e in done.errors.data:
        assert e.code and e.message
    assert r.xlen(f"{prefix}q:tiny") == before  # nothing enqueued


def test_others_get_404_on_batches_and_files(gw: tuple[Gateway, str]) -> None:
    g, _ = gw
    a, b = client(g, ALICE), client(g, CAROL)
    f = a.files.create(file=("in.jsonl", chat_lines(2)), purpose="batch")
    batch = a.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    for call in (
        lambda: b.batches.retrieve(batch.id),
        lambda: b.batches.cancel(batch.id),
        lambda: b.files.retrieve(f.id),
        lambda: b.files.content(f.id),
        lambda: b.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert info.value.body is not None
    assert batch.id not in [x.id for x in b.batches.list().data]


def test_batch_request_errors_are_openai_shaped(gw: tuple[Gateway, str]) -> None:
    g, _ = gw
    c = client(g)
    f = c.files.create(file=("in.jsonl", chat_lines(1)), purpose="batch")
    for kwargs, param in (
        ({"endpoint": "/v1/images", "completion_window": "24h"}, "endpoint"),
        ({"endpoint": "/v1/chat/completions", "completion_window": "48h"}, "completion_window"),
    ):
        r = httpx.post(
            g.v1 + "/batches",
            json={"input_file_id": f.id, **kwargs},
            headers={"Authorization": f"Bearer {ALICE}"},
        )
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error"
    r = httpx.post(g.v1 + "/batches", json={"input_file_id": f.id}, headers={})
    assert r.status_code == 401


def test_cancel_keeps_partial_output(sim: Sim, tmp_path: Path) -> None:
    slow = Sim(None, "--model", "tiny", "--ttft", "0.05", "--itl", "0.05")
    path, _ = jobs_config(tmp_path, concurrency=2)
    g = Gateway([slow.url], config=path)
    try:
        c = client(g)
        f = c.files.create(file=("in.jsonl", chat_lines(40, max_tokens=8)), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        poll(
            lambda: c.batches.retrieve(b.id),
            lambda x: x.request_counts is not None and x.request_counts.completed >= 2,
            60,
            "two lines done",
        )
        assert c.batches.cancel(b.id).status in ("cancelling", "cancelled")
        done = poll(lambda: c.batches.retrieve(b.id), lambda x: x.status == "cancelled", 60, "cancelled")
        assert done.request_counts is not None
        assert 2 <= done.request_counts.completed < 40
        assert done.output_file_id
        out = jsonl(c.files.content(done.output_file_id).content)
        assert len(out) == done.request_counts.completed
        assert len({x["custom_id"] for x in out}) == len(out)
    finally:
        g.stop()
        slow.stop()


# ------------------------------------------------------------------ 202 + poll


def async_post(g: Gateway, body: dict[str, Any], key: str = ALICE, **headers: str) -> httpx.Response:
    return httpx.post(
        g.v1 + "/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}", "Prefer": "respond-async", **headers},
        timeout=30,
    )


def test_respond_async_202_then_poll(gw: tuple[Gateway, str]) -> None:
    g, _ = gw
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    r = async_post(g, body)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert r.headers["preference-applied"] == "respond-async"
    assert job["status"] in ("queued", "in_progress", "completed")
    h = {"Authorization": f"Bearer {ALICE}"}
    done = poll(
        lambda: httpx.get(g.url + r.headers["location"], headers=h).json(),
        lambda j: j["status"] in ("completed", "failed"),
        30,
        "job done",
    )
    assert done["status"] == "completed", done
    assert done["response"]["status_code"] == 200
    sync = httpx.post(g.v1 + "/chat/completions", json=body, headers=h).json()
    assert set(done["response"]["body"]) == set(sync)
    assert done["response"]["body"]["object"] == "chat.completion"
    # Someone else cannot see it.
    other = httpx.get(g.url + r.headers["location"], headers={"Authorization": f"Bearer {CAROL}"})
    assert other.status_code == 404 and other.json()["error"]["type"] == "invalid_request_error"


def test_respond_async_idempotency_key(gw: tuple[Gateway, str]) -> None:
    g, _ = gw
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    first = async_post(g, body, **{"Idempotency-Key": "order-42"})
    again = async_post(g, body, **{"Idempotency-Key": "order-42"})
    other = async_post(g, body, BOB, **{"Idempotency-Key": "order-42"})
    assert first.status_code == again.status_code == other.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert other.json()["id"] != first.json()["id"]  # keys are per principal


def test_respond_async_validates_before_accepting(gw: tuple[Gateway, str]) -> None:
    g, _ = gw
    msgs = [{"role": "user", "content": "hi"}]
    for body, key, status in (
        ({"model": "tiny", "messages": msgs, "stream": True}, ALICE, 400),
        ({"model": "tiny", "messages": "nope"}, ALICE, 400),
        ({"model": "big", "messages": msgs}, CAROL, 403),
        ({"model": "tiny", "messages": msgs}, "sk-wrong", 401),
    ):
        r = async_post(g, body, key)
        assert r.status_code == status, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_async_job_with_a_backend_error_keeps_the_status(gw: tuple[Gateway, str]) -> None:
    g, _ = gw
    # max_tokens beyond the model's length: vLLM (and the simulator) answer 400.
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}
    r = async_post(g, body)
    if r.status_code == 400:  # the gateway's own ceiling refused it synchronously: also right
        return
    assert r.status_code == 202
    h = {"Authorization": f"Bearer {ALICE}"}
    done = poll(
        lambda: httpx.get(g.url + r.headers["location"], headers=h).json(),
        lambda j: j["status"] in ("completed", "failed"),
        30,
        "job done",
    )
    assert done["response"]["status_code"] == 400
    assert done["response"]["body"]["error"]["type"] == "invalid_request_error"


def test_jobs_metrics_exposed(gw: tuple[Gateway, str]) -> None:
    g, _ = gw
    text = httpx.get(g.url + "/metrics").text
    for name in ("gateway_jobs_pending", "gateway_batches", "gateway_job_lines_total"):
        assert name in text


def test_an_idempotency_key_reused_for_another_request_is_422(gw: tuple[Gateway, str]) -> None:
    g, _ = gw
    body = {"model": "tiny", "messages": [{"role": "user", "content": "one"}], "max_tokens": 2}
    first = async_post(g, body, **{"Idempotency-Key": "reused-key"})
    other = async_post(
        g, {**body, "messages": [{"role": "user", "content": "two"}]}, **{"Idempotency-Key": "reused-key"}
    )
    assert first.status_code == 202
    assert other.status_code == 422, other.text
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert other.json()["error"]["param"] == "Idempotency-Key"
