"""Single flight survives a failed filler (docs/cache.md, "Single flight"): when the request that
holds the lock does not produce a storable answer (its client left, its stream ended in an error
event, the backend failed), exactly one of its waiters takes the lock over and asks the backend;
the others wait for that one, within the bound they started with. When nobody's answer could be
stored (a 4xx, an answer over ``max_entry_bytes``) the waiters do not take turns.

Two gateway replicas share a Redis prefix and one backend (the simulator with a TTFT of 2 s, or a
scripted raw backend); the backend's count of requests says how many reached it.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from tests import rawbackend
from tests.jobs_helpers import ALICE, BOB, poll
from tests.procs import Gateway, Sim, until
from tests.test_cache import ask, cache_config, chat_body, received, redis_client

WAITERS = 10  # half on each replica


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Sim, Gateway, Gateway, str]]:
    """(simulator with a 2 s TTFT, replica A, replica B, the cache's key prefix)."""
    sim = Sim(None, "--ttft", "2", "--itl", "0.01")
    cfg = cache_config(tmp_path)
    prefix = str(yaml.safe_load(cfg.read_text())["cache"]["key_prefix"])
    a = b = None
    try:
        a = Gateway([sim.url], config=cfg)
        b = Gateway([sim.url], config=cfg)
        yield sim, a, b, prefix
    finally:
        for p in (a, b, sim):
            if p is not None:
                p.stop()


def in_flight(gw: Gateway) -> float:
    """Requests the replica is working on (``gateway_requests_in_flight``, all endpoints)."""
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("gateway_requests_in_flight{")
    )


def start_waiters(
    pool: ThreadPoolExecutor, a: Gateway, b: Gateway, body: dict[str, Any]
) -> list[Future[httpx.Response]]:
    """``WAITERS`` identical requests, alternately on A and B (BOB shares ALICE's team, so her
    entries), returned once every one of them is in flight on its replica beside the filler on A
    (their next step after reading the body is the cache's lookup, then the wait for the fill)."""
    waiters = [pool.submit(ask, (a, b)[i % 2], BOB, body) for i in range(WAITERS)]
    until(
        lambda: in_flight(a) == 1 + WAITERS // 2 and in_flight(b) == WAITERS // 2,
        "every waiter in flight",
        lambda: (in_flight(a), in_flight(b)),
    )
    return waiters


def lock_held(prefix: str) -> bool:
    r = redis_client("redis://127.0.0.1:6379/0")
    try:
        return bool([k for k in r.keys(prefix + "l:*") if not k.endswith(b":w")])
    finally:
        r.close()


def check_waiters(answers: list[httpx.Response]) -> None:
    """Every waiter answered 200 with the same content; one of them asked the backend (the
    handed-over filler: a miss), the others were served its answer (hits)."""
    assert [r.status_code for r in answers] == [200] * WAITERS, [r.text[:200] for r in answers]
    states = sorted(r.headers["x-gateway-cache"] for r in answers)
    assert states == ["hit"] * (WAITERS - 1) + ["miss"], states
    assert len({r.json()["choices"][0]["message"]["content"] for r in answers}) == 1


def test_a_filler_whose_client_left_hands_the_lock_to_one_waiter(
    pair: tuple[Sim, Gateway, Gateway, str],
) -> None:
    """The filler's client gives up before the backend answers (a client timeout, then a retry):
    the gateway cancels its upstream call, and the waiters on both replicas make one more upstream
    call between them, not one each (11 before the handoff)."""
    sim, a, b, prefix = pair
    body = chat_body(secrets.token_hex(4))
    before = received(sim)
    raw = orjson.dumps(body)
    filler = socket.create_connection(("127.0.0.1", a.port))
    try:
        filler.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
            + f"authorization: Bearer {ALICE}\r\ncontent-length: {len(raw)}\r\n\r\n".encode()
            + raw
        )
        poll(lambda: received(sim), lambda n: n == before + 1, 10, "the filler at the backend")
        assert lock_held(prefix)
        with ThreadPoolExecutor(WAITERS) as pool:
            waiters = start_waiters(pool, a, b, body)
            filler.close()  # the client gives up while the backend is still before its first token
            a.wait_log(lambda rec: rec.get("event") == "request" and rec.get("client_disconnected") is True)
            answers = [w.result(timeout=30) for w in waiters]
    finally:
        filler.close()
    assert received(sim) == before + 2  # the abandoned call and the handed-over one (11 before)
    check_waiters(answers)
    assert sim.stats()["aborted"], "the abandoned upstream call was cancelled, not left to run"


