"""Per-principal bounds on the jobs (gateway/jobs/quota.py), through a gateway process, real
Redis and the official OpenAI SDK: batches and jobs not yet ended, files kept.

The backend takes one request at a time and answers after ten minutes, so the first line runs
and every later one waits in the queue: batches and jobs stay active for the whole test.
"""

from __future__ import annotations

import concurrent.futures
import io
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
import yaml

from tests.jobs_helpers import ALICE, BOB, CAROL, chat_lines, clean_prefix, jobs_config, poll, private_redis
from tests.procs import Gateway, Sim

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    s = Sim(None, "--model", "tiny", "--ttft", "600")
    yield s
    s.stop()


def gateway(sim: Sim, tmp: Path, **jobs: Any) -> tuple[Gateway, str]:
    path, prefix = jobs_config(tmp, **jobs)
    cfg = yaml.safe_load(path.read_text())
    cfg["backends"] = [{"url": sim.url, "max_in_flight": 1}]
    path.write_text(yaml.safe_dump(cfg))
    return Gateway([], config=path), prefix


@pytest.fixture(scope="module")
def gw(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g, prefix = gateway(sim, tmp_path_factory.mktemp("quota"), max_active_jobs=2, max_active_batches=1)
    yield g
    g.stop()
    clean_prefix(prefix)


@pytest.fixture(scope="module")
def files_gw(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Path]]:
    tmp = tmp_path_factory.mktemp("quota-files")
    g, prefix = gateway(sim, tmp, max_stored_bytes=1000, max_files=3)
    yield g, next(tmp.glob("gateway-*.yaml"))
    g.stop()
    clean_prefix(prefix)


def client(g: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=g.v1, api_key=key, max_retries=0)


def submit(g: Gateway, key: str, idempotency_key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "Prefer": "respond-async"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return httpx.post(g.v1 + "/chat/completions", json=BODY, headers=headers, timeout=30)


def assert_openai_429(r: httpx.Response, code: str, kind: str) -> dict[str, Any]:
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["code"]) == (kind, code)
    return dict(err)


def test_active_jobs_are_bounded_per_principal_and_freed_when_one_ends(gw: Gateway) -> None:
    first, second = submit(gw, ALICE), submit(gw, ALICE)
    assert first.status_code == second.status_code == 202, (first.text, second.text)
    refused = submit(gw, ALICE)
    err = assert_openai_429(refused, "too_many_active_jobs", "rate_limit_error")
    assert "2 jobs not yet ended" in err["message"]
    assert int(refused.headers["retry-after"]) > 0
    assert submit(gw, BOB).status_code == 202  # another principal is not held back

    # Cancelling a queued job ends it: its place is free again.
    h = {"Authorization": f"Bearer {ALICE}"}
    queued = next(
        j
        for j in (first.json(), second.json())
        if httpx.get(f"{gw.v1}/jobs/{j['id']}", headers=h).json()["status"] == "queued"
    )
    assert httpx.delete(f"{gw.v1}/jobs/{queued['id']}", headers=h).json()["status"] == "cancelled"
    assert submit(gw, ALICE).status_code == 202
    assert_openai_429(submit(gw, ALICE), "too_many_active_jobs", "rate_limit_error")


def test_a_refused_submission_leaves_its_idempotency_key_free(gw: Gateway) -> None:
    """A 429 must not bind the Idempotency-Key to a job that was never made: the retry after the
    bound frees makes one job, and a repeat of that retry returns the same one."""
    h = {"Authorization": f"Bearer {CAROL}"}
    jobs = [submit(gw, CAROL).json() for _ in range(2)]
    assert_openai_429(submit(gw, CAROL, "retry-me"), "too_many_active_jobs", "rate_limit_error")
    queued = next(
        j for j in jobs if httpx.get(f"{gw.v1}/jobs/{j['id']}", headers=h).json()["status"] == "queued"
    )
    httpx.delete(f"{gw.v1}/jobs/{queued['id']}", headers=h)
    again = submit(gw, CAROL, "retry-me")
    assert again.status_code == 202, again.text
    repeat = submit(gw, CAROL, "retry-me")
    assert repeat.status_code == 202, repeat.text
    assert repeat.json()["id"] == again.json()["id"]


def test_active_batches_are_bounded_per_principal(gw: Gateway) -> None:
    c = client(gw, BOB)
    f = c.files.create(file=("in.jsonl", chat_lines(3)), purpose="batch")
    first = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.RateLimitError) as caught:
        c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert caught.value.code == "too_many_active_batches"
    assert int(caught.value.response.headers["retry-after"]) > 0

    # Once the batch ends (cancelled: none of its lines got the backend), another may start.
    c.batches.cancel(first.id)
    poll(lambda: c.batches.retrieve(first.id), lambda b: b.status == "cancelled", 60, "cancelled")
    second = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert second.status in ("validating", "in_progress")


def test_a_batch_that_fails_validation_frees_its_place(gw: Gateway) -> None:
    c = client(gw, ALICE)
    f = c.files.create(file=("bad.jsonl", b"{not json\n"), purpose="batch")
    for _ in range(3):  # the bound is 1: each must have ended before the next is made
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        bid = b.id
        poll(lambda: c.batches.retrieve(bid), lambda x: x.status == "failed", 30, "failed")  # noqa: B023


