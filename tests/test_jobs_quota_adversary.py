"""Adversarial tests of the per-principal bounds on jobs (docs/jobs.md "Per-principal bounds",
docs/security.md): races across two replicas on one Redis, cancels, failed and interrupted
uploads, double deletes, batch outputs, idempotency keys, one principal against another.

Everything goes through gateway processes, real Redis and the official OpenAI SDK or httpx.
"""

from __future__ import annotations

import concurrent.futures
import io
import secrets
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.jobs_helpers import ALICE, BOB, CAROL, Pair, chat_lines, poll, sim_jobs_config
from tests.procs import Gateway, Sim

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
# The same subject as ALICE (alice, team search) in another team: another principal.
ALICE_RESEARCH = "sk-alice-research-" + "d" * 24
DAVE = "sk-dave-" + "e" * 24
ERIN = "sk-erin-" + "f" * 24
FRANK = "sk-frank-" + "9" * 24
GRACE = "sk-grace-" + "8" * 24
HEIDI = "sk-heidi-" + "7" * 24
IVAN = "sk-ivan-" + "6" * 24
JUDY = "sk-judy-" + "5" * 24
MALLORY = "sk-mallory-" + "4" * 24
OSCAR = "sk-oscar-" + "3" * 24
# every principal of team search, one per test so that tests never share a bound
SEARCH_KEYS = {
    "dave": DAVE,
    "erin": ERIN,
    "frank": FRANK,
    "grace": GRACE,
    "heidi": HEIDI,
    "ivan": IVAN,
    "judy": JUDY,
    "mallory": MALLORY,
    "oscar": OSCAR,
}


@pytest.fixture(scope="module")
def slow_sim() -> Iterator[Sim]:
    """A backend that answers after ten minutes: a job or batch line sent to it never ends."""
    s = Sim(None, "--model", "tiny", "--ttft", "600")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def fast_sim() -> Iterator[Sim]:
    s = Sim(None, "--model", "tiny", "--ttft", "0.01", "--itl", "0.001")
    yield s
    s.stop()


def pair(sim: Sim, tmp: Path, max_in_flight: int = 1, **jobs: Any) -> Pair:
    """Two gateway replicas on one Redis and one file store."""
    keys = {ALICE_RESEARCH: ("alice", "research"), **{k: (n, "search") for n, k in SEARCH_KEYS.items()}}
    config, prefix = sim_jobs_config(sim, tmp, keys, max_in_flight, **jobs)
    return Pair(config, prefix, tmp / "files")


