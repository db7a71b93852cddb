"""The listener's own limits: a client cannot hold memory or a connection before authentication.

Raw sockets against a real gateway process: endless and oversized request heads, slowloris
heads and bodies, more connections than allowed; the gateway's RSS is read from /proc.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.procs import Gateway, Sim


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def read_until_closed(s: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """(bytes received, whether the peer closed the connection within ``timeout`` seconds)."""
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        return data, True
    except TimeoutError:
        return data, False
    return data, True


def gateway(sim: Sim, tmp_path: Path, **server: object) -> Gateway:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text("server:\n" + "".join(f"  {k}: {v}\n" for k, v in server.items()) if server else "")
    return Gateway([sim.url], config=cfg)


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    s = Sim(None, "--ttft", "0", "--itl", "0")
    yield s
    s.stop()


HEAD = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n"


def test_endless_headers_are_cut_off_and_memory_stays_bounded(sim: Sim, tmp_path: Path) -> None:
    gw = gateway(sim, tmp_path)  # defaults: max_header_bytes 64 KiB
    n, per_connection = 20, 8 * 1024 * 1024
    closed = [False] * n
    chunk = b"X-Fill: " + b"a" * 65536

    def flood(i: int) -> None:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            sent = 0
            try:
                s.sendall(HEAD)
                while sent < per_connection:
                    s.sendall(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                closed[i] = True
                return
            closed[i] = read_until_closed(s, 5)[1]

    try:
        httpx.get(gw.url + "/v1/models", timeout=10)
        before = rss_bytes(gw.proc.pid)
        threads = [threading.Thread(target=flood, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        # Meanwhile, ordinary clients are served.
        with httpx.Client(timeout=10) as c:
            for _ in range(5):
                assert c.get(gw.url + "/v1/models").status_code == 200
        for t in threads:
            t.join(120)
        after = rss_bytes(gw.proc.pid)
        assert closed == [True] * n
        # 160 MiB sent in all; without a limit the gateway kept all of it (and more).
        assert after - before < 48 * 1024 * 1024, (before, after)
        assert httpx.get(gw.url + "/v1/models", timeout=10).status_code == 200
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def small(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = gateway(
        sim,
        tmp_path_factory.mktemp("small"),
        max_header_bytes=8192,
        header_timeout=1,
        body_timeout=1,
    )
    yield g
    g.stop()


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(HEAD + b"X-Big: " + b"a" * 20_000 + b"\r\n\r\n", id="one-big-header"),
        pytest.param(HEAD + b"X-Big: " + b"a" * 20_000, id="unfinished-header"),
        pytest.param(HEAD + b"".join(b"X-%d: v\r\n" % i for i in range(2000)) + b"\r\n", id="many-headers"),
        pytest.param(b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", id="long-url"),
    ],
)
def test_oversized_head_is_431(small: Gateway, head: bytes) -> None:
    with socket.create_connection(("127.0.0.1", small.port), timeout=10) as s:
        s.sendall(head)
        data, closed = read_until_closed(s, 10)
    assert closed
    assert data.startswith(b"HTTP/1.1 431 ")
    body = orjson.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_header_fields_too_large"
    assert body["error"]["type"] == "invalid_request_error"


def test_head_within_the_limit_is_served(small: Gateway) -> None:
    r = httpx.get(small.url + "/v1/models", headers={"x-fill": "a" * 7000}, timeout=10)
    assert r.status_code == 200


def dribble(s: socket.socket, payload: bytes, deadline: float) -> tuple[bytes, bool]:
    """Send one byte every 0.25 s until the peer answers or closes (or the deadline passes)."""
    for byte in payload:
        if time.monotonic() > deadline:
            return b"", False
        readable, _, _ = select.select([s], [], [], 0.25)
        if readable:
            return read_until_closed(s, 5)
        try:
            s.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return b"", True
    return read_until_closed(s, max(0.0, deadline - time.monotonic()))


def test_slowloris_head_is_closed_at_header_timeout(small: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", small.port), timeout=10) as s:
        s.sendall(HEAD)
        data, closed = dribble(s, b"X-Slow: " + b"a" * 200, time.monotonic() + 30)
    assert closed
    assert data.startswith(b"HTTP/1.1 408 ")
    assert b'"code":"request_timeout"' in data


def test_silent_connection_is_closed_at_header_timeout(small: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", small.port), timeout=10) as s:
        assert read_until_closed(s, 30) == (b"", True)


def test_slow_body_is_closed_at_body_timeout(small: Gateway) -> None:
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", small.port), timeout=10) as s:
        s.sendall(head + b'{"model":')
        data, closed = dribble(s, b" " * 900, time.monotonic() + 30)
    assert (data, closed) == (b"", True)


def test_keep_alive_and_long_streams_outlive_the_timeouts(small: Gateway) -> None:
    with httpx.Client(timeout=30) as c:
        started = time.monotonic()
        while time.monotonic() - started < 2.5:  # one connection, longer than both timeouts
            assert c.get(small.url + "/v1/models").status_code == 200
            time.sleep(0.3)
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "a"}],
        "max_tokens": 5,
        "stream": True,
    }
    sim_slow = Sim(None, "--ttft", "0.5", "--itl", "0.5")
    try:
        gw = Gateway([sim_slow.url], config=None, env={"GATEWAY_SERVER__BODY_TIMEOUT": "1"})
        try:
            with httpx.stream("POST", gw.v1 + "/chat/completions", json=body, timeout=30) as r:
                text = b"".join(r.iter_raw())
            assert r.status_code == 200
            assert text.endswith(b"data: [DONE]\n\n")
        finally:
            gw.stop()
    finally:
        sim_slow.stop()


def test_connections_beyond_the_cap_get_503(sim: Sim, tmp_path: Path) -> None:
    gw = gateway(sim, tmp_path, max_connections=8, header_timeout=60)
    held: list[socket.socket] = []
    try:
        held = [socket.create_connection(("127.0.0.1", gw.port), timeout=10) for _ in range(8)]
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as extra:
            data, closed = read_until_closed(extra, 10)
        assert closed
        assert data.startswith(b"HTTP/1.1 503 ")
        assert b"\r\nretry-after: 1\r\n" in data
        assert b'"code":"too_many_connections"' in data
        for s in held:
            s.close()
        held = []
        deadline = time.monotonic() + 10
        status = 0
        while time.monotonic() < deadline and status != 200:
            try:
                status = httpx.get(gw.url + "/v1/models", timeout=5).status_code
            except httpx.HTTPError:
                status = 0
            time.sleep(0.05)
        assert status == 200
    finally:
        for s in held:
            s.close()
        gw.stop()