def test_stored_bytes_are_bounded_per_principal(files_gw: tuple[Gateway, Path]) -> None:
    g, _ = files_gw
    c = client(g, ALICE)
    kept = c.files.create(file=("a.jsonl", io.BytesIO(b"x" * 600)), purpose="batch")
    with pytest.raises(openai.RateLimitError) as caught:
        c.files.create(file=("b.jsonl", io.BytesIO(b"y" * 600)), purpose="batch")
    assert caught.value.code == "storage_quota_exceeded"
    assert caught.value.type == "insufficient_quota"
    assert caught.value.response.headers["x-should-retry"] == "false"  # retrying does not help
    assert "retry-after" not in caught.value.response.headers
    assert [f.id for f in c.files.list()] == [kept.id]  # the refused upload left nothing
    assert client(g, BOB).files.create(file=("b.jsonl", io.BytesIO(b"y" * 600)), purpose="batch")

    c.files.delete(kept.id)  # deleting gives the bytes back
    assert c.files.create(file=("c.jsonl", io.BytesIO(b"z" * 900)), purpose="batch").bytes == 900


def test_file_count_is_bounded_per_principal(files_gw: tuple[Gateway, Path]) -> None:
    c = client(files_gw[0], CAROL)
    made = [c.files.create(file=(f"{i}.jsonl", io.BytesIO(b"{}\n")), purpose="batch") for i in range(3)]
    with pytest.raises(openai.RateLimitError) as caught:
        c.files.create(file=("3.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
    assert caught.value.code == "storage_quota_exceeded"
    c.files.delete(made[0].id)
    c.files.create(file=("4.jsonl", io.BytesIO(b"{}\n")), purpose="batch")


def test_concurrent_uploads_cannot_pass_the_bound_together(files_gw: tuple[Gateway, Path]) -> None:
    """Twelve uploads of 300 bytes at once, over two replicas, against 1,000: exactly three are
    kept (the check and the record are one script in Redis), and the refused ones leave no
    bytes behind."""
    g, config = files_gw
    replica = Gateway([], config=config)
    try:
        clients = [client(g, BOB), client(replica, BOB)]
        for f in clients[0].files.list():
            clients[0].files.delete(f.id)

        def upload(i: int) -> str:
            try:
                clients[i % 2].files.create(file=(f"{i}.jsonl", io.BytesIO(b"q" * 300)), purpose="batch")
                return "kept"
            except openai.RateLimitError as exc:
                assert exc.code == "storage_quota_exceeded"
                return "refused"

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            outcomes = list(pool.map(upload, range(12)))
        assert outcomes.count("kept") == 3, outcomes
        assert len(clients[1].files.list().data) == 3
        store = config.parent / "files"
        sizes = [p.stat().st_size for p in store.rglob("*") if p.is_file()]
        assert sizes.count(300) == 3, sizes
    finally:
        replica.stop()


def test_an_upload_that_cannot_fit_is_refused_before_its_body_is_read(files_gw: tuple[Gateway, Path]) -> None:
    """A Content-Length that cannot fit the principal's room (less the form's own 64 KiB at
    most) is refused at once: the 429 comes while the client has sent only the start of the
    body, and nothing of it is stored."""
    g, config = files_gw
    boundary = "b0undary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
    head += f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
    length = len(head) + 300 * 1024  # a 300 KiB file against 1,000 bytes of room
    before = sorted(p.name for p in (config.parent / "files").rglob("*"))
    with socket.create_connection(("127.0.0.1", g.port), timeout=15) as sock:
        sock.sendall(
            (
                f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ALICE}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {length}\r\n\r\n"
                + head
            ).encode()
            + b"x" * 1024
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)  # a timeout here: the gateway waited for the rest of the body
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 429"), answer[:200]
    assert b"storage_quota_exceeded" in answer or b"content-length" in answer.lower()
    assert sorted(p.name for p in (config.parent / "files").rglob("*")) == before


def test_a_job_recorded_but_not_queued_is_unmade(sim: Sim, tmp_path: Path) -> None:
    """Redis takes the job's record and then refuses the queue's write (here: an ACL without
    XADD): the client is told 503 and retries, so nothing may stay behind, neither a job that
    would never run (its Idempotency-Key naming it) nor its place in the principal's bound."""
    acl = ("--user", "default", "on", "nopass", "~*", "&*", "+@all", "-xadd")
    with private_redis(tmp_path, "--appendonly", "no", *acl) as rs:
        path, prefix = jobs_config(tmp_path, queue=rs.url, max_active_jobs=1)
        cfg = yaml.safe_load(path.read_text())
        cfg["backends"] = [{"url": sim.url, "max_in_flight": 1}]
        path.write_text(yaml.safe_dump(cfg))
        g = Gateway([], config=path)
        try:
            for _ in range(2):  # the second would be 429 if the first kept its place
                r = submit(g, ALICE, "once")
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "jobs_unavailable"
            left = redis.Redis(port=rs.port)
            assert [k for k in left.scan_iter(match=prefix + "job:*")] == []
            assert [k for k in left.scan_iter(match=prefix + "quota:*") if left.zcard(k)] == []
            assert [k for k in left.scan_iter(match=prefix + "idem:*")] == []
            left.close()
        finally:
            g.stop()
