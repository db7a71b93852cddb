"""A backend's non-streamed answer is read within a bound: a hostile one cannot fill the gateway's memory.

A hostile HTTP server on 127.0.0.1 (asyncio, in a thread of the test process) plays a vLLM
replica and an external provider. Asked for an endless answer, it writes a chunked body of up to
``HOSTILE_BYTES`` (a 200 whose JSON never ends, or a 500 error body that never ends; on the
replicas' client and on the provider's) and counts the bytes it could hand to the socket before
the gateway hung up. The gateway (a real process) must answer the client 502 after reading at
most ``streaming.max_response_bytes`` (an error body: a 64 KiB prefix), close that connection,
blame the backend, not retry the request elsewhere, and keep its peak resident memory
(``VmHWM`` in /proc/PID/status: a resource bound, not a timing one) far below the body's size.
The health poller's GETs are bounded too (a /metrics page that never ends). Normal answers on
the same gateway still work afterwards, and an answer exactly at the limit is relayed whole.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.procs import Gateway, Sim, until

MiB = 1024 * 1024
HOSTILE_BYTES = 400 * MiB  # what an endless answer sends at most (the unfixed gateway read all of it)
DEFAULT_LIMIT = 64 * MiB  # streaming.max_response_bytes' default
ERROR_PREFIX = 64 * 1024  # what the gateway reads of an error body
POLL_LIMIT = 4 * MiB  # what the health poller reads of one answer
# Bytes the hostile server can hand to a loopback socket that the gateway never reads: the two
# kernel buffers (tcp_wmem / tcp_rmem autotuning, a few MiB each) and the gateway's own read-ahead.
SLACK = 32 * MiB
PEAK_RSS = 300 * MiB  # the gateway's peak resident memory (start-up is ~100 MiB)
PIECE = 64 * 1024

OPEN_200 = (
    b'{"id":"chatcmpl-x","object":"chat.completion","created":1,"model":"tiny",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"'
)
OPEN_500 = b'{"error":{"message":"'


def chat_json(content: str) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-x",
            "object": "chat.completion",
            "created": 1,
            "model": "tiny",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }
    )


def message_json(content: str) -> bytes:
    """An Anthropic Messages API answer."""
    return orjson.dumps(
        {
            "id": "msg_1",
            "type": "message",
            "model": "claude-test",
            "content": [{"type": "text", "text": content}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 3, "output_tokens": 2},
        }
    )


def sized_chat(total: int) -> bytes:
    """A chat completion whose JSON body is exactly ``total`` bytes."""
    body = chat_json("x" * (total - len(chat_json(""))))
    assert len(body) == total
    return body


def head(status: int, length: int | None = None, ctype: bytes = b"application/json") -> bytes:
    framing = b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length
    return b"HTTP/1.1 %d X\r\ncontent-type: %s\r\n%s\r\n\r\n" % (status, ctype, framing)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Hostile:
    """vLLM's GETs (/health, /v1/models; /metrics endless when ``endless_metrics``) and, for a POST,
    what its last message asks for: ``huge-200`` / ``huge-500`` an endless chunked body,
    ``size:N`` a chat completion of exactly N bytes, anything else a small chat completion (or
    Anthropic message, on /v1/messages). ``sent`` maps each endless answer (``huge-200``,
    ``huge-500``, ``metrics``) to the bytes written of each one; ``posts`` counts the POSTs."""

    def __init__(self, endless_metrics: bool = False) -> None:
        self.endless_metrics = endless_metrics
        self.sent: dict[str, list[int]] = {}
        self.posts: list[str] = []
        self.lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        assert started.wait(10)
        assert self._server is not None
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        started.set()
        self._loop.run_forever()

    def stop(self) -> None:
        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def sent_of(self, what: str) -> list[int]:
        with self.lock:
            return list(self.sent.get(what, []))

    def post_count(self, what: str) -> int:
        with self.lock:
            return self.posts.count(what)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                raw = await reader.readuntil(b"\r\n\r\n")
                lines = raw.split(b"\r\n")
                method, path = lines[0].split(b" ")[:2]
                length = 0
                for line in lines[1:]:
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                if method == b"GET":
                    if path == b"/metrics" and self.endless_metrics:
                        await self._endless(writer, "metrics", head(200, ctype=b"text/plain"), b"# ")
                        return
                    writer.write(self._get(path))
                    await writer.drain()
                    continue
                ask = orjson.loads(body)["messages"][-1]["content"]
                with self.lock:
                    self.posts.append(ask)
                if ask == "huge-200":
                    await self._endless(writer, ask, head(200), OPEN_200)
                    return
                if ask == "huge-500":
                    await self._endless(writer, ask, head(500), OPEN_500)
                    return
                if ask.startswith("size:"):
                    answer = sized_chat(int(ask[5:]))
                elif path.endswith(b"/messages"):
                    answer = message_json("hello there")
                else:
                    answer = chat_json("hello there")
                writer.write(head(200, len(answer)) + answer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _endless(self, writer: asyncio.StreamWriter, what: str, start: bytes, opening: bytes) -> None:
        """Write ``start`` and a chunked body of HOSTILE_BYTES; record what the socket took."""
        with self.lock:
            self.sent.setdefault(what, []).append(0)
            at = len(self.sent[what]) - 1
        filler = chunk(b"x" * PIECE)
        sent = 0
        try:
            writer.write(start + chunk(opening))
            await writer.drain()
            while sent < HOSTILE_BYTES:
                writer.write(filler)
                await writer.drain()  # raises once the gateway has closed the connection
                sent += PIECE
                with self.lock:
                    self.sent[what][at] = sent
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass

    @staticmethod
    def _get(path: bytes) -> bytes:
        if path == b"/health":
            return b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
        if path == b"/v1/models":
            models = orjson.dumps({"object": "list", "data": [{"id": "tiny", "object": "model"}]})
            return head(200, len(models)) + models
        return b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def ask(gw: Gateway, content: str, timeout: float = 120) -> httpx.Response:
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 5}
    return httpx.post(gw.v1 + "/chat/completions", json=body, timeout=timeout)


def error_of(r: httpx.Response) -> dict[str, Any]:
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


@pytest.fixture
def hostile_pair() -> Iterator[tuple[Hostile, Hostile]]:
    pair = (Hostile(), Hostile())
    yield pair
    for h in pair:
        h.stop()


def test_an_endless_answer_is_cut_at_the_limit_with_bounded_memory(
    hostile_pair: tuple[Hostile, Hostile],
) -> None:
    a, b = hostile_pair
    gw = Gateway([a.url, b.url])  # defaults: max_response_bytes 64 MiB, one retry allowed
    try:
        r200 = ask(gw, "huge-200")
        r500 = ask(gw, "huge-500")
        peak = peak_rss(gw.proc.pid)
        sent200 = a.sent_of("huge-200") + b.sent_of("huge-200")
        sent500 = a.sent_of("huge-500") + b.sent_of("huge-500")
        shown = f"peak RSS {peak / MiB:.0f} MiB, sent {[n / MiB for n in sent200 + sent500]} MiB"
        assert peak < PEAK_RSS, shown
        assert len(sent200) == 1 and sent200[0] < DEFAULT_LIMIT + SLACK, shown
        assert len(sent500) == 1 and sent500[0] < ERROR_PREFIX + SLACK, shown
        # Never retried on the other replica: the backend did the work, the answer exists.
        assert a.post_count("huge-200") + b.post_count("huge-200") == 1

        assert r200.status_code == 502, r200.text[:300]
        err = error_of(r200)
        assert err["type"] == "server_error"
        assert err["code"] == "upstream_response_too_large"
        assert str(DEFAULT_LIMIT) in err["message"]
        assert r500.status_code == 502, r500.text[:300]
        assert error_of(r500)["code"] == "upstream_error"
        # Blamed on the backend, and said so in the log.
        logged = gw.wait_log(
            lambda r: r.get("event") == "upstream failure" and "larger" in str(r.get("cause"))
        )
        assert str(DEFAULT_LIMIT) in str(logged["cause"])
        # The same gateway still serves normal answers, on both replicas.
        for _ in range(4):
            r = ask(gw, "hi", timeout=30)
            assert r.status_code == 200
            assert r.json()["choices"][0]["message"]["content"] == "hello there"
        assert a.post_count("hi") and b.post_count("hi")
        assert httpx.get(gw.url + "/live", timeout=10).status_code == 200
    finally:
        gw.stop()


def test_an_answer_at_the_limit_is_relayed_whole_and_one_past_it_counts_against_the_breaker() -> None:
    h = Hostile()
    limit = 1 * MiB
    gw = Gateway(
        [h.url],
        env={
            "GATEWAY_STREAMING__MAX_RESPONSE_BYTES": str(limit),
            "GATEWAY_RESILIENCE__BREAKER_FAIL_MAX": "2",
            "GATEWAY_RESILIENCE__BREAKER_RESET_SECONDS": "60",
        },
    )
    try:
        r = ask(gw, f"size:{limit}")
        assert r.status_code == 200
        assert r.content == sized_chat(limit)  # byte for byte
        for _ in range(2):
            r = ask(gw, f"size:{limit + 1}")
            assert r.status_code == 502
            err = error_of(r)
            assert err["code"] == "upstream_response_too_large"
            assert err["message"] == (
                f"The backend sent a response larger than the gateway's limit ({limit} bytes)."
            )
        backend = httpx.get(gw.url + "/health", timeout=5).json()["backends"][0]
        assert backend["breaker"] == "open"
        opened = gw.wait_log(lambda r: r.get("event") == "circuit breaker state changed")
        assert "upstream_response_too_large" in str(opened["cause"])
    finally:
        gw.stop()
        h.stop()


def test_the_health_pollers_reads_are_bounded() -> None:
    h = Hostile(endless_metrics=True)
    gw = Gateway([h.url])
    try:
        until(lambda: len(h.sent_of("metrics")) >= 4, "four /metrics polls", timeout=30)
        done = h.sent_of("metrics")[:-1]  # the last one may still be running
        assert max(done) < POLL_LIMIT + SLACK, f"{max(done) / MiB:.0f} MiB sent"
        peak = peak_rss(gw.proc.pid)
        assert peak < PEAK_RSS, f"gateway peak RSS {peak / MiB:.0f} MiB"
        # A page the gateway will not read is not a health failure: the replica keeps serving.
        assert httpx.get(gw.url + "/health", timeout=5).json()["backends"][0]["state"] == "healthy"
        assert ask(gw, "hi", timeout=30).status_code == 200
    finally:
        gw.stop()
        h.stop()


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_the_external_providers_answers_are_bounded(tmp_path: Path, kind: str) -> None:
    h = Hostile()
    local = Sim(None)
    cfg = {
        "backends": [{"url": local.url}],
        "routing": {"default_route": {"fallback": True}},
        "timeouts": {"total": 120},
        "external": {
            "kind": kind,
            "base_url": h.url + "/v1",
            "models": {"tiny": "provider-model"},
            "allow_teamless": True,
        },
    }
    path = tmp_path / "gw.yaml"
    path.write_text(orjson.dumps(cfg).decode())
    no_proxy = {"HTTP_PROXY": "", "http_proxy": "", "ALL_PROXY": "", "all_proxy": ""}
    try:
        gw = Gateway([], config=path, env=no_proxy)
    finally:
        local.proc.kill()  # the only replica is gone: every request goes to the provider
    try:
        r200 = ask(gw, "huge-200")
        r500 = ask(gw, "huge-500")
        peak = peak_rss(gw.proc.pid)
        shown = f"peak RSS {peak / MiB:.0f} MiB, sent {h.sent} bytes"
        assert peak < PEAK_RSS, shown
        for what, bound in (("huge-200", DEFAULT_LIMIT), ("huge-500", ERROR_PREFIX)):
            sent = h.sent_of(what)
            assert len(sent) == 1 and sent[0] < bound + SLACK, shown
        assert r200.headers["x-gateway-backend"] == "external"
        assert r200.status_code == 502, r200.text[:300]
        assert error_of(r200)["code"] == "upstream_response_too_large"
        assert r500.status_code == 502, r500.text[:300]
        assert error_of(r500)["code"] == "upstream_error"
        r = ask(gw, "hi", timeout=30)
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == "hello there"
    finally:
        gw.stop()
        h.stop()