@pytest.fixture(scope="module")
def slow(slow_sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    p = pair(
        slow_sim,
        tmp_path_factory.mktemp("adv-slow"),
        max_active_jobs=4,
        max_active_batches=2,
        concurrency=1,  # one line at a time per replica: two running lines fill both workers
        max_stored_bytes=1000,
        max_files=3,
    )
    yield p
    p.stop()


@pytest.fixture(scope="module")
def fast(fast_sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    p = pair(
        fast_sim,
        tmp_path_factory.mktemp("adv-fast"),
        max_in_flight=4,
        max_active_jobs=1,
        max_active_batches=1,
        max_files=1,
    )
    yield p
    p.stop()


def client(g: Gateway, key: str, retries: int = 0, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=g.v1, api_key=key, max_retries=retries, **kw)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def submit(g: Gateway, key: str, idempotency_key: str | None = None) -> httpx.Response:
    headers = {**auth(key), "Prefer": "respond-async"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return httpx.post(g.v1 + "/chat/completions", json=BODY, headers=headers, timeout=30)


def upload(g: Gateway, key: str, data: bytes, purpose: str = "user_data") -> httpx.Response:
    return httpx.post(
        g.v1 + "/files",
        headers=auth(key),
        data={"purpose": purpose},
        files={"file": ("f.jsonl", data)},
        timeout=30,
    )


def assert_429(r: httpx.Response, code: str, kind: str) -> dict[str, Any]:
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert (err["type"], err["code"]) == (kind, code), err
    if kind == "rate_limit_error":
        assert r.headers["retry-after"] == "30", r.headers
    else:
        assert r.headers["x-should-retry"] == "false", r.headers
    return dict(err)


def cancel_queued_jobs(g: Gateway, key: str, ids: list[str]) -> int:
    n = 0
    for jid in ids:
        r = httpx.delete(f"{g.v1}/jobs/{jid}", headers=auth(key), timeout=30)
        n += r.json()["status"] == "cancelled"
    return n


_saturated: set[str] = set()


def saturate_backend(pair: Pair) -> None:
    """Give both replicas' one worker each a job of FRANK's (that never ends), so that other
    principals' jobs stay queued (cancellable) afterwards."""
    if pair.prefix in _saturated:
        return
    _saturated.add(pair.prefix)
    h = auth(FRANK)
    ids = [submit(pair.a, FRANK).json()["id"] for _ in range(2)]

    def statuses() -> list[str]:
        return [httpx.get(f"{pair.a.v1}/jobs/{j}", headers=h, timeout=10).json()["status"] for j in ids]

    poll(statuses, lambda s: s == ["in_progress"] * 2, 30, "both workers busy")


def stored_bytes(store: Path) -> list[int]:
    """Sizes of the files in the store (temporaries of uploads in flight included)."""
    return [p.stat().st_size for p in store.rglob("*") if p.is_file()] if store.exists() else []


# --------------------------------------------------------------------------- active jobs


def test_concurrent_retries_of_one_idempotency_key_make_one_job(slow: Pair) -> None:
    """Promise: a refused respond-async submission leaves its Idempotency-Key unused; the retry
    (same key, same body) after room frees creates ONE job, and repeating it returns that job.

    A client that retries (its SDK, a second worker) sends the same key more than once at a
    time. Here the principal is at its bound (4 jobs); twenty copies of one request with one
    key race over two replicas; as soon as the first is refused, room for two frees. However
    the race goes, one key must name at most one job."""
    g = slow.a
    saturate_backend(slow)  # DAVE's jobs stay queued: cancelling one frees its place
    held: list[str] = []  # DAVE's jobs, all queued
    for _ in range(4):  # the race is a race: a few rounds, each with a key of its own
        while (r := submit(g, DAVE)).status_code == 202:
            held.append(r.json()["id"])
        assert_429(r, "too_many_active_jobs", "rate_limit_error")
        assert len(held) >= 2, held
        to_cancel, held[:2] = held[:2], []
        held += _race_one_key(slow, to_cancel)


def _race_one_key(slow: Pair, to_cancel: list[str]) -> set[str]:
    key = "retry-" + secrets.token_hex(4)
    first_refused = threading.Event()

    def send(i: int) -> httpx.Response:
        r = submit(slow.both[i % 2], DAVE, key)
        if r.status_code == 429:
            first_refused.set()
        return r

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(send, i) for i in range(24)]
        assert first_refused.wait(30), [f.result().text for f in futures if f.done()]
        assert cancel_queued_jobs(slow.a, DAVE, to_cancel) == 2  # room for two more jobs now
        responses = [f.result() for f in futures]
    made = {r.json()["id"] for r in responses if r.status_code == 202}
    statuses = sorted(r.status_code for r in responses)
    assert len(made) <= 1, f"one Idempotency-Key made {len(made)} jobs: {made} ({statuses})"
    repeat = submit(slow.b, DAVE, key)
    assert repeat.status_code == 202, f"{repeat.text} (the race made {made})"
    assert made <= {repeat.json()["id"]}, (made, repeat.json()["id"])
    return {repeat.json()["id"]}


def test_job_submits_racing_over_two_replicas_pass_the_bound_exactly(slow: Pair) -> None:
    """24 submissions at once, half to each replica, against a bound of 4: exactly 4 jobs,
    every refusal OpenAI-shaped with Retry-After; another principal is not held back."""
    saturate_backend(slow)
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(lambda i: submit(slow.both[i % 2], ERIN), range(24)))
    made = [r for r in responses if r.status_code == 202]
    assert len(made) == 4, sorted(r.status_code for r in responses)
    for r in responses:
        if r.status_code != 202:
            assert_429(r, "too_many_active_jobs", "rate_limit_error")
    assert submit(slow.b, BOB).status_code == 202


def test_the_same_subject_in_another_team_has_bounds_of_its_own(slow: Pair) -> None:
    saturate_backend(slow)
    for _ in range(4):
        assert submit(slow.a, ALICE).status_code == 202
    assert_429(submit(slow.b, ALICE), "too_many_active_jobs", "rate_limit_error")
    assert submit(slow.b, ALICE_RESEARCH).status_code == 202

    assert upload(slow.a, ALICE, b"a" * 1000).status_code == 200
    assert_429(upload(slow.a, ALICE, b"a"), "storage_quota_exceeded", "insufficient_quota")
    assert upload(slow.b, ALICE_RESEARCH, b"r" * 1000).status_code == 200


def test_batch_creates_racing_over_two_replicas_and_a_cancel(slow: Pair) -> None:
    """12 batch creates at once over two replicas, bound 2: exactly 2. A batch being cancelled
    still counts; once cancelled it does not, and exactly one more may start."""
    saturate_backend(slow)  # the batches' lines stay queued: the batches stay in progress
    clients = [client(g, CAROL) for g in slow.both]
    f = clients[0].files.create(file=("in.jsonl", chat_lines(2)), purpose="batch")

    def create(i: int) -> str:
        try:
            return (
                clients[i % 2]
                .batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
                .id
            )
        except openai.RateLimitError as exc:
            assert exc.code == "too_many_active_batches", exc
            assert exc.response.headers["retry-after"] == "30"
            assert exc.type == "rate_limit_error"
            return "refused"

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(create, range(12)))
    made = [o for o in outcomes if o != "refused"]
    assert len(made) == 2, outcomes

    c = clients[1]
    # A cancel ends a batch no sooner than 3 s later (lines starting then are waited for):
    # until then it is cancelling, and counts (docs/jobs.md).
    assert c.batches.cancel(made[0]).status == "cancelling"
    with pytest.raises(openai.RateLimitError):
        c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    poll(lambda: c.batches.retrieve(made[0]), lambda b: b.status == "cancelled", 60, "cancelled")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(create, range(6)))
    assert len([o for o in outcomes if o != "refused"]) == 1, outcomes


