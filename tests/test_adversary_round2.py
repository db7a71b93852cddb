"""Adversary, round 2: the Idempotency-Key, deleted-input and upload-size promises of
docs/jobs.md, attacked through real gateway processes, real Redis and httpx/raw sockets.

Tests named ``test_bug_*`` demonstrate a broken promise and fail on the code they were written
against; the others pin what held.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
import yaml

from tests.jobs_helpers import (
    Pair,
    chat_lines,
    clean_prefix,
    poll,
    private_redis,
    sim_jobs_config,
)
from tests.procs import Gateway, Sim, python_m

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
DAN = "sk-dan-" + "d" * 24
EVE = "sk-eve-" + "e" * 24
FAY = "sk-fay-" + "f" * 24
GUS = "sk-gus-" + "9" * 24
HAL = "sk-hal-" + "8" * 24
EXTRA = {"dan": DAN, "eve": EVE, "fay": FAY, "gus": GUS, "hal": HAL}


def owner_of(subject: str, team: str) -> str:
    """The owner digest the gateway keys a principal's records by (gateway/jobs/files.py)."""
    return hashlib.sha256(orjson.dumps([subject, team])).hexdigest()[:32]


def _config(sim: Sim, tmp: Path, max_in_flight: int = 1, **jobs: Any) -> tuple[Path, str]:
    keys = {k: (n, "search") for n, k in EXTRA.items()}
    return sim_jobs_config(sim, tmp, keys, max_in_flight, prefix=f"test:adv2:{secrets.token_hex(4)}:", **jobs)


def pair(sim: Sim, tmp: Path, max_in_flight: int = 1, **jobs: Any) -> Pair:
    """Two replicas on one Redis and one file store."""
    config, prefix = _config(sim, tmp, max_in_flight, **jobs)
    return Pair(config, prefix, tmp / "files")


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def submit(
    g: Gateway,
    key: str,
    idem: str | bytes | None = None,
    body: dict[str, Any] | None = None,
    path: str = "/chat/completions",
) -> httpx.Response:
    headers = {k.encode(): v.encode() for k, v in auth(key).items()}
    headers[b"Prefer"] = b"respond-async"
    if idem is not None:
        headers[b"Idempotency-Key"] = idem if isinstance(idem, bytes) else idem.encode()
    return httpx.post(g.v1 + path, json=body or BODY, headers=headers, timeout=60)


def job(g: Gateway, key: str, jid: str) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{g.v1}/jobs/{jid}", headers=auth(key), timeout=10).json()
    return data


