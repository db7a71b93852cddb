"""The upstream HTTP/1.1 client (gateway/pipeline/upstream.py) against h11, the reference parser.

The client is the project's own code (httptools plus connection handling), so generated
responses go to it and to h11's client side, and both must reach the same verdict: status,
body bytes, complete or error, and whether the connection may carry the next request. The
inputs cover framing by Content-Length, chunked (with extensions and trailers) and by
closing the connection, interim 1xx responses, HTTP/1.0, extra bytes after the message
(line ends, junk, a whole second response), missing bytes (cut, then EOF), each split into
packets; once through the connection protocol at every split offset, once over real
sockets on 127.0.0.1. Plus the RFC 9110 rules the client must follow beyond framing:
interim responses are skipped, a 101 is an error.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import h11
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import UpstreamError, UpstreamUnavailable
from gateway.pipeline.upstream import UpstreamResponse, _Conn, _Target
from tests.test_upstream_client import answer, read_request, serving


@dataclass(frozen=True)
class Verdict:
    status: int | None  # the final response's status, None if its headers never arrived
    body: bytes  # the body bytes delivered (up to the error, if any)
    complete: bool  # the message ended as its framing says
    reusable: bool  # the connection may carry the next request


@dataclass(frozen=True)
class Wire:
    """What the server writes: packets, then maybe EOF."""

    packets: tuple[bytes, ...]
    eof: bool

    @property
    def data(self) -> bytes:
        return b"".join(self.packets)


# ---------------------------------------------------------------------------------- generation
_CRLF_HEAVY = st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b"{}"]), max_size=8).map(b"".join)
_BODY = st.one_of(st.binary(max_size=40), _CRLF_HEAVY)


@st.composite
def _message(draw: Any) -> tuple[bytes, bool]:
    """One response (after 0-2 interim ones) and whether it needs EOF to end."""
    out = b""
    for _ in range(draw(st.integers(0, 2))):
        code = draw(st.sampled_from([100, 102, 103]))
        hint = b"link: </style.css>; rel=preload\r\n" if code == 103 else b""
        out += b"HTTP/1.1 %d Interim\r\n%s\r\n" % (code, hint)
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.1", b"1.1", b"1.0"]))
    status = draw(st.sampled_from([200, 200, 201, 204, 304, 400, 404, 500, 503]))
    head = b"HTTP/%s %d Status\r\ncontent-type: application/json\r\n" % (version, status)
    conn = draw(st.sampled_from([b"", b"", b"", b"connection: close\r\n", b"connection: keep-alive\r\n"]))
    head += conn
    if status in (204, 304):
        return out + head + b"\r\n", False
    body = draw(_BODY)
    framings = ["length", "close"] + (["chunked", "chunked"] if version == b"1.1" else [])
    framing = draw(st.sampled_from(framings))
    if framing == "length":
        return out + head + b"content-length: %d\r\n\r\n" % len(body) + body, False
    if framing == "close":
        return out + head + b"\r\n" + body, True
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
    wire = head + b"transfer-encoding: chunked\r\n\r\n"
    for c in chunks:
        ext = draw(st.sampled_from([b"", b"", b";x=1"]))
        wire += b"%x%s\r\n%s\r\n" % (len(c), ext, c)
    trailers = draw(st.sampled_from([b"", b"", b"x-trailer: 1\r\n", b"a: b\r\nc: \r\n"]))
    return out + wire + b"0\r\n" + trailers + b"\r\n", False


_EXTRA = st.one_of(
    st.just(b""),
    st.just(b""),
    st.just(b""),
    st.just(b""),
    st.sampled_from([b"\r\n", b"\n", b"\r\n\r\n", b"\r", b"H", b"junk"]),
    st.binary(min_size=1, max_size=8),
    st.just(answer(b'{"stray": true}')),
)


@st.composite
def wires(draw: Any) -> Wire:
    message, needs_eof = draw(_message())
    data = message + draw(_EXTRA)
    eof = needs_eof or draw(st.integers(0, 3)) == 0
    if draw(st.integers(0, 4)) == 0:  # missing bytes: cut (even to nothing, mostly near the end), then EOF
        last = max(len(data) - 1, 0)
        data = data[: draw(st.one_of(st.integers(0, last), st.integers(max(last - 12, 0), last)))]
        eof = True
    cuts = sorted(set(draw(st.lists(st.integers(1, max(len(data) - 1, 1)), max_size=6))))
    bounds = zip([0, *cuts], [*cuts, len(data)], strict=True)
    return Wire(tuple(data[a:b] for a, b in bounds if data[a:b]), eof)


# ---------------------------------------------------------------------------------- the reference
def reference(wire: Wire) -> Verdict:
    """h11's client side, fed the same packets after sending a POST."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/v1/x", headers=[("Host", "b"), ("Content-Length", "0")]))
    conn.send(h11.EndOfMessage())
    status: int | None = None
    body = b""
    complete = False
    try:
        for packet in [*wire.packets, *([b""] if wire.eof else [])]:
            conn.receive_data(packet)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                    break
                if isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    complete = True
    except h11.RemoteProtocolError:
        pass  # an error after the end (data after "Connection: close") leaves complete as it was
    reusable = (
        complete
        and conn.our_state is h11.DONE
        and conn.their_state is h11.DONE
        and conn.trailing_data == (b"", False)
    )
    return Verdict(status, body, complete, reusable)