def test_a_batch_past_its_completion_window_stops_counting(slow: Pair) -> None:
    saturate_backend(slow)
    c = client(slow.a, MALLORY)
    f = c.files.create(file=("in.jsonl", chat_lines(1)), purpose="batch")
    short = [
        c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="2s")
        for _ in range(2)
    ]
    with pytest.raises(openai.RateLimitError):
        c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    for b in short:
        poll(lambda: c.batches.retrieve(b.id), lambda x: x.status == "expired", 60, "expired")  # noqa: B023
    for _ in range(2):
        c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")


def test_a_batch_whose_input_file_is_deleted_as_it_starts_ends_and_stops_counting(
    slow_sim: Sim, tmp_path: Path
) -> None:
    """A batch is created while its input file is deleted (another replica, at once). If the
    file was gone before the batch's validation read it, the batch cannot run: it must end
    (failed) and give its place back, not stay `validating` (counted) until its window ends.

    Observed: validation meets FileNotFoundError (an OSError), which the validator treats as
    Redis being away ("the sweeper resumes it"); every resumption fails the same way, so the
    batch stays `validating`, and counts against max_active_batches, for 24 h + 10 min."""
    p = pair(slow_sim, tmp_path, max_active_batches=50, concurrency=1)
    try:
        created: list[str] = []
        body = {"endpoint": "/v1/chat/completions", "completion_window": "24h"}
        for _ in range(30):
            if len(created) >= 8:
                break
            fid = upload(p.a, OSCAR, chat_lines(3), purpose="batch").json()["id"]
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                made = [
                    pool.submit(
                        httpx.post,
                        p.both[i % 2].v1 + "/batches",
                        headers=auth(OSCAR),
                        json={**body, "input_file_id": fid},
                        timeout=30,
                    )
                    for i in range(3)
                ]
                gone = pool.submit(httpx.delete, f"{p.b.v1}/files/{fid}", headers=auth(OSCAR), timeout=30)
                assert gone.result().status_code == 200
                created += [m.result().json()["id"] for m in made if m.result().status_code == 200]
        assert created

        def statuses() -> dict[str, str]:
            return {
                b: httpx.get(f"{p.a.v1}/batches/{b}", headers=auth(OSCAR), timeout=10).json()["status"]
                for b in created
            }

        # The sweeper resumes a validation left 30 s; 45 s leaves room for one resumption.
        try:
            poll(statuses, lambda s: "validating" not in s.values(), 45, "no batch left validating")
        except AssertionError as exc:
            interrupted = [line for line in p.a.log_lines() if "validation interrupted" in line]
            raise AssertionError(f"{exc}\n{len(interrupted)} 'validation interrupted' logs") from None
    finally:
        p.stop()


