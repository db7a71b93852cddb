"""HTTP/1.1 pipelining: a client that sends requests back to back without reading the answers
cannot make the gateway hold them all (one read can carry thousands of small requests), while
a modest pipeline is still answered in order. Also: two Host headers are a 400 (RFC 9112 §3.2)
in no-auth loopback mode, whatever their order."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.procs import Gateway, Sim
from tests.security.test_listener_limits import read_until_closed, rss_bytes

REQUEST = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture(scope="module")
def gw() -> Iterator[Gateway]:
    sim = Sim(None)
    g = Gateway([sim.url])
    yield g
    g.stop()
    sim.stop()


def test_a_pipeline_flood_is_cut_off_with_bounded_memory(gw: Gateway) -> None:
    before = rss_bytes(gw.proc.pid)
    flood = REQUEST * (8 * 1024 * 1024 // len(REQUEST))  # 8 MB of requests, never read
    s = socket.create_connection(("127.0.0.1", gw.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    closed = False
    try:
        s.sendall(flood)
    except (ConnectionResetError, BrokenPipeError):
        closed = True  # the gateway dropped the connection while we were still sending
    except TimeoutError:
        pass  # it stopped reading but kept the connection: below, it must close it
    if not closed:
        _, closed = read_until_closed(s, 10)
    s.close()
    assert closed
    assert rss_bytes(gw.proc.pid) - before < 64 * 1024 * 1024


def test_a_modest_pipeline_is_answered_in_order(gw: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.sendall(REQUEST * 3 + b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        deadline = time.monotonic() + 10
        s.settimeout(1)
        while data.count(b"HTTP/1.1 200") < 4 and time.monotonic() < deadline:
            try:
                part = s.recv(65536)
            except TimeoutError:
                continue
            if not part:
                break
            data += part
    assert data.count(b"HTTP/1.1 200") == 4
    assert data.rfind(b'"object":"list"') < data.rfind(b"HTTP/1.1 200")  # /live's answer came last


@pytest.mark.parametrize(
    "hosts", [(b"evil.example", b"localhost"), (b"localhost", b"evil.example"), (b"localhost", b"localhost")]
)
def test_two_host_headers_are_refused_in_local_mode(gw: Gateway, hosts: tuple[bytes, bytes]) -> None:
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: %s\r\nHost: %s\r\nConnection: close\r\n\r\n" % hosts)
        data, _ = read_until_closed(s, 10)
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
    assert b'"type":"invalid_request_error"' in data
