"""Upstream connections on failure paths: closed, never pooled; a POST never sent twice.

Closing the connection is how vLLM learns to abort a generation, so a failed exchange
(timeout, cancel, partial body) must close it, never park it in the pool. A POST goes
once more on a new connection only when the pooled one ended before a single response
byte (the server closed it as idle); after any byte the backend may have acted on it.
Messages the client sees are plain English, without Python class names.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import orjson
import pytest

from gateway.config import TimeoutSettings
from gateway.errors import UpstreamError, UpstreamUnavailable
from gateway.pipeline.upstream import ProbeFailed, UpstreamClient
from tests.procs import Gateway, free_port
from tests.security.rawvllm import STREAM_HEAD, Post, RawVllm, chat_json, chat_stream_events, chunked
from tests.test_upstream_client import answer, backend, read_request, serving

BROKE_OFF = "The backend closed the connection before finishing its response."


# ------------------------------------------------------------------ failed exchanges close
async def test_release_of_an_unfinished_response_closes_the_connection() -> None:
    closed = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await w.drain()
        await r.read()  # EOF: the client dropped the connection
        closed.set()

    async with serving(handler) as (_srv, client, b), asyncio.timeout(10):
        resp = await client.post(b, b"/v1/x", b"", "rid")
        assert await resp.read_chunk() == b"partial"
        resp.release()  # not read to its end (a timeout hit, say): may never be pooled
        await closed.wait()


async def test_probe_timing_out_on_the_body_closes_its_connection() -> None:
    closed = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{")
        await w.drain()
        await r.read()
        closed.set()

    async with serving(handler) as (_srv, client, b), asyncio.timeout(10):
        with pytest.raises(ProbeFailed, match=r"^timed out after 0\.2s$"):
            await client.get(b, "/health", 0.2)
        await closed.wait()


async def test_probe_answered_in_full_keeps_its_connection() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(r)
            w.write(answer(b"ok"))
            await w.drain()

    async with serving(handler) as (srv, client, b), asyncio.timeout(10):
        for _ in range(3):
            assert await client.get(b, "/health", 1) == (200, b"ok")
        assert srv.connections == 1


async def test_cancelled_read_after_done_never_pools() -> None:
    """[DONE] was relayed, then the exchange was cancelled: close, even if the end arrives later."""
    end_now, closed = asyncio.Event(), asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(STREAM_HEAD + b"".join(chunked(e) for e in chat_stream_events("x")))
        await w.drain()
        await end_now.wait()
        w.write(b"0\r\n\r\n")
        await w.drain()
        await r.read()
        closed.set()

    async with serving(handler) as (_srv, client, b), asyncio.timeout(10):
        resp = await client.post(b, b"/v1/x", b"", "rid")
        got = b""
        while not got.endswith(b"data: [DONE]\n\n"):
            got += await resp.read_chunk()
        resp.body_consumed()
        resp.close()  # what attempt() does on any failure path, [DONE] or not
        end_now.set()
        await closed.wait()


async def test_stream_whose_end_never_comes_is_closed() -> None:
    closed = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(STREAM_HEAD + b"".join(chunked(e) for e in chat_stream_events("x")))
        await w.drain()
        await r.read()  # never sends the zero-length chunk
        closed.set()

    async with serving(handler) as (_srv, client, b), asyncio.timeout(10):
        resp = await client.post(b, b"/v1/x", b"", "rid")
        got = b""
        while not got.endswith(b"data: [DONE]\n\n"):
            got += await resp.read_chunk()
        resp.body_consumed()
        resp.release()
        await closed.wait()  # after the client's short wait for the message's end


# ------------------------------------------------------------------ a POST is sent once
@pytest.mark.parametrize(
    "partial",
    [b"H", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n"],
    ids=["one-byte", "status-line", "part-of-the-head"],
)
async def test_post_is_not_resent_after_a_response_byte_arrived(partial: bytes) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(answer(b"first"))
        await w.drain()
        await read_request(r)  # the second POST, on the pooled connection
        w.write(partial)
        await w.drain()  # then the server drops the connection

    posts = 0

    async def counting(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        nonlocal posts
        posts += 1
        await handler(r, w, n)

    async with serving(counting) as (srv, client, b), asyncio.timeout(10):
        resp = await client.post(b, b"/v1/x", b"a", "rid")
        assert await resp.read() == b"first"
        resp.release()
        with pytest.raises(UpstreamError) as err:
            await client.post(b, b"/v1/x", b"b", "rid")
        assert err.value.message == BROKE_OFF
        assert not err.value.retryable  # nor may another replica get it
        assert srv.connections == 1  # not sent again on a new connection


# ------------------------------------------------------------------ plain-English messages
async def test_connection_refused_is_said_in_words() -> None:
    port = free_port()
    client = UpstreamClient(TimeoutSettings())
    b = backend(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(UpstreamUnavailable) as err:
            await client.post(b, b"/v1/x", b"", "rid")
    finally:
        await client.close()
    assert err.value.message == f"Could not connect to backend {b.label}: connection refused."


async def test_body_cut_short_is_said_in_words() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await w.drain()

    async with serving(handler) as (_srv, client, b), asyncio.timeout(10):
        resp = await client.post(b, b"/v1/x", b"", "rid")
        with pytest.raises(UpstreamError) as err:
            await resp.read()
        resp.close()
    assert err.value.message == BROKE_OFF


# ------------------------------------------------------------------ through a real gateway process
class CutShort(RawVllm):
    """Sends the head and part of the body of every answer, then waits for the gateway to close."""

    def __init__(self, then_close: bool) -> None:
        self.then_close = then_close
        super().__init__(self._cut)

    async def _cut(self, post: Post, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if post.stream:
            w.write(STREAM_HEAD + chunked(chat_stream_events("partial")[0]))
        else:
            w.write(chat_json("partial answer")[:-10])
        await w.drain()
        if self.then_close:
            raise ConnectionResetError  # drops the connection
        # Else the next read waits for EOF: the gateway dropped the connection (closed_by_peer),
        # which is how vLLM would learn to abort the generation.


@pytest.fixture
def stalls() -> Iterator[CutShort]:
    b = CutShort(then_close=False)
    yield b
    b.stop()


@pytest.fixture
def breaks_off() -> Iterator[CutShort]:
    b = CutShort(then_close=True)
    yield b
    b.stop()


def _chat(stream: bool) -> dict[str, object]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def test_total_timeout_after_headers_closes_the_upstream_connection(stalls: CutShort) -> None:
    gw = Gateway([stalls.url], env={"GATEWAY_TIMEOUTS__TOTAL": "1"})
    try:
        r = httpx.post(gw.url + "/v1/chat/completions", json=_chat(False), timeout=30)
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "total_timeout"
        stalls.wait_until(lambda: stalls.closed_by_peer == 1)
    finally:
        gw.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_backend_breaking_off_is_reported_in_plain_english(breaks_off: CutShort, stream: bool) -> None:
    gw = Gateway([breaks_off.url])
    try:
        with httpx.Client(base_url=gw.url, timeout=30) as http:
            if not stream:
                r = http.post("/v1/chat/completions", json=_chat(False))
                assert r.status_code == 502
                error = r.json()["error"]
            else:
                with http.stream("POST", "/v1/chat/completions", json=_chat(True)) as r:
                    assert r.status_code == 200
                    events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]"
                error = orjson.loads(events[-2])["error"]
        assert (error["message"], error["type"]) == (BROKE_OFF, "server_error")
    finally:
        gw.stop()


class AnswersThenBreaksOff(RawVllm):
    """Answers the first POST; every later one gets a status line, then the connection drops."""

    def __init__(self) -> None:
        super().__init__(self._answer)

    async def _answer(self, post: Post, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with self.lock:
            first = len(self.posts) == 1
        if first:
            w.write(chat_json("first"))
            await w.drain()
            return
        w.write(b"HTTP/1.1 200 OK\r\n")
        await w.drain()
        raise ConnectionResetError  # drops the connection


def test_gateway_sends_a_post_once_when_the_backend_broke_off_after_a_byte() -> None:
    backend_ = AnswersThenBreaksOff()
    gw = Gateway([backend_.url])
    try:
        with httpx.Client(base_url=gw.url, timeout=30) as http:
            assert http.post("/v1/chat/completions", json=_chat(False)).status_code == 200
            r = http.post("/v1/chat/completions", json=_chat(False))
        assert r.status_code == 502
        assert r.json()["error"]["message"] == BROKE_OFF
        with backend_.lock:
            assert len(backend_.posts) == 2
    finally:
        gw.stop()
        backend_.stop()


async def test_a_response_ends_once_so_its_connection_is_pooled_once() -> None:
    """A second release() (or a late close()) must not pool the connection twice or close it
    under the next exchange: each later request gets a connection of its own."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            body = await read_request(r)
            w.write(answer(body))
            await w.drain()

    async with serving(handler) as (srv, client, b), asyncio.timeout(10):
        resp = await client.post(b, b"/v1/x", b"a", "rid")
        assert await resp.read() == b"a"
        resp.release()
        resp.release()
        one, two = await asyncio.gather(
            client.post(b, b"/v1/x", b"b", "rid"), client.post(b, b"/v1/x", b"c", "rid")
        )
        resp.close()  # late: must not touch the connection someone else now uses
        assert (await one.read(), await two.read()) == (b"b", b"c")
        assert srv.connections == 2