# --------------------------------------------------------------------------- stored files


def test_racing_deletes_of_one_file_give_its_bytes_back_once(slow: Pair) -> None:
    """Ten deletes of one file at once over two replicas: its 400 bytes come back once, not
    ten times (usage never goes below what is kept, so the bound still holds afterwards)."""
    g = slow.a
    a = upload(g, GRACE, b"a" * 400).json()
    upload(g, GRACE, b"b" * 400).raise_for_status()
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        codes = list(
            pool.map(
                lambda i: (
                    httpx.delete(f"{slow.both[i % 2].v1}/files/{a['id']}", headers=auth(GRACE)).status_code
                ),
                range(10),
            )
        )
    assert set(codes) <= {200, 404} and 200 in codes, codes
    assert upload(g, GRACE, b"c" * 600).status_code == 200  # 400 + 600 = the bound, 1000
    assert_429(upload(slow.b, GRACE, b"d"), "storage_quota_exceeded", "insufficient_quota")
    files = client(g, GRACE).files.list().data
    assert sorted(f.bytes for f in files) == [400, 600]
    client(g, GRACE).files.delete(next(f.id for f in files if f.bytes == 600))
    assert upload(g, GRACE, b"e").status_code == 200
    assert upload(g, GRACE, b"f").status_code == 200  # 3 files: the file bound
    assert_429(upload(slow.b, GRACE, b"g"), "storage_quota_exceeded", "insufficient_quota")


def test_racing_uploads_pass_the_file_count_bound_exactly(slow: Pair) -> None:
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda i: upload(slow.both[i % 2], JUDY, b"{}\n"), range(12)))
    assert sorted(r.status_code for r in responses) == [200] * 3 + [429] * 9
    for r in responses:
        if r.status_code == 429:
            assert_429(r, "storage_quota_exceeded", "insufficient_quota")
    assert len(client(slow.a, JUDY).files.list().data) == 3


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str) -> bytes:
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def _post_form(g: Gateway, key: str, body: bytes, boundary: str) -> httpx.Response:
    return httpx.post(
        g.v1 + "/files",
        headers={**auth(key), "Content-Type": f"multipart/form-data; boundary={boundary}"},
        content=body,
        timeout=30,
    )