def test_a_filler_whose_stream_ends_in_an_error_event_hands_the_lock_over(
    pair: tuple[Sim, Gateway, Gateway, str],
) -> None:
    """The filler's stream ends with vLLM's mid-stream error event (not storable): one waiter
    asks the backend again, the others are served its answer."""
    sim, a, b, _ = pair
    body = chat_body(secrets.token_hex(4))
    before = received(sim)
    sim.control(fault="error-event:2")  # the gateway does not forward a client's x-sim-fault
    with ThreadPoolExecutor(WAITERS + 1) as pool:
        try:
            filler = pool.submit(ask, a, ALICE, {**body, "stream": True})
            poll(lambda: received(sim), lambda n: n == before + 1, 10, "the filler at the backend")
        finally:
            sim.control(fault="")  # only the filler's request fails
        waiters = start_waiters(pool, a, b, body)
        broken = filler.result(timeout=30)
        assert broken.status_code == 200 and b'"error"' in broken.content
        answers = [w.result(timeout=30) for w in waiters]
    assert received(sim) == before + 2  # the failed call and the handed-over one (11 before)
    check_waiters(answers)


def test_handoffs_stay_within_the_original_wait_bound(tmp_path: Path) -> None:
    """Every filler fails (the backend cuts each stream after its first token, 1.5 s in): the
    waiters take turns only until their own `single_flight_wait` (2 s here) is over, then ask the
    backend themselves — a chain of handoffs never makes a waiter wait longer than it would have."""
    sim = Sim(None, "--ttft", "1.5", "--itl", "0.01", "--fault", "drop:1")
    cfg = cache_config(tmp_path, single_flight_wait=2)
    a, b = Gateway([sim.url], config=cfg), Gateway([sim.url], config=cfg)
    try:
        body = chat_body(secrets.token_hex(4), stream=True)
        before = received(sim)
        with ThreadPoolExecutor(5) as pool:
            filler = pool.submit(ask, a, ALICE, body)
            poll(lambda: received(sim), lambda n: n == before + 1, 10, "the filler at the backend")
            started = time.monotonic()
            waiters = [pool.submit(ask, (a, b)[i % 2], BOB, body) for i in range(4)]
            # 1.5 s in, the filler fails and one waiter takes over; 2 s in the other three stop
            # waiting and ask too. Taking turns instead would be 1.5 s each: the last one at 6 s.
            poll(lambda: received(sim), lambda n: n == before + 5, 4.5, "every waiter at the backend")
            assert time.monotonic() - started < 4.5
            for r in [filler.result(timeout=30), *(w.result(timeout=30) for w in waiters)]:
                assert r.status_code == 200 and b'"error"' in r.content  # the drop, relayed
    finally:
        for p in (a, b, sim):
            p.stop()


ANSWER = {
    "id": "chatcmpl-big",
    "object": "chat.completion",
    "created": 1,
    "model": "tiny",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "word " * 40}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},  # within max_tokens
}
REFUSAL = {
    "error": {"message": "max_tokens is too large", "type": "BadRequestError", "param": None, "code": 400}
}


@pytest.mark.parametrize(("status", "answer"), [(400, REFUSAL), (200, ANSWER)], ids=["refused", "too-large"])
def test_an_answer_nobody_could_store_is_not_handed_over(
    tmp_path: Path, status: int, answer: dict[str, Any]
) -> None:
    """The backend refuses the request itself (a 4xx), or answers more than `max_entry_bytes`:
    whoever asks gets the same, not stored either. The waiters all ask at once when the filler's
    answer comes back instead of taking turns (each answer takes the backend 0.6 s here: ten
    turns would be 6 s), and each gets the backend's answer."""
    release = threading.Event()

    def backend_answer(conn: socket.socket) -> None:
        if not release.is_set():  # the filler's: held until the waiters are all waiting
            release.wait(20)
        time.sleep(0.6)
        rawbackend.answer(conn, status, orjson.dumps(answer))

    backend = rawbackend.RawBackend(backend_answer)
    cfg = cache_config(tmp_path, max_entry_bytes=100)  # the 200 answer is ~400 bytes
    a = b = None
    try:
        a, b = Gateway([backend.url], config=cfg), Gateway([backend.url], config=cfg)
        body = chat_body(secrets.token_hex(4))
        with ThreadPoolExecutor(WAITERS + 1) as pool:
            filler = pool.submit(ask, a, ALICE, body)
            until(lambda: backend.posts == 1, "the filler at the backend")
            waiters = start_waiters(pool, a, b, body)
            release.set()
            assert filler.result(timeout=30).status_code == status
            answered = time.monotonic()
            until(
                lambda: backend.posts == 1 + WAITERS, "every waiter at the backend", lambda: backend.posts, 10
            )
            assert time.monotonic() - answered < 3.0, "the waiters took turns"
            answers = [w.result(timeout=30) for w in waiters]
        assert [r.status_code for r in answers] == [status] * WAITERS
        assert [r.headers["x-gateway-cache"] for r in answers] == ["miss"] * WAITERS
        if status == 200:
            assert all(r.json()["choices"] == answer["choices"] for r in answers)
        else:
            assert {r.json()["error"]["message"] for r in answers} == {"max_tokens is too large"}
    finally:
        for p in (a, b):
            if p is not None:
                p.stop()
        backend.stop()
