"""A hostile backend's endless SSE event: bounded memory, linear CPU, one error event for the client."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.procs import Gateway
from tests.rawbackend import SSE_HEAD, RawBackend, chunk

ONE_EVENT = 200 * 1024 * 1024  # bytes of one event without a blank line
PIECE = 64 * 1024


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def endless_event(first: bytes) -> object:
    def on_post(conn: socket.socket) -> None:
        conn.sendall(SSE_HEAD + chunk(first + b'data: {"choices":[{"delta":{"content":"'))
        filler = chunk(b"x" * PIECE)
        for _ in range(ONE_EVENT // PIECE):
            conn.sendall(filler)  # raises once the gateway hangs up
        conn.sendall(b"0\r\n\r\n")

    return on_post


ROLE = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"tiny",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}'
)


@pytest.fixture(params=[b"\n\n", b"\r\n\r\n"], ids=["lf", "crlf"])
def hostile(request: pytest.FixtureRequest) -> Iterator[RawBackend]:
    b = RawBackend(endless_event(ROLE + request.param))  # type: ignore[arg-type]
    yield b
    b.stop()


def test_an_endless_event_ends_the_stream_with_one_error_and_bounded_memory(hostile: RawBackend) -> None:
    gw = Gateway([hostile.url], env={"GATEWAY_RESILIENCE__RETRY_ATTEMPTS": "0"})
    try:
        before = rss_bytes(gw.proc.pid)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with httpx.stream("POST", gw.v1 + "/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            raw = b"".join(r.iter_bytes())
        events = [e for e in raw.split(b"\n\n") if e]
        assert events[0] == ROLE  # what came before the endless event reached the client
        assert events[-1] == b"data: [DONE]"
        err = orjson.loads(events[-2].removeprefix(b"data: "))["error"]
        assert err == {
            "message": "The backend sent an SSE event longer than 8388608 bytes.",
            "type": "server_error",
            "param": None,
            "code": "upstream_event_too_large",
        }
        assert len(events) == 3
        grown = rss_bytes(gw.proc.pid) - before
        assert grown < 100 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB"
        assert httpx.get(gw.url + "/live", timeout=10).status_code == 200
    finally:
        gw.stop()


def test_the_limit_is_configurable() -> None:
    b = RawBackend(endless_event(ROLE + b"\n\n"))  # type: ignore[arg-type]
    gw = Gateway([b.url], env={"GATEWAY_STREAMING__MAX_EVENT_BYTES": str(128 * 1024)})
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with httpx.stream("POST", gw.v1 + "/chat/completions", json=body, timeout=60) as r:
            raw = b"".join(r.iter_bytes())
        err = orjson.loads(raw.split(b"\n\n")[-3].removeprefix(b"data: "))["error"]
        assert err["code"] == "upstream_event_too_large"
        assert err["message"] == "The backend sent an SSE event longer than 131072 bytes."
    finally:
        gw.stop()
        b.stop()
