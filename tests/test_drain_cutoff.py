"""SIGTERM with requests still running when ``server.drain_seconds`` ends: the gateway itself
ends each of them cleanly and the process exits 0.

* a request whose response has not started gets 503 ``shutting_down`` in OpenAI's shape with
  Retry-After (the client retries on another replica): waiting on vLLM, waiting in the
  admission queue, or still sending its body;
* a started stream ends with one final SSE error event (``shutting_down``) and ``data: [DONE]``;
* vLLM's connection is closed (it aborts the generation), the audit line records the real
  status and reason (``shed``, fault ``gateway``), and nothing is logged as an exception.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml

from tests.procs import Gateway, Sim, until
from tests.test_limits import REDIS_DB, REDIS_HOST, REDIS_PORT, SECRET, require_redis, token

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "cut me off"}], "max_tokens": 100}
SLOW = ("--ttft", "0.01", "--itl", "0.5", "--output-tokens", "100")  # a 50 s generation


def stop_and_wait(gw: Gateway) -> None:
    """SIGTERM, then the process's own exit (status 0) with nothing logged as an exception."""
    gw.proc.proc.send_signal(signal.SIGTERM)
    gw.proc.proc.wait(30)
    out = gw.proc.output()
    assert gw.proc.proc.returncode == 0, out[-3000:]
    assert "Exception in ASGI application" not in out
    assert "Traceback" not in out
    assert "ASGI callable returned" not in out
    assert "timeout graceful shutdown exceeded" not in out


def assert_shed(audit: dict[str, Any], status: int) -> None:
    assert audit["status"] == status
    assert audit["error_reason"] == "shed"
    assert audit["fault"] == "gateway"
    assert audit["client_disconnected"] is False


def assert_shutting_down(resp: httpx.Response) -> None:
    assert resp.status_code == 503, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["retry-after"] == "1"  # the drain is over: retry elsewhere at once
    assert resp.json() == {
        "error": {
            "message": "This gateway is shutting down; retry on another replica.",
            "type": "server_error",
            "param": None,
            "code": "shutting_down",
        }
    }


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    return t, out


def test_a_plain_request_still_waiting_on_vllm_gets_503_shutting_down() -> None:
    sim = Sim(None, *SLOW)
    gw = Gateway([sim.url], env={"GATEWAY_SERVER__DRAIN_SECONDS": "1"})
    rid = f"cut-plain-{time.time_ns()}"
    try:
        t, out = in_thread(
            lambda: httpx.post(
                gw.v1 + "/chat/completions", json=CHAT, headers={"x-request-id": rid}, timeout=60
            )
        )
        until(lambda: sim.stats()["running"] == 1, "the request reached vLLM")
        stop_and_wait(gw)
        t.join(10)
        assert_shutting_down(out[0])
        assert out[0].headers["x-request-id"] == rid
        assert_shed(gw.wait_audit(rid), 503)
        until(lambda: any(a.startswith(rid) for a in sim.stats()["aborted"]), "vLLM aborted it")
    finally:
        gw.stop()
        sim.stop()


def _stream(gw: Gateway, path: str, body: dict[str, Any], rid: str, started: threading.Event) -> bytes:
    with httpx.stream(
        "POST", gw.v1 + path, json={**body, "stream": True}, headers={"x-request-id": rid}, timeout=60
    ) as r:
        assert r.status_code == 200
        it = r.iter_raw()
        first = next(it)
        started.set()
        return first + b"".join(it)


