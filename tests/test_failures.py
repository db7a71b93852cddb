"""Backend failures, timeouts, heartbeats and client disconnects, against real processes."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest

from tests.procs import Gateway, Sim

MSG = [{"role": "user", "content": "one two three"}]
BODY = {"model": "tiny", "messages": MSG, "max_tokens": 8}


@pytest.fixture(scope="module")
def fsim() -> Iterator[Sim]:
    s = Sim(None, "--ttft", "0.01", "--itl", "0.01")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def fgw(fsim: Sim) -> Iterator[Gateway]:
    g = Gateway(
        [fsim.url],
        env={
            "GATEWAY_TIMEOUTS__FIRST_BYTE": "1.5",
            "GATEWAY_TIMEOUTS__IDLE": "0.5",
            "GATEWAY_STREAMING__HEARTBEAT_INTERVAL": "0.2",
            # These tests fail the one backend on purpose; its breaker must not open meanwhile
            # (tests/test_resilience.py covers the breaker).
            "GATEWAY_RESILIENCE__BREAKER_FAIL_MAX": "1000",
        },
    )
    yield g
    g.stop()


@pytest.fixture
def fault(fsim: Sim) -> Iterator[object]:
    def set_fault(value: str, **more: object) -> None:
        fsim.control(fault=value, **more)

    yield set_fault
    fsim.control(fault="", ttft=0.01)


def sse_events(gw: Gateway, body: dict[str, object]) -> list[bytes]:
    with httpx.stream("POST", gw.v1 + "/chat/completions", json={**body, "stream": True}, timeout=10) as r:
        assert r.status_code == 200
        raw = b"".join(r.iter_raw())
    return [e for e in raw.split(b"\n\n") if e]


def assert_ends_with_error(events: list[bytes], code: str) -> dict[str, object]:
    assert events[-1] == b"data: [DONE]"
    assert events[-2].startswith(b"data: {")
    err = orjson.loads(events[-2][6:])["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code
    return err  # type: ignore[no-any-return]


def test_backend_500_becomes_502_with_its_message(fgw: Gateway, fault: object) -> None:
    fault("error")  # type: ignore[operator]
    c = openai.OpenAI(base_url=fgw.v1, api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        c.chat.completions.create(model="tiny", messages=MSG)  # type: ignore[arg-type]
    assert info.value.status_code == 502
    assert "Simulated engine failure" in str(info.value)


def test_backend_503_on_stream_request_is_json_not_sse(fgw: Gateway, fault: object) -> None:
    fault("status:503")  # type: ignore[operator]
    r = httpx.post(fgw.v1 + "/chat/completions", json={**BODY, "stream": True})
    # vLLM's 503 (overloaded, starting) is passed on as a 503 with Retry-After: retrying helps.
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/json"
    assert r.headers["retry-after"]
    assert r.json()["error"]["type"] == "server_error"
    assert "Simulated engine failure" in r.json()["error"]["message"]


def test_mid_stream_drop_ends_with_error_event_and_done(fgw: Gateway, fault: object) -> None:
    fault("drop:3")  # type: ignore[operator]
    events = sse_events(fgw, BODY)
    assert len(events) >= 4  # role chunk and three tokens made it through
    err = assert_ends_with_error(events, "upstream_error")
    assert err["message"] == "The backend closed the connection before finishing its response."


def test_mid_stream_drop_raises_in_the_sdk(fgw: Gateway, fault: object) -> None:
    fault("drop:2")  # type: ignore[operator]
    c = openai.OpenAI(base_url=fgw.v1, api_key="x", max_retries=0)
    stream = c.chat.completions.create(model="tiny", messages=MSG, stream=True)  # type: ignore[arg-type]
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


def test_upstream_error_event_is_forwarded_once(fgw: Gateway, fault: object) -> None:
    fault("error-event:2")  # type: ignore[operator]
    events = sse_events(fgw, BODY)
    assert events[-1] == b"data: [DONE]"
    assert events.count(b"data: [DONE]") == 1
    assert b"Simulated engine error mid-stream" in events[-2]


def test_first_token_timeout_on_stream_sends_heartbeats_then_error(fgw: Gateway, fault: object) -> None:
    fault("", ttft=5.0)  # type: ignore[operator]
    events = sse_events(fgw, BODY)
    assert events.count(b": keep-alive") >= 3
    assert_ends_with_error(events, "first_byte_timeout")


def test_heartbeats_while_waiting_then_normal_stream(fgw: Gateway, fault: object) -> None:
    fault("", ttft=0.7)  # type: ignore[operator]
    events = sse_events(fgw, BODY)
    assert events[0] == b": keep-alive"
    assert events[-1] == b"data: [DONE]"
    assert not any(b'"error"' in e for e in events)
    # The SDK skips SSE comments: heartbeats are invisible to applications.
    c = openai.OpenAI(base_url=fgw.v1, api_key="x", max_retries=0)
    chunks = list(c.chat.completions.create(model="tiny", messages=MSG, max_tokens=3, stream=True))  # type: ignore[arg-type]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == " one two three"


def test_idle_timeout_mid_stream(fgw: Gateway, fault: object) -> None:
    fault("hang-after:2")  # type: ignore[operator]
    started = time.monotonic()
    events = sse_events(fgw, BODY)
    assert time.monotonic() - started < 5
    assert_ends_with_error(events, "idle_timeout")


def test_plain_request_hang_is_504_at_the_total_deadline(fsim: Sim, fault: object) -> None:
    # vLLM sends a plain response's headers only when generation ends: the wait is bounded by
    # the total deadline, not the first-byte one.
    fault("hang")  # type: ignore[operator]
    gw = Gateway([fsim.url], env={"GATEWAY_TIMEOUTS__FIRST_BYTE": "0.5", "GATEWAY_TIMEOUTS__TOTAL": "1.5"})
    try:
        c = openai.OpenAI(base_url=gw.v1, api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            c.chat.completions.create(model="tiny", messages=MSG)  # type: ignore[arg-type]
        assert info.value.status_code == 504
        assert info.value.body["code"] == "total_timeout"  # type: ignore[index]
    finally:
        gw.stop()


def test_total_timeout() -> None:
    sim = Sim(None, "--ttft", "0.01", "--itl", "0.2", "--output-tokens", "50")
    gw = Gateway([sim.url], env={"GATEWAY_TIMEOUTS__TOTAL": "1"})
    try:
        events = sse_events(gw, BODY | {"max_tokens": 50})
        assert_ends_with_error(events, "total_timeout")
        r = httpx.post(gw.v1 + "/chat/completions", json=BODY | {"max_tokens": 50}, timeout=10)
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "total_timeout"
    finally:
        gw.stop()
        sim.stop()


def test_client_disconnect_aborts_generation_upstream(fgw: Gateway, fsim: Sim, fault: object) -> None:
    fault("", itl=0.05)  # type: ignore[operator]
    try:
        rid = f"disconnect-{time.time_ns()}"
        with httpx.stream(
            "POST",
            fgw.v1 + "/chat/completions",
            json={**BODY, "max_tokens": 200, "stream": True},
            headers={"X-Request-Id": rid},
            timeout=10,
        ) as r:
            it = r.iter_raw()
            next(it)
            next(it)
        # Closing the client's stream must reach vLLM (here: the simulator) promptly.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if any(a.startswith(rid) for a in fsim.stats()["aborted"]):
                break
            time.sleep(0.05)
        assert any(a.startswith(rid) for a in fsim.stats()["aborted"])
        metrics = httpx.get(fsim.url + "/metrics").text
        assert 'finished_reason="abort"' in metrics
    finally:
        fsim.control(itl=0.01)


def test_client_disconnect_during_plain_request_aborts_too(fgw: Gateway, fsim: Sim, fault: object) -> None:
    fault("", ttft=1.0)  # type: ignore[operator]
    rid = f"plain-disconnect-{time.time_ns()}"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(fgw.v1 + "/chat/completions", json=BODY, headers={"X-Request-Id": rid}, timeout=0.3)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not any(a.startswith(rid) for a in fsim.stats()["aborted"]):
        time.sleep(0.05)
    assert any(a.startswith(rid) for a in fsim.stats()["aborted"])
    # The audit line is written after the abort, and reaches the output in the next 50 ms batch.
    assert fgw.wait_audit(rid)["client_disconnected"] is True


def test_backend_refusing_connections_is_503_with_retry_after() -> None:
    sim = Sim(None)
    gw = Gateway([sim.url])
    try:
        sim.proc.kill()
        r = httpx.post(gw.v1 + "/chat/completions", json=BODY, timeout=10)
        assert r.status_code == 503
        assert "retry-after" in r.headers
        assert r.json()["error"]["type"] == "server_error"
    finally:
        gw.stop()
        sim.stop()


def test_backend_that_closes_without_answering_is_clean_error() -> None:
    # A listener that reads the request and closes without answering: no HTTP at all. Reading
    # first makes the close a FIN; closing with the request unread would make the kernel send a
    # reset instead, or not, depending on whether the request had arrived yet.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    port = srv.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                with conn:
                    conn.settimeout(2)
                    conn.recv(65536)
            except OSError:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    gw = Gateway(
        [f"http://127.0.0.1:{port}"], wait_ready=False, env={"GATEWAY_ADMISSION__COLD_START_WAIT": "0.5"}
    )
    try:
        # Never healthy, so still "loading": the request waits for the cold start, then gives up.
        r = httpx.post(gw.v1 + "/chat/completions", json=BODY, timeout=10)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "queue_timeout"
        assert r.headers["retry-after"]
        ready = httpx.get(gw.url + "/ready")
        assert ready.status_code == 503
        reason = str(ready.json()["reason"])
        assert "closed the connection" in reason, reason
    finally:
        gw.stop()
        stop.set()
        t.join()
        srv.close()