def assert_error(r: httpx.Response, status: int, code: str | None, kind: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    if kind is not None:
        assert err["type"] == kind, err
    return dict(err)


@pytest.fixture(scope="module")
def slow_sim() -> Iterator[Sim]:
    """Answers after ten minutes: a job sent to it stays queued or running."""
    s = Sim(None, "--model", "tiny", "--ttft", "600")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def fast_sim() -> Iterator[Sim]:
    s = Sim(None, "--model", "tiny", "--ttft", "0.01", "--itl", "0.001")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def fast(fast_sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    p = pair(fast_sim, tmp_path_factory.mktemp("adv2-fast"), max_in_flight=4, max_stored_bytes=100_000)
    yield p
    p.stop()


# --------------------------------------------------------------------------- Idempotency-Key: what held


def test_idempotency_key_edges_of_length_and_characters(fast: Pair) -> None:
    """1..255 printable characters are keys (a repeat returns the job); others are 400."""
    for key in (b"x", b"k" * 255, b"a b:c/d*?{x}", "é-utf8".encode(), b"idem:" + b"z" * 100):
        first = submit(fast.a, DAN, key)
        assert first.status_code == 202, (key, first.text)
        again = submit(fast.b, DAN, key)
        assert again.status_code == 202 and again.json()["id"] == first.json()["id"], (key, again.text)
    for bad in (b"k" * 256,):
        assert_error(submit(fast.a, DAN, bad), 400, None, "invalid_request_error")
    # raw bytes the SDKs never send: NBSP, NEL, an empty value
    for raw in (b"a\xa0b", b"\x85", b""):
        status, body = _raw_submit(fast.a, DAN, raw)
        assert status == 400, (raw, body)
        err = orjson.loads(body)["error"]
        assert (err["param"], err["type"]) == ("Idempotency-Key", "invalid_request_error"), (raw, err)


def test_a_control_character_in_a_header_gets_an_openai_shaped_400(fast: Pair) -> None:
    """Promise 4: every error is OpenAI-shaped. An Idempotency-Key (any header) with a control
    character is refused by the HTTP parser with uvicorn's plain-text `Invalid HTTP request
    received.`, while the listener's own refusals (431, 408, 503) are OpenAI-shaped JSON."""
    for raw in (b"a\x01b", b"a\x7fb"):
        status, body = _raw_submit(fast.a, DAN, raw)
        assert status == 400, (raw, body)
        try:
            err = orjson.loads(body)["error"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise AssertionError(
                f"Idempotency-Key {raw!r}: 400 body is not OpenAI-shaped: {body!r}"
            ) from None
        assert set(err) == {"message", "type", "param", "code"}, err


def _raw_submit(g: Gateway, key: str, idem: bytes) -> tuple[int, bytes]:
    body = orjson.dumps(BODY)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        + f"Authorization: Bearer {key}\r\nPrefer: respond-async\r\n".encode()
        + b"Content-Type: application/json\r\n"
        + b"Idempotency-Key: "
        + idem
        + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )
    with socket.create_connection(("127.0.0.1", g.port), timeout=20) as s:
        s.sendall(head + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def test_one_key_two_principals_are_independent_and_reuse_after_the_end(fast: Pair) -> None:
    key = "shared-" + secrets.token_hex(4)
    a = submit(fast.a, EVE, key)
    b = submit(fast.b, FAY, key)
    assert a.status_code == b.status_code == 202, (a.text, b.text)
    assert a.json()["id"] != b.json()["id"]
    # another body under each principal's key: 422 for each, OpenAI-shaped
    other = {**BODY, "max_tokens": 5}
    assert_error(submit(fast.a, EVE, key, other), 422, "idempotency_key_reused", "invalid_request_error")
    # another endpoint with the same body: 422 too
    assert_error(
        submit(fast.a, EVE, key, {"model": "tiny", "prompt": "hi"}, "/completions"),
        422,
        "idempotency_key_reused",
    )
    for g, k, r in ((fast.a, EVE, a), (fast.b, FAY, b)):
        jid = r.json()["id"]
        poll(lambda: job(g, k, jid)["status"], lambda s: s == "completed", 60, "job completed")  # noqa: B023
        again = submit(g, k, key)  # after the job ended: the same job, completed
        assert again.status_code == 202 and again.json()["id"] == jid, again.text
        assert again.json()["status"] == "completed"


# --------------------------------------------------------------------------- Idempotency-Key: broken


def test_the_key_outlives_its_queued_job(slow_sim: Sim, tmp_path: Path) -> None:
    """Promise 1: a repeat returns the job the key made. The key is kept `jobs.retention`
    seconds from the submission (SET EX retention), but the job's record lives until the job
    ends plus `retention`: a job still queued after `retention` (a backlog, a backend loading
    or scaled to zero: docs/jobs.md says lines wait) has lost its key, and the client's retry
    makes a second job. With retention 3 s and a backend that never answers, the retry 4 s
    later must still return the first job."""
    p = pair(slow_sim, tmp_path, retention=3, concurrency=1)
    try:
        key = "lapse-" + secrets.token_hex(4)
        first = submit(p.a, DAN, key)
        assert first.status_code == 202, first.text
        jid = first.json()["id"]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # retries over 5 s, as a client's would be
            again = submit(p.b, DAN, key)
            assert again.status_code == 202, again.text
            assert job(p.a, DAN, jid)["status"] in ("queued", "in_progress")
            assert again.json()["id"] == jid, (
                f"a retry of Idempotency-Key {key!r} made a second job {again.json()['id']} while "
                f"the first, {jid}, is still {job(p.a, DAN, jid)['status']}"
            )
            time.sleep(0.5)
    finally:
        p.stop()


def test_a_retention_under_a_second_is_refused_by_the_config(fast_sim: Sim, tmp_path: Path) -> None:
    """`jobs.retention` of 0.5 s once passed the config (gt=0) and then set every
    Idempotency-Key with `EX int(0.5)`, i.e. EX 0, which Redis refuses: every keyed submission
    answered 503. A retention is whole seconds from 1: check-config says so, naming the field."""
    config, prefix = _config(fast_sim, tmp_path, 4, retention=0.5)
    out = subprocess.run(
        [*python_m("gateway"), "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0, out.stdout
    assert "jobs.retention" in out.stdout + out.stderr, out.stdout + out.stderr
    clean_prefix(prefix)


def _catch_a_holder(
    p: Pair, key_of: str, tries: int = 300
) -> tuple[str, concurrent.futures.Future[httpx.Response], concurrent.futures.ThreadPoolExecutor]:
    """Send a keyed submission to replica A and SIGSTOP A in the window where it holds the key
    but has recorded no job yet (seen in Redis while A is stopped). Returns (key, A's pending
    response, its pool); A is left stopped."""
    r = redis.Redis()
    owner = owner_of("gus", "search")
    pool = concurrent.futures.ThreadPoolExecutor(4)
    try:
        for attempt in range(tries):
            key = f"{key_of}-{attempt}-{secrets.token_hex(3)}"
            ikey = f"{p.prefix}idem:{owner}:{key}"
            fut = pool.submit(submit, p.a, GUS, key)
            while not fut.done() and not r.exists(ikey):
                pass
            os.kill(p.a.proc.pid, signal.SIGSTOP)
            held = r.get(ikey)
            if isinstance(held, bytes) and not r.exists(f"{p.prefix}job:{held.decode().split()[0]}"):
                return key, fut, pool
            os.kill(p.a.proc.pid, signal.SIGCONT)
            assert fut.result().status_code == 202
        raise AssertionError(
            f"never caught replica A between claiming a key and recording its job in {tries} tries"
        )
    except BaseException:
        os.kill(p.a.proc.pid, signal.SIGCONT)
        pool.shutdown(wait=True)
        raise
    finally:
        r.close()


def test_a_holder_killed_mid_submission_is_replaced_by_exactly_one_waiter(
    fast_sim: Sim, tmp_path: Path
) -> None:
    """Replica A is killed (-9) holding the key, before it recorded a job: copies of the
    submission on B wait ~5 s, then exactly one job is made, and every copy returns it."""
    p = pair(fast_sim, tmp_path, max_in_flight=4)
    try:
        key, _fut, pool = _catch_a_holder(p, "killed")
        os.kill(p.a.proc.pid, signal.SIGKILL)
        with pool:
            started = time.monotonic()
            copies = list(pool.map(lambda _i: submit(p.b, GUS, key), range(4)))
        assert [c.status_code for c in copies] == [202] * 4, [c.text for c in copies]
        assert len({c.json()["id"] for c in copies}) == 1, [c.json()["id"] for c in copies]
        assert 4.5 < time.monotonic() - started < 30
        assert submit(p.b, GUS, key).json()["id"] == copies[0].json()["id"]
    finally:
        p.stop()


def test_a_holder_paused_past_5s_and_its_replacement_make_one_job(fast_sim: Sim, tmp_path: Path) -> None:
    """Promise 1: copies of one submission racing (on any replicas) make exactly one job.

    The holder is replaced after 5 s without a record on the assumption that its replica died;
    but a replica that was only paused (a GC or VM stall, SIGSTOP, a Redis failover stalling
    its calls) resumes and records its job without checking that it still holds the key (no
    fencing): the replacement made one too. Here replica A is stopped between claiming the key
    and recording its job; the copy sent to B takes over after 5 s and gets a job; A is then
    resumed and answers with another job."""
    p = pair(fast_sim, tmp_path, max_in_flight=4)
    try:
        key, fut, pool = _catch_a_holder(p, "paused")
        with pool:
            copy = pool.submit(submit, p.b, GUS, key)
            replaced = copy.result(timeout=40)  # B's copy takes over after 5 s
            os.kill(p.a.proc.pid, signal.SIGCONT)
            original = fut.result(timeout=40)
        assert replaced.status_code == 202 and original.status_code == 202, (
            replaced.text,
            original.text,
            p.a.log_lines()[-20:],
        )
        repeat = submit(p.b, GUS, key).json()["id"]
        ids = {replaced.json()["id"], original.json()["id"], repeat}
        assert len(ids) == 1, f"one Idempotency-Key made {len(ids)} jobs: {ids} (repeat returns {repeat})"
    finally:
        p.stop()


def test_a_keyed_submission_whose_redis_call_times_out_is_claimed_again_not_refused(
    fast_sim: Sim, tmp_path: Path
) -> None:
    """A Redis call of a keyed submission times out (Redis stalled past the 5 s socket timeout,
    or the replica was paused with the reply unread): whether the key was claimed is unknown.
    The submission checks and claims again once, rather than answering 503 for a job it can
    still make; the key still names exactly one job. Redis here stalls every write for 6.5 s
    (``CLIENT PAUSE ... WRITE``) while the submission claims its key."""
    with private_redis(tmp_path) as rs:
        path, _ = sim_jobs_config(fast_sim, tmp_path, {GUS: ("gus", "search")}, 4, queue=rs.url)
        g = Gateway([], config=path)
        r = redis.Redis.from_url(rs.url)
        try:
            r.execute_command("CLIENT", "PAUSE", "6500", "WRITE")
            started = time.monotonic()
            first = submit(g, GUS, "stalled-once")
            assert time.monotonic() - started > 5  # the stall did hit the submission
            assert first.status_code == 202, first.text
            again = submit(g, GUS, "stalled-once")
            assert again.status_code == 202 and again.json()["id"] == first.json()["id"], again.text
            done = poll(
                lambda: job(g, GUS, first.json()["id"]), lambda j: j["status"] == "completed", 30, "completed"
            )
            assert done["response"]["status_code"] == 200, done
        finally:
            r.close()
            g.stop()


# --------------------------------------------------------------------------- uploads and Content-Length


def _form(data: bytes, boundary: str = "adv2bnd") -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f.bin"\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )


def _raw_upload(
    g: Gateway, key: str, body: bytes, length: int | None, first_response_only: bool = True
) -> tuple[float, int | None, bytes]:
    """(seconds to the first byte of the answer, status or None when the connection closed
    without one, what was received). ``length`` None: chunked."""
    head = (
        f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: multipart/form-data; boundary=adv2bnd\r\n"
    )
    if length is None:
        head += "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        payload = head.encode()
        for i in range(0, len(body), 4096):
            piece = body[i : i + 4096]
            payload += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        payload += b"0\r\n\r\n"
    else:
        payload = head.encode() + f"Content-Length: {length}\r\n\r\n".encode() + body
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", g.port), timeout=20) as s:
        s.sendall(payload)
        data = b""
        first = None
        try:
            while chunk := s.recv(65536):
                first = first if first is not None else time.monotonic() - started
                data += chunk
                if first_response_only and b"\r\n\r\n" in data:
                    head_end = data.index(b"\r\n\r\n") + 4
                    size = int(data[:head_end].lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    if len(data) >= head_end + size:
                        break
        except OSError:
            pass
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    return (first if first is not None else time.monotonic() - started), status, data


@pytest.fixture(scope="module")
def small(fast_sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """Room of 1 MB per principal; bodies must arrive within 3 s."""
    tmp = tmp_path_factory.mktemp("adv2-small")
    config, prefix = _config(fast_sim, tmp, 4, max_stored_bytes=1_000_000)
    cfg = yaml.safe_load(config.read_text())
    cfg["server"] = {"body_timeout": 3}
    config.write_text(yaml.safe_dump(cfg))
    p = Pair(config, prefix, tmp / "files", replicas=1)
    yield p
    p.stop()


def _files_of(p: Pair, key: str) -> list[tuple[str, int]]:
    data = httpx.get(p.a.v1 + "/files", headers=auth(key), timeout=10).json()["data"]
    return [(f["id"], f["bytes"]) for f in data]


def test_an_upload_too_large_for_the_room_is_refused_before_its_body(small: Pair) -> None:
    """Content-Length of 50 MB against 1 MB of room: 429 with only the head and the purpose
    sent (not waiting for the body); chunked uploads within room work, past it 429."""
    form = _form(b"")
    head_only = form[: form.index(b"\r\n\r\n", form.index(b'name="file"')) + 4]
    seconds, status, data = _raw_upload(small.a, DAN, head_only, 50_000_000)
    assert status == 429, data
    assert seconds < 2, seconds
    err = orjson.loads(data.split(b"\r\n\r\n", 1)[1])["error"]
    assert (err["type"], err["code"]) == ("insufficient_quota", "storage_quota_exceeded"), err
    _s, status, data = _raw_upload(small.a, DAN, _form(b"c" * 9000), None)
    assert status == 200, data
    _s, status, data = _raw_upload(small.a, DAN, _form(b"c" * 1_200_000), None)
    assert status == 429, data
    assert [b for _, b in _files_of(small, DAN)] == [9000]


def test_an_upload_with_a_content_length_short_of_its_body_gets_an_openai_shaped_400(small: Pair) -> None:
    """A Content-Length 500 bytes short of the body: nothing is stored (held), but the one
    answer the client gets is uvicorn's plain-text `Invalid HTTP request received.` (the
    surplus bytes parsed as a next request), not an OpenAI-shaped error."""
    body = _form(b"s" * 3000)
    _s, status, data = _raw_upload(small.a, EVE, body, len(body) - 500, first_response_only=False)
    assert _files_of(small, EVE) == []
    assert status is not None and 400 <= status < 500, data
    payload = data.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1 ")[0]
    try:
        err = orjson.loads(payload)["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise AssertionError(f"the answer is not OpenAI-shaped: {data!r}") from None
    assert set(err) == {"message", "type", "param", "code"}, err


def test_an_upload_whose_content_length_promises_more_than_was_sent_is_not_kept(small: Pair) -> None:
    """A Content-Length 500 bytes longer than the body sent: the HTTP request never completes
    (the listener closes it at `server.body_timeout`), yet the gateway answers 200 and keeps
    the file, counted in the principal's usage, as soon as the form's closing boundary is in.
    Expected: a clean 4xx (or no answer), nothing stored, nothing counted."""
    body = _form(b"l" * 3000)
    _s, status, data = _raw_upload(small.a, FAY, body, len(body) + 500)
    stored = _files_of(small, FAY)
    assert stored == [], f"an incomplete request was answered {status} and kept {stored}: {data[:300]!r}"


# --------------------------------------------------------------------------- a batch's input deleted


def test_a_batch_whose_big_input_is_deleted_while_it_starts_fails_cleanly_or_runs(
    slow_sim: Sim, tmp_path: Path
) -> None:
    """20,000-line inputs deleted 0 to 0.6 s after their batch is created: each batch either
    runs (it had opened the file: POSIX keeps the bytes of an open file) or fails with exactly
    one `file_not_found` error without a line, total 0, none of its lines in the queue, and
    no longer counted against max_active_batches. Nothing stays `validating`."""
    p = pair(slow_sim, tmp_path, max_active_batches=6, concurrency=1)
    r = redis.Redis()
    try:
        lines = chat_lines(20_000)
        made: list[str] = []
        for delay in (0.0, 0.05, 0.15, 0.3, 0.6):
            up = httpx.post(
                p.a.v1 + "/files",
                headers=auth(HAL),
                data={"purpose": "batch"},
                files={"file": ("in.jsonl", lines)},
                timeout=60,
            )
            fid = up.json()["id"]
            b = httpx.post(
                p.b.v1 + "/batches",
                headers=auth(HAL),
                json={"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
                timeout=30,
            )
            assert b.status_code == 200, b.text
            made.append(b.json()["id"])
            time.sleep(delay)
            assert httpx.delete(f"{p.a.v1}/files/{fid}", headers=auth(HAL), timeout=30).status_code == 200

        def batches() -> dict[str, dict[str, Any]]:
            return {
                bid: httpx.get(f"{p.a.v1}/batches/{bid}", headers=auth(HAL), timeout=10).json()
                for bid in made
            }

        got = poll(
            batches, lambda bs: all(b["status"] != "validating" for b in bs.values()), 60, "none validating"
        )
        queued: list[dict[bytes, bytes]] = [
            fields
            for stream in r.scan_iter(f"{p.prefix}qs:*:tiny")
            for _id, fields in r.xrange(stream)  # type: ignore[union-attr,misc]
        ]
        running = 0
        for bid, one in got.items():
            in_queue = sum(1 for f in queued if f.get(b"job") == bid.encode())
            if one["status"] == "failed":
                errs = one["errors"]["data"]
                assert [(e["code"], e["line"]) for e in errs] == [("file_not_found", None)], errs
                assert one["request_counts"]["total"] == 0, one
                assert in_queue == 0, (bid, in_queue)
            else:
                assert one["status"] == "in_progress", one
                assert one["request_counts"]["total"] == 20_000, one
                running += 1
        # the failed ones stopped counting: exactly 6 - running more may start
        fid = httpx.post(
            p.a.v1 + "/files",
            headers=auth(HAL),
            data={"purpose": "batch"},
            files={"file": ("in.jsonl", chat_lines(1))},
            timeout=60,
        ).json()["id"]
        codes = [
            httpx.post(
                p.b.v1 + "/batches",
                headers=auth(HAL),
                json={"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
                timeout=30,
            ).status_code
            for _ in range(7 - running)
        ]
        assert codes == [200] * (6 - running) + [429], (running, codes)
    finally:
        r.close()
        p.stop()