def _assert_cut_stream(raw: bytes) -> None:
    """Whole events, the last one the gateway's shutting_down error, then [DONE]."""
    assert raw.endswith(b"\n\ndata: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    assert all(e.startswith(b"data: ") for e in events[:-1])
    last = orjson.loads(events[-3][len(b"data: ") :])
    assert last == {
        "error": {
            "message": "This gateway is shutting down; retry on another replica.",
            "type": "server_error",
            "param": None,
            "code": "shutting_down",
        }
    }
    assert sum(b'"error"' in e for e in events) == 1
    assert len(events) > 3  # tokens were relayed before the cut


def test_a_started_stream_ends_with_a_shutting_down_event_and_done() -> None:
    sim = Sim(None, *SLOW)
    gw = Gateway([sim.url], env={"GATEWAY_SERVER__DRAIN_SECONDS": "1"})
    rid = f"cut-stream-{time.time_ns()}"
    started = threading.Event()
    try:
        t, out = in_thread(lambda: _stream(gw, "/chat/completions", CHAT, rid, started))
        assert started.wait(10)
        stop_and_wait(gw)
        t.join(10)
        _assert_cut_stream(out[0])
        assert_shed(gw.wait_audit(rid), 200)
        until(lambda: any(a.startswith(rid) for a in sim.stats()["aborted"]), "vLLM aborted it")
    finally:
        gw.stop()
        sim.stop()


def test_a_started_completions_stream_is_cut_the_same_way() -> None:
    sim = Sim(None, *SLOW)
    gw = Gateway([sim.url], env={"GATEWAY_SERVER__DRAIN_SECONDS": "1"})
    rid = f"cut-completions-{time.time_ns()}"
    started = threading.Event()
    body = {"model": "tiny", "prompt": "cut me off", "max_tokens": 100}
    try:
        t, out = in_thread(lambda: _stream(gw, "/completions", body, rid, started))
        assert started.wait(10)
        stop_and_wait(gw)
        t.join(10)
        _assert_cut_stream(out[0])
        assert_shed(gw.wait_audit(rid), 200)
        until(lambda: any(a.startswith(rid) for a in sim.stats()["aborted"]), "vLLM aborted it")
    finally:
        gw.stop()
        sim.stop()


def test_a_request_queued_for_admission_gets_503_shutting_down(tmp_path: Path) -> None:
    # One slot (max_in_flight 1, vLLM's --max-num-seqs 1): the second request waits in the
    # gateway's admission queue and never reaches vLLM before the cut.
    sim = Sim(None, *SLOW, "--max-num-seqs", "1")
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml.safe_dump({"backends": [{"url": sim.url, "max_in_flight": 1}]}))
    gw = Gateway([], config=cfg, env={"GATEWAY_SERVER__DRAIN_SECONDS": "1"})
    first, queued = f"cut-first-{time.time_ns()}", f"cut-queued-{time.time_ns()}"
    try:
        t1, out1 = in_thread(
            lambda: httpx.post(
                gw.v1 + "/chat/completions", json=CHAT, headers={"x-request-id": first}, timeout=60
            )
        )
        until(lambda: sim.stats()["running"] == 1, "the first request reached vLLM")
        t2, out2 = in_thread(
            lambda: httpx.post(
                gw.v1 + "/chat/completions", json=CHAT, headers={"x-request-id": queued}, timeout=60
            )
        )
        until(lambda: _queued(gw) == 1, "the second request is queued")
        stop_and_wait(gw)
        t1.join(10)
        t2.join(10)
        assert_shutting_down(out1[0])
        assert_shutting_down(out2[0])
        assert_shed(gw.wait_audit(first), 503)
        assert_shed(gw.wait_audit(queued), 503)
        assert sim.stats()["received"] == 1  # the queued one never reached vLLM
    finally:
        gw.stop()
        sim.stop()