# ---------------------------------------------------------------------------------- ours, in-process
class _Transport(asyncio.Transport):
    """The loop's side of a connection, in-process: close() reports connection_lost as asyncio does."""

    def __init__(self, protocol: _Conn) -> None:
        super().__init__()
        self._protocol = protocol
        self._closing = False

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            asyncio.get_running_loop().call_soon(self._protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _yield() -> None:
    for _ in range(6):  # callbacks and task steps: no I/O in between, so this is deterministic
        await asyncio.sleep(0)


async def ours_in_process(wire: Wire) -> Verdict:
    """The client's connection protocol fed the packets one at a time, as the event loop would."""
    target = _Target("http://127.0.0.1:9", None, None)
    conn = _Conn()
    transport = _Transport(conn)
    conn.connection_made(transport)
    headers = conn.begin()
    seen: dict[str, Any] = {"status": None, "body": b"", "complete": False}

    async def read() -> None:
        try:
            await headers
        except (UpstreamError, Exception):
            return
        resp = UpstreamResponse(conn, target)
        seen["status"] = resp.status
        try:
            while chunk := await resp.read_chunk():
                seen["body"] += chunk
        except UpstreamError:
            resp.close()
            return
        seen["complete"] = True
        resp.release()

    reader = asyncio.create_task(read())
    for packet in wire.packets:
        if transport.is_closing():
            break  # a closed transport delivers nothing more
        conn.data_received(packet)
        await _yield()
    if wire.eof and not transport.is_closing():
        transport._closing = True
        conn.connection_lost(None)
    await _yield()
    await asyncio.wait_for(reader, 1)
    reusable = conn in target.idle and conn.transport is not None and not conn.transport.is_closing()
    return Verdict(seen["status"], seen["body"], seen["complete"], reusable)


def _splits(wire: Wire) -> list[Wire]:
    """The generated packets, the data cut once at every offset, and one byte per packet."""
    data = wire.data
    out = [wire, Wire(tuple(data[i : i + 1] for i in range(len(data))), wire.eof)]
    out += [Wire((data[:i], data[i:]), wire.eof) for i in range(1, len(data))]
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wires())
def test_protocol_matches_h11_at_every_split(wire: Wire) -> None:
    want = reference(wire)

    async def run() -> list[tuple[Wire, Verdict]]:
        return [(w, await ours_in_process(w)) for w in _splits(wire)]

    for w, got in asyncio.run(run()):
        assert got == want, f"packets {w.packets!r} eof={w.eof}"


# ---------------------------------------------------------------------------------- ours, sockets
async def ours_over_sockets(wire: Wire) -> Verdict:
    """The real client against a raw server writing the packets; reuse seen by the server."""
    reused = asyncio.Event()
    written = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        if n == 1:
            try:
                for packet in wire.packets:
                    w.write(packet)
                    await w.drain()
                    for _ in range(3):  # the client's read runs in between: packets stay apart
                        await asyncio.sleep(0)
            finally:
                written.set()  # also when the client closed early and a write failed
            if wire.eof:
                return  # the server closes its side
            await read_request(r)  # the next request came on this connection
            reused.set()
        w.write(answer(b"next"))
        await w.drain()

    status: int | None = None
    body = b""
    complete = False
    async with serving(handler) as (_srv, client, b):
        async with asyncio.timeout(2):
            try:
                resp = await client.post(b, b"/v1/x", b"", "rid")
            except (UpstreamError, UpstreamUnavailable):
                pass
            else:
                status = resp.status
                try:
                    while chunk := await resp.read_chunk():
                        body += chunk
                except UpstreamError:
                    resp.close()
                else:
                    complete = True
                    resp.release()
            await written.wait()
            # Everything the server wrote is in this process's socket buffer or already read:
            # the next request shows whether the client kept the connection.
            nxt = await client.post(b, b"/v1/x", b"", "rid")
            assert await nxt.read() == b"next"
            nxt.release()
    return Verdict(status, body, complete, reused.is_set())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])  # the gateway runs on uvloop
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wire=wires())
def test_client_over_sockets_matches_h11(loop: str, wire: Wire) -> None:
    run = uvloop.run if loop == "uvloop" else asyncio.run
    assert run(ours_over_sockets(wire)) == reference(wire)


# ---------------------------------------------------------------------------------- RFC 9110 rules
def _over_sockets(*packets: bytes) -> Verdict:
    return asyncio.run(ours_over_sockets(Wire(packets, eof=False)))


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n",
    ],
)
@pytest.mark.parametrize("apart", [True, False], ids=["own-packet", "same-packet"])
def test_interim_responses_are_skipped(interim: bytes, apart: bool) -> None:
    """RFC 9110 §15.2: a client must parse and skip 1xx responses before the final one."""
    final = answer(b'{"ok": true}')
    got = _over_sockets(interim, final) if apart else _over_sockets(interim + final)
    assert got == Verdict(200, b'{"ok": true}', complete=True, reusable=True)


def test_switching_protocols_is_an_error() -> None:
    """The gateway never asks to upgrade (RFC 9110 §15.2.2): a 101 is a broken backend."""

    async def run() -> str:
        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
            await read_request(r)
            w.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
            await w.drain()
            await r.read()

        async with serving(handler) as (_srv, client, b), asyncio.timeout(5):
            with pytest.raises(UpstreamError) as err:
                await client.post(b, b"/v1/x", b"", "rid")
            return err.value.message

    assert asyncio.run(run()) == "The backend switched protocols, which the gateway does not support."


def test_reference_agrees_on_the_plain_cases() -> None:
    """The harness itself: h11 and the client agree where the answer is obvious."""
    cases = {
        answer(b"x"): Verdict(200, b"x", complete=True, reusable=True),
        answer(b"x") + b"\r\n": Verdict(200, b"x", complete=True, reusable=False),
        answer(b"x", b"connection: close\r\n"): Verdict(200, b"x", complete=True, reusable=False),
    }
    for data, want in cases.items():
        wire = Wire((data,), eof=False)
        assert reference(wire) == want
        assert asyncio.run(ours_in_process(wire)) == want
