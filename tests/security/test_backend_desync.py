"""A misbehaving backend must never hand one user's answer to the next user.

HTTP/1.1 has no request ids on the wire: the answer to a request is whatever comes next on
its connection. A backend that writes a second response on a keep-alive connection (a bug,
a retry, a hostile proxy in between) would have it read as the next request's answer, and
the next request may be another user's. The upstream client closes a connection that
receives anything while no exchange runs on it, and pools only a response that ended
exactly at its last byte.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import orjson
import pytest

from gateway.pipeline.upstream import UpstreamClient
from tests.procs import Gateway
from tests.security.rawvllm import (
    STREAM_HEAD,
    Post,
    RawVllm,
    chat_answer,
    chat_stream,
    chat_stream_events,
    chunked,
)
from tests.test_upstream_client import answer, read_request, serving


def _plain(user: bytes) -> bytes:
    return answer(b'{"for": "%s"}' % user)


async def _read_all(client: UpstreamClient, b: object, user: bytes) -> bytes:
    resp = await client.post(b, b"/v1/x", user, "rid")  # type: ignore[arg-type]
    body = await resp.read()
    resp.release()
    return body


# ------------------------------------------------------------------ stray bytes on an idle connection
STRAYS: dict[str, bytes] = {
    "whole-response": _plain(b"A"),
    "head-first": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n",
    "one-byte": b"H",
    "whole-stream": chat_stream("secret of A"),
}


@pytest.mark.parametrize("stray", list(STRAYS))
async def test_stray_response_on_an_idle_connection_never_reaches_the_next_request(stray: str) -> None:
    """The backend writes more after A's answer, before B's request: B gets B's answer."""
    stray_now, stray_written = asyncio.Event(), asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            user = await read_request(r)
            w.write(_plain(user))
            await w.drain()
            if user == b"A":
                await stray_now.wait()
                w.write(STRAYS[stray])
                await w.drain()
                stray_written.set()
                if stray == "head-first":  # the rest of that response once the next request came
                    await read_request(r)
                    w.write(b'{"for": "A"}' + _plain(b"B"))
                    await w.drain()

    async with serving(handler) as (srv, client, b), asyncio.timeout(10):
        assert await _read_all(client, b, b"A") == b'{"for": "A"}'
        stray_now.set()
        await stray_written.wait()
        assert await _read_all(client, b, b"B") == b'{"for": "B"}'
        assert srv.connections == 2  # the connection with the stray bytes was not reused


async def test_bytes_on_an_idle_connection_close_it() -> None:
    pooled, closed = asyncio.Event(), asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(_plain(b"A"))
        await w.drain()
        await pooled.wait()
        w.write(b"HTTP/1.1 200 OK\r\n")  # a stray response begins while the connection is pooled
        await w.drain()
        await r.read()  # returns at EOF: the client closed the connection
        closed.set()

    async with serving(handler) as (_srv, client, b), asyncio.timeout(10):
        assert await _read_all(client, b, b"A") == b'{"for": "A"}'
        pooled.set()
        await closed.wait()


@pytest.mark.parametrize(
    "extra",
    [_plain(b"A"), b"\r\n", b"X"],
    ids=["second-response", "line-end", "junk"],
)
async def test_bytes_after_the_end_of_a_response_close_its_connection(extra: bytes) -> None:
    """Bytes in the same packet as the response's end: the response stands, the connection goes."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            user = await read_request(r)
            w.write(_plain(user) + (extra if n == 1 else b""))
            await w.drain()

    async with serving(handler) as (srv, client, b), asyncio.timeout(10):
        assert await _read_all(client, b, b"A") == b'{"for": "A"}'
        assert await _read_all(client, b, b"B") == b'{"for": "B"}'
        assert srv.connections == 2


@pytest.mark.parametrize(
    "after_done",
    [b"0\r\n\r\n" + _plain(b"A"), chunked(b"data: more\n\n") + b"0\r\n\r\n", b"0\r\n\r\n\r\n"],
    ids=["end-then-second-response", "more-data-then-end", "end-then-line-end"],
)
async def test_stream_consumed_to_done_is_not_pooled_when_more_than_its_end_arrives(
    after_done: bytes,
) -> None:
    events = chat_stream_events("A")
    done_relayed, closed = asyncio.Event(), asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        if n == 1:
            w.write(STREAM_HEAD + b"".join(chunked(e) for e in events))
            await w.drain()
            await done_relayed.wait()
            w.write(after_done)
            await w.drain()
            await r.read()
            closed.set()
        else:
            w.write(_plain(b"B"))
            await w.drain()

    async with serving(handler) as (srv, client, b), asyncio.timeout(10):
        resp = await client.post(b, b"/v1/x", b"A", "rid")
        got = b""
        while not got.endswith(b"data: [DONE]\n\n"):
            got += await resp.read_chunk()
        resp.body_consumed()
        resp.release()
        done_relayed.set()
        await closed.wait()  # the client closed the connection instead of pooling it
        assert await _read_all(client, b, b"B") == b'{"for": "B"}'
        assert srv.connections == 2


# ------------------------------------------------------------------ through a real gateway process
class Hostile(RawVllm):
    """Answers each POST, then 0.3 s later writes a copy of that answer again on the same connection."""

    def __init__(self) -> None:
        self.strays: list[str] = []  # prompts whose answer was written a second time
        super().__init__(self._answer_twice)

    async def _answer_twice(self, post: Post, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        content = f"secret of {post.prompt}"
        w.write(chat_answer(post, content))
        await w.drain()
        self.loop.create_task(self._stray(post, content, w))

    async def _stray(self, post: Post, content: str, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.3)
        w.write(chat_answer(post, content))  # on loopback, in the gateway's socket buffer on return
        with self.lock:
            self.strays.append(post.prompt)


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    backend = Hostile()
    yield backend
    backend.stop()


def _ask(http: httpx.Client, prompt: str, stream: bool) -> str:
    body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "stream": stream}
    if not stream:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        content: str = r.json()["choices"][0]["message"]["content"]
        return content
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    parts: list[str] = []
    for event in events[:-1]:
        data = orjson.loads(event)
        assert "error" not in data, data
        parts.append(data["choices"][0]["delta"].get("content") or "")
    return "".join(parts)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_hostile_backend_cannot_hand_one_users_answer_to_the_next(hostile: Hostile, stream: bool) -> None:
    gw = Gateway([hostile.url])
    try:
        with httpx.Client(base_url=gw.url, timeout=30) as http:
            for trial in range(5):
                a, b = f"user-a-{trial}", f"user-b-{trial}"
                assert _ask(http, a, stream) == f"secret of {a}"
                hostile.wait_until(lambda prompt=a: prompt in hostile.strays)  # type: ignore[misc]
                assert _ask(http, b, stream) == f"secret of {b}"
    finally:
        gw.stop()