def _queued(gw: Gateway) -> float:
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("gateway_queue_depth"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_client_stalled_while_sending_its_body_does_not_hold_the_drain() -> None:
    sim = Sim(None)
    gw = Gateway(
        [sim.url],
        env={"GATEWAY_SERVER__DRAIN_SECONDS": "1", "GATEWAY_SERVER__BODY_TIMEOUT": "300"},
    )
    rid = f"cut-body-{time.time_ns()}"
    body = orjson.dumps(CHAT)
    sock = socket.create_connection(("127.0.0.1", gw.port))
    try:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            + f"x-request-id: {rid}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )  # and then nothing more
        until(lambda: _in_flight(gw) == 1, "the gateway is reading the body")
        stop_and_wait(gw)
        sock.settimeout(10)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
        head, _, payload = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ")
        headers = dict(line.split(b": ", 1) for line in head.lower().split(b"\r\n")[1:] if b": " in line)
        assert headers[b"retry-after"] == b"1"
        assert orjson.loads(payload)["error"]["code"] == "shutting_down"
        assert_shed(gw.wait_audit(rid), 503)
        assert sim.stats()["received"] == 0
    finally:
        sock.close()
        gw.stop()
        sim.stop()


def _in_flight(gw: Gateway) -> float:
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("gateway_requests_in_flight{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_second_sigterm_ends_the_drain_at_once_and_cuts_cleanly() -> None:
    sim = Sim(None, *SLOW)
    gw = Gateway([sim.url], env={"GATEWAY_SERVER__DRAIN_SECONDS": "600"})
    rid, plain = f"cut-second-{time.time_ns()}", f"cut-second-plain-{time.time_ns()}"
    started = threading.Event()
    try:
        t, out = in_thread(lambda: _stream(gw, "/chat/completions", CHAT, rid, started))
        assert started.wait(10)
        t2, out2 = in_thread(
            lambda: httpx.post(
                gw.v1 + "/chat/completions", json=CHAT, headers={"x-request-id": plain}, timeout=60
            )
        )
        until(lambda: sim.stats()["running"] == 2, "both requests reached vLLM")
        gw.proc.proc.send_signal(signal.SIGTERM)
        until(lambda: httpx.get(gw.url + "/ready", timeout=5).status_code == 503, "draining")
        stop_and_wait(gw)  # the second signal
        t.join(10)
        t2.join(10)
        _assert_cut_stream(out[0])
        assert_shutting_down(out2[0])  # Retry-After 1, not the rest of a 600 s drain
        assert_shed(gw.wait_audit(rid), 200)
        assert_shed(gw.wait_audit(plain), 503)
        until(lambda: any(a.startswith(rid) for a in sim.stats()["aborted"]), "vLLM aborted it")
    finally:
        gw.stop()
        sim.stop()


def test_the_cut_frees_the_limit_lease_in_shared_storage(tmp_path: Path) -> None:
    """A subject allowed one request at a time (Redis) can use another gateway at once after the
    cut: the lease of the cut request was released, not left to expire."""
    require_redis()
    sim = Sim(None, *SLOW)
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "auth": {"jwt": {"algorithms": ["HS256"], "secret": SECRET}},
                "rate_limits": {"storage": f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"},
                "tiers": {"one": {"requests_per_minute": 1000, "max_concurrent": 1}},
                "timeouts": {"total": 600},  # a lease left behind would hold the slot for minutes
            }
        )
    )
    env = {"GATEWAY_SERVER__DRAIN_SECONDS": "1"}
    first, other = Gateway([sim.url], config=cfg, env=env), Gateway([sim.url], config=cfg, env=env)
    auth = {"authorization": f"Bearer {token(f'drain-cut-{time.time_ns()}', 'one')}"}
    rid = f"cut-lease-{time.time_ns()}"
    started = threading.Event()

    def stream() -> bytes:
        with httpx.stream(
            "POST",
            first.v1 + "/chat/completions",
            json={**CHAT, "stream": True},
            headers={**auth, "x-request-id": rid},
            timeout=60,
        ) as r:
            assert r.status_code == 200
            it = r.iter_raw()
            head = next(it)
            started.set()
            return head + b"".join(it)

    try:
        t, out = in_thread(stream)
        assert started.wait(10)
        busy = httpx.post(
            other.v1 + "/chat/completions", json={**CHAT, "max_tokens": 1}, headers=auth, timeout=10
        )
        assert busy.status_code == 429  # the one slot is taken
        stop_and_wait(first)
        t.join(10)
        _assert_cut_stream(out[0])
        assert_shed(first.wait_audit(rid), 200)
        ok = httpx.post(
            other.v1 + "/chat/completions", json={**CHAT, "max_tokens": 1}, headers=auth, timeout=10
        )
        assert ok.status_code == 200, ok.text
    finally:
        first.stop()
        other.stop()
        sim.stop()
