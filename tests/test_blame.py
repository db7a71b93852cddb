"""The client's slowness is never the backend's fault; only the backend's failures count against it.

A client that stops reading a stream blocks the gateway's writes: that time is not backend
silence, the total deadline still frees the slot, the client is blamed (``client_slow``) and
the replica's breaker stays closed. Likewise a client disconnect and the request's own total
deadline (a long, legitimate generation) never count; backend silence does.
"""

from __future__ import annotations

import re
import socket
import time

import httpx
import orjson
import pytest

from tests.procs import Gateway, Sim, until

MSG = [{"role": "user", "content": "slow reader"}]


def _breaker(gw: Gateway, sim: Sim) -> str:
    backends = httpx.get(gw.url + "/health", timeout=5).json()["backends"]
    return str(next(b["breaker"] for b in backends if b["url"] == sim.url))


def _circuit_state(gw: Gateway) -> dict[str, float]:
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    pattern = r'^gateway_backend_circuit_state\{[^}]*state="([^"]+)"[^}]*\} (\S+)'
    return {state: float(v) for state, v in re.findall(pattern, text, re.M)}


def _pool_in_flight(gw: Gateway) -> float:
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    m = re.search(r'^gateway_pool_in_flight\{model="tiny"\} (\S+)', text, re.M)
    return float(m[1]) if m else 0.0


def _audit(gw: Gateway, rid: str) -> dict[str, object] | None:
    for line in gw.log_lines():
        if line.startswith("{"):
            entry = orjson.loads(line)
            if entry.get("event") == "request" and entry.get("request_id") == rid:
                return entry  # type: ignore[no-any-return]
    return None


def _stalled_stream_client(gw: Gateway, rid: str) -> socket.socket:
    """A client that sends a streaming request and then never reads (tiny receive buffer)."""
    body = orjson.dumps({"model": "tiny", "messages": MSG, "max_tokens": 20000, "n": 4, "stream": True})
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", gw.port))
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        + f"x-request-id: {rid}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return s


def _big_sim() -> Sim:
    # Tokens as fast as the connection takes them: megabytes, far more than the socket buffers.
    return Sim(None, "--ttft", "0.01", "--itl", "0", "--output-tokens", "20000", "--max-model-len", "100000")


@pytest.mark.parametrize(
    ("client_write", "total"),
    [(None, "4"), ("1", "60")],
    ids=["blocked-until-the-total-deadline", "blocked-past-the-write-timeout"],
)
def test_a_client_that_stops_reading_is_blamed_not_the_backend(client_write: str | None, total: str) -> None:
    sim = _big_sim()
    gw = Gateway(
        [sim.url],
        env={
            "GATEWAY_TIMEOUTS__IDLE": "1",
            "GATEWAY_TIMEOUTS__TOTAL": total,
            "GATEWAY_RESILIENCE__BREAKER_FAIL_MAX": "1",
            **({"GATEWAY_TIMEOUTS__CLIENT_WRITE": client_write} if client_write else {}),
        },
    )
    rid = f"slow-reader-{time.time_ns()}"
    client = _stalled_stream_client(gw, rid)
    try:
        until(lambda: sim.stats()["received"] == 1, what="request reached the backend")
        # The slot is freed (by the write timeout or, at the latest, the total deadline) even
        # though the client holds its connection open and reads nothing.
        until(lambda: _pool_in_flight(gw) == 0, timeout=20, what="slot freed")
        until(lambda: _audit(gw, rid) is not None, what="audit line")
        audit = _audit(gw, rid)
        assert audit is not None
        assert audit["error_reason"] == "client_slow"
        assert audit["client_disconnected"] is False
        assert _breaker(gw, sim) == "closed"
        assert _circuit_state(gw) == {"closed": 1.0, "open": 0.0, "half-open": 0.0}
        # The upstream connection was closed: vLLM aborted the generation.
        until(lambda: any(a.startswith(rid) for a in sim.stats()["aborted"]), what="generation aborted")
        assert not any("upstream failure" in line for line in gw.log_lines())
    finally:
        client.close()
        gw.stop()
        sim.stop()


def test_the_total_deadline_of_a_long_generation_does_not_count() -> None:
    sim = Sim(None, "--ttft", "0.01", "--itl", "0.2", "--output-tokens", "50")
    gw = Gateway(
        [sim.url],
        env={"GATEWAY_TIMEOUTS__TOTAL": "1", "GATEWAY_RESILIENCE__BREAKER_FAIL_MAX": "1"},
    )
    try:
        body = {"model": "tiny", "messages": MSG, "max_tokens": 50}
        r = httpx.post(gw.v1 + "/chat/completions", json=body, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "total_timeout"
        with httpx.stream(
            "POST", gw.v1 + "/chat/completions", json={**body, "stream": True}, timeout=30
        ) as s:
            raw = b"".join(s.iter_raw())
        assert b'"code":"total_timeout"' in raw
        assert _breaker(gw, sim) == "closed"
    finally:
        gw.stop()
        sim.stop()


def test_a_client_disconnect_does_not_count() -> None:
    sim = Sim(None, "--ttft", "0.01", "--itl", "0.05", "--output-tokens", "200")
    gw = Gateway([sim.url], env={"GATEWAY_RESILIENCE__BREAKER_FAIL_MAX": "1"})
    try:
        rid = f"gone-{time.time_ns()}"
        body = {"model": "tiny", "messages": MSG, "max_tokens": 200, "stream": True}
        with httpx.stream(
            "POST", gw.v1 + "/chat/completions", json=body, headers={"x-request-id": rid}, timeout=30
        ) as r:
            it = r.iter_raw()
            next(it)
            next(it)
        until(lambda: _audit(gw, rid) is not None, what="audit line")
        assert _breaker(gw, sim) == "closed"
    finally:
        gw.stop()
        sim.stop()


def test_backend_silence_mid_stream_does_count() -> None:
    sim = Sim(None, "--ttft", "0.01", "--itl", "0.01", "--fault", "hang-after:2")
    gw = Gateway(
        [sim.url], env={"GATEWAY_TIMEOUTS__IDLE": "0.5", "GATEWAY_RESILIENCE__BREAKER_FAIL_MAX": "1"}
    )
    try:
        body = {"model": "tiny", "messages": MSG, "max_tokens": 8, "stream": True}
        with httpx.stream("POST", gw.v1 + "/chat/completions", json=body, timeout=30) as r:
            raw = b"".join(r.iter_raw())
        assert b'"code":"idle_timeout"' in raw
        assert _breaker(gw, sim) != "closed"
    finally:
        gw.stop()
        sim.stop()
