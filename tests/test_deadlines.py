"""Deadlines belong to the wait they bound, and each attempt has its own first-byte deadline.

vLLM sends a plain (non-stream) response's headers only when generation has ended, so that
wait is the generation, bounded by the total deadline; a stream's first SSE event is bounded
by ``first_byte`` per attempt (Envoy's per-try timeout), counted after admission; nothing is
retried once the total deadline has passed, and the error names the deadline that fired.
"""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import yaml

from tests.procs import Gateway, Sim, until

MSG = [{"role": "user", "content": "tick"}]


def _chat(stream: bool, max_tokens: int = 50) -> dict[str, object]:
    return {"model": "tiny", "messages": MSG, "max_tokens": max_tokens, "stream": stream}


def _sse(gw: Gateway, body: dict[str, object], timeout: float = 30) -> list[bytes]:
    with httpx.stream("POST", gw.v1 + "/chat/completions", json=body, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        raw = b"".join(r.iter_raw())
    return [e for e in raw.split(b"\n\n") if e and e != b": keep-alive"]


def _error_of(events: list[bytes]) -> dict[str, object] | None:
    for e in events:
        if e.startswith(b'data: {"error"'):
            return orjson.loads(e[6:])["error"]  # type: ignore[no-any-return]
    return None


def _timeouts(first_byte: float, idle: float, total: float) -> dict[str, str]:
    return {
        "GATEWAY_TIMEOUTS__FIRST_BYTE": str(first_byte),
        "GATEWAY_TIMEOUTS__IDLE": str(idle),
        "GATEWAY_TIMEOUTS__TOTAL": str(total),
    }


def test_plain_request_longer_than_first_byte_succeeds_streamed_and_not() -> None:
    # 50 tokens at 0.1 s: 5 s of generation, far more than first_byte (2 s), far less than total.
    a = Sim(None, "--ttft", "0.05", "--itl", "0.1", "--output-tokens", "50")
    b = Sim(None, "--ttft", "0.05", "--itl", "0.1", "--output-tokens", "50")
    gw = Gateway([a.url, b.url], env=_timeouts(2, 5, 60))
    try:
        with ThreadPoolExecutor(2) as pool:
            plain = pool.submit(httpx.post, gw.v1 + "/chat/completions", json=_chat(False), timeout=30)
            streamed = pool.submit(_sse, gw, _chat(True))
            r = plain.result()
            events = streamed.result()
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 50
        assert _error_of(events) is None
        assert events[-1] == b"data: [DONE]"
        assert a.stats()["received"] + b.stats()["received"] == 2  # no retries
    finally:
        gw.stop()
        a.stop()
        b.stop()


def test_a_retry_gets_its_own_first_byte_deadline() -> None:
    hung = Sim(None, "--fault", "hang")
    good = Sim(None, "--ttft", "0.3", "--itl", "0.01")
    gw = Gateway([hung.url, good.url], env=_timeouts(1, 5, 60))
    try:
        # Ties between the two replicas go round-robin: within a few requests one is sent to
        # the hung replica first, times out after 1 s and is retried on the good one, whose
        # first token takes 0.3 s of its own fresh 1 s, not of what the first attempt left.
        for _ in range(4):
            events = _sse(gw, _chat(True, max_tokens=3))
            assert _error_of(events) is None, events
            assert events[-1] == b"data: [DONE]"
            if hung.stats()["received"]:
                break
        assert hung.stats()["received"] >= 1
    finally:
        gw.stop()
        hung.stop()
        good.stop()


def test_every_attempt_waits_its_full_first_byte_deadline_and_the_error_names_its_replica() -> None:
    a = Sim(None, "--fault", "hang")
    b = Sim(None, "--fault", "hang")
    gw = Gateway([a.url, b.url], env=_timeouts(1, 5, 60))
    try:
        r = httpx.post(gw.v1 + "/chat/completions", json=_chat(True, 2), timeout=30)
        assert r.status_code == 504
        err = r.json()["error"]
        assert err["code"] == "first_byte_timeout"
        # Both replicas were really tried (the retry did not inherit a spent deadline), and the
        # message names the replica whose wait ran out, with the setting that bounded it.
        assert a.stats()["received"] == 1
        assert b.stats()["received"] == 1
        assert f"Backend {r.headers['x-gateway-backend']} sent nothing" in err["message"]
        assert "(1s)" in err["message"]
    finally:
        gw.stop()
        a.stop()
        b.stop()


def test_time_queued_for_capacity_does_not_eat_the_first_byte_deadline(tmp_path: Path) -> None:
    sim = Sim(None, "--ttft", "0.05", "--itl", "0.1", "--output-tokens", "15")
    cfg = {
        "backends": [{"url": sim.url, "max_in_flight": 1}],
        "timeouts": {"first_byte": 1.0, "idle": 5.0, "total": 60.0},
    }
    path = tmp_path / "queued.yaml"
    path.write_text(yaml.safe_dump(cfg))
    gw = Gateway([], config=path)
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(_sse, gw, _chat(True, max_tokens=15))  # holds the only slot ~1.5 s
            until(lambda: sim.stats()["running"] == 1, what="first request running")
            second = pool.submit(_sse, gw, _chat(True, max_tokens=2))  # queued ~1.4 s, then fast
            for events in (first.result(), second.result()):
                assert _error_of(events) is None, events
                assert events[-1] == b"data: [DONE]"
    finally:
        gw.stop()
        sim.stop()


def test_total_deadline_is_named_and_never_retried() -> None:
    a = Sim(None, "--ttft", "3", "--itl", "0.01")
    b = Sim(None, "--ttft", "3", "--itl", "0.01")
    gw = Gateway([a.url, b.url], env={"GATEWAY_TIMEOUTS__TOTAL": "1"})
    try:
        r = httpx.post(gw.v1 + "/chat/completions", json=_chat(False, 2), timeout=30)
        assert r.status_code == 504
        err = r.json()["error"]
        assert err["code"] == "total_timeout"
        assert "1s" in err["message"]
        until(lambda: a.stats()["received"] + b.stats()["received"] >= 1, what="the attempt")
        assert a.stats()["received"] + b.stats()["received"] == 1
    finally:
        gw.stop()
        a.stop()
        b.stop()


def test_total_deadline_on_a_stream_is_named_and_never_retried() -> None:
    a = Sim(None, "--ttft", "3", "--itl", "0.01")
    b = Sim(None, "--ttft", "3", "--itl", "0.01")
    gw = Gateway([a.url, b.url], env={"GATEWAY_TIMEOUTS__TOTAL": "1"})
    try:
        # No token came, so no stream was promised: a JSON 504 that names the total deadline.
        r = httpx.post(gw.v1 + "/chat/completions", json=_chat(True, 2), timeout=30)
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "total_timeout"
        assert a.stats()["received"] + b.stats()["received"] == 1
    finally:
        gw.stop()
        a.stop()
        b.stop()


class StallingBackend:
    """A raw-socket 'vLLM' that is healthy, but answers a POST with its headers and part of the
    body, then stalls; records when the gateway closes such a stalled connection."""

    def __init__(self) -> None:
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(64)
        self.url = f"http://127.0.0.1:{self.srv.getsockname()[1]}"
        self.stalled = threading.Event()
        self.closed = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        self.srv.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.srv.accept()
            except OSError:
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        buf = b""
        try:
            while not self._stop.is_set():
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.split(b"\r\n")
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                method, path = lines[0].split(b" ")[:2]
                if method == b"POST":
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b"content-length: 1000\r\n\r\n" + b'{"id": "cmpl-1", '
                    )
                    self.stalled.set()
                    while conn.recv(65536):
                        pass  # until the gateway closes the connection
                    self.closed.set()
                    return
                body = b'{"data": [{"id": "tiny", "object": "model"}]}' if path == b"/v1/models" else b"{}"
                status = b"404 Not Found" if path == b"/metrics" else b"200 OK"
                conn.sendall(
                    b"HTTP/1.1 "
                    + status
                    + b"\r\ncontent-type: application/json\r\ncontent-length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
        except OSError:
            return
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self.srv.close()


def test_plain_response_cut_by_the_total_deadline_closes_the_upstream_connection() -> None:
    backend = StallingBackend()
    gw = Gateway([backend.url], env={"GATEWAY_TIMEOUTS__TOTAL": "1"})
    try:
        r = httpx.post(gw.v1 + "/chat/completions", json=_chat(False, 2), timeout=30)
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "total_timeout"
        assert backend.stalled.is_set()
        # A half-read response must never go back to the pool: the connection is closed.
        assert backend.closed.wait(5)
    finally:
        gw.stop()
        backend.stop()
