"""SIGTERM: /ready turns 503 at once, new requests get 503, streams in flight finish, then exit."""

from __future__ import annotations

import signal
import threading
import time

import httpx

from tests.procs import Gateway, Sim

BODY = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "drain me"}],
    "max_tokens": 30,
    "stream": True,
}


def wait_draining(gw: Gateway, timeout: float = 5) -> httpx.Response:
    """/ready once it answers 503 (the signal is handled on the gateway's event loop)."""
    deadline = time.monotonic() + timeout
    while True:
        ready = httpx.get(gw.url + "/ready", timeout=5)
        if ready.status_code == 503 or time.monotonic() > deadline:
            assert ready.status_code == 503, ready.text
            return ready
        time.sleep(0.02)


def test_sigterm_drains_streams_then_exits() -> None:
    sim = Sim(None, "--ttft", "0.05", "--itl", "0.05", "--output-tokens", "30")  # ~1.5 s streams
    gw = Gateway([sim.url], env={"GATEWAY_SERVER__DRAIN_SECONDS": "20"})
    results: list[bytes] = []
    started = threading.Semaphore(0)

    def stream() -> None:
        with httpx.stream("POST", gw.v1 + "/chat/completions", json=BODY, timeout=30) as r:
            it = r.iter_raw()
            first = next(it)
            started.release()  # this stream is under way: its first event arrived
            results.append(first + b"".join(it))

    try:
        threads = [threading.Thread(target=stream) for _ in range(3)]
        for t in threads:
            t.start()
        for _ in threads:
            assert started.acquire(timeout=10), "a stream did not start"
        gw.proc.proc.send_signal(signal.SIGTERM)
        ready = wait_draining(gw)
        assert ready.json()["status"] == "draining"
        refused = httpx.post(gw.v1 + "/chat/completions", json={**BODY, "stream": False}, timeout=5)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "shutting_down"
        assert int(refused.headers["retry-after"]) >= 1
        for t in threads:
            t.join(30)
        assert len(results) == 3
        for body in results:
            assert body.endswith(b"data: [DONE]\n\n")
            assert b'"error"' not in body
        gw.proc.proc.wait(15)  # exits by itself once the streams are done
        assert gw.proc.proc.returncode == 0
        assert "drain finished" in gw.proc.output()
        assert sim.stats()["aborted"] == []  # no stream was cut upstream either
    finally:
        gw.stop()
        sim.stop()


def test_drain_timeout_bounds_shutdown() -> None:
    sim = Sim(None, "--ttft", "0.01", "--itl", "0.5", "--output-tokens", "100")  # a 50 s stream
    gw = Gateway([sim.url], env={"GATEWAY_SERVER__DRAIN_SECONDS": "1"})
    try:
        with httpx.stream(
            "POST", gw.v1 + "/chat/completions", json={**BODY, "max_tokens": 100}, timeout=30
        ) as r:
            it = r.iter_raw()
            next(it)
            started = time.monotonic()
            gw.proc.proc.send_signal(signal.SIGTERM)
            gw.proc.proc.wait(15)
            assert time.monotonic() - started < 10
    finally:
        gw.stop()
        sim.stop()