def _send_and_hang_up(g: Gateway, key: str, body: bytes, boundary: str, claimed: int) -> None:
    """POST ``body`` (a prefix of a form of ``claimed`` bytes) and close the connection."""
    head = (
        f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {claimed}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", g.port), timeout=10) as sock:
        sock.sendall(head + body)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        try:
            sock.recv(4096)  # whatever the gateway answers (or nothing): it saw the end
        except OSError:
            pass


def test_uploads_cut_off_midway_keep_no_bytes_and_no_count(slow: Pair) -> None:
    boundary = "advquota" + secrets.token_hex(4)
    full = _multipart([("purpose", None, b"user_data"), ("file", "f.bin", b"x" * 5000)], boundary)
    _send_and_hang_up(slow.a, HEIDI, full[:3000], boundary, len(full))  # in the file part
    late = _multipart([("file", "f.bin", b"y" * 4321), ("purpose", None, b"user_data")], boundary)
    _send_and_hang_up(slow.b, HEIDI, late[: late.index(b'name="purpose"')], boundary, len(late))
    _send_and_hang_up(slow.a, HEIDI, full[:-10], boundary, len(full))  # before the closing boundary

    def leftovers() -> list[Path]:
        return [
            p for p in slow.store.glob("*") if p.name.startswith(".tmp-") or p.stat().st_size in (5000, 4321)
        ]

    poll(leftovers, lambda left: not left, 30, "no bytes of the cut-off uploads left")
    assert client(slow.a, HEIDI).files.list().data == []
    assert upload(slow.b, HEIDI, b"z" * 1000).status_code == 200  # the whole allowance is free


def test_an_upload_with_its_purpose_after_the_file_refused_for_quota_keeps_nothing(slow: Pair) -> None:
    kept = upload(slow.a, IVAN, b"k" * 600)
    assert kept.status_code == 200
    boundary = "advquota" + secrets.token_hex(4)
    late = _multipart([("file", "f.bin", b"q" * 555), ("purpose", None, b"user_data")], boundary)
    refused = _post_form(slow.b, IVAN, late, boundary)
    assert_429(refused, "storage_quota_exceeded", "insufficient_quota")
    assert "retry-after" not in refused.headers
    bad = _multipart([("file", "f.bin", b"p" * 333), ("purpose", None, b"fine-tune")], boundary)
    assert _post_form(slow.a, IVAN, bad, boundary).status_code == 400
    poll(
        lambda: stored_bytes(slow.store),
        lambda sizes: 555 not in sizes and 333 not in sizes,
        30,
        "refused bytes removed",
    )
    assert [f.id for f in client(slow.a, IVAN).files.list().data] == [kept.json()["id"]]

    # The SDK (its default retries on) takes `x-should-retry: false` at its word: one request.
    sent: list[str] = []
    counted = httpx.Client(event_hooks={"request": [lambda req: sent.append(req.url.path)]}, timeout=30)
    sdk = client(slow.b, IVAN, retries=3, http_client=counted)
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.files.create(file=("more.jsonl", io.BytesIO(b"m" * 500)), purpose="user_data")
    assert caught.value.code == "storage_quota_exceeded"
    assert sent == ["/v1/files"], sent


# --------------------------------------------------------------------------- things ending


def test_a_job_that_completes_stops_counting(fast: Pair) -> None:
    first = submit(fast.a, ERIN)
    assert first.status_code == 202, first.text
    jid = first.json()["id"]
    h = auth(ERIN)
    poll(
        lambda: httpx.get(f"{fast.b.v1}/jobs/{jid}", headers=h, timeout=10).json()["status"],
        lambda s: s in ("completed", "failed"),
        60,
        "job ended",
    )
    again = submit(fast.b, ERIN)
    assert again.status_code == 202, again.text


def test_batch_outputs_are_never_refused_but_count(fast: Pair) -> None:
    """max_files is 1 and the input file is that one: the batch's output is still written,
    and counts (an upload is refused until it is deleted); the ended batch stops counting."""
    c = client(fast.a, GRACE)
    f = c.files.create(file=("in.jsonl", chat_lines(2)), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = poll(lambda: c.batches.retrieve(b.id), lambda x: x.status in ("completed", "failed"), 60, "ended")
    assert done.status == "completed" and done.output_file_id, done
    assert done.request_counts is not None and done.request_counts.completed == 2, done
    assert len(c.files.content(done.output_file_id).read().splitlines()) == 2
    c.files.delete(f.id)
    with pytest.raises(openai.RateLimitError) as caught:  # the output file counts
        c.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
    assert caught.value.code == "storage_quota_exceeded"
    c.files.delete(done.output_file_id)
    again = c.files.create(file=("in2.jsonl", chat_lines(1)), purpose="batch")
    c.batches.create(input_file_id=again.id, endpoint="/v1/chat/completions", completion_window="24h")
