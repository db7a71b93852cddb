"""A broken answer from the external provider is the provider's fault, never the gateway's bug.

A raw HTTP server on 127.0.0.1 plays the provider and answers each request with the bytes
of one row of a table (picked by the client's X-Request-Id, which the gateway passes on as
the prefix of the upstream id); real gateway processes (``kind: anthropic`` and ``kind:
openai``) whose only replica is stopped send every request there. Every broken answer gives
a 502/503/504, the provider's 4xx in OpenAI's shape, or, once a stream has started, a final
SSE error event; it counts against the provider's breaker only when it is the provider's fault.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.procs import Gateway, Sim, free_port

MSG = [{"role": "user", "content": "hello"}]

# ----------------------------------------------------------------------------- answers, as raw bytes


def plain(status: int, body: bytes | Any, ctype: str = "application/json") -> bytes:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    head = f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {len(raw)}\r\n"
    return head.encode() + b"Connection: close\r\n\r\n" + raw


def cut_body(status: int, sent: bytes, claimed: int) -> bytes:
    """Headers promise ``claimed`` bytes; the connection closes after ``sent``."""
    head = f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\nContent-Length: {claimed}\r\n\r\n"
    return head.encode() + sent


def sse(*events: bytes) -> bytes:
    """A close-delimited event stream: it ends, cleanly at the HTTP level, after ``events``."""
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + b"".join(
        events
    )


def sse_cut(*events: bytes) -> bytes:
    """A chunked event stream whose connection breaks before the last chunk."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)


def ev(obj: Any, name: str | None = None) -> bytes:
    line = b"data: " + (obj if isinstance(obj, bytes) else orjson.dumps(obj)) + b"\n\n"
    return (f"event: {name}\n".encode() + line) if name else line


# Anthropic's Messages API
A_MSG = {
    "id": "msg_1",
    "type": "message",
    "model": "claude-test",
    "content": [{"type": "text", "text": "hi there"}],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 3, "output_tokens": 2},
}
A_START = ev(
    {
        "type": "message_start",
        "message": {"id": "msg_1", "model": "claude-test", "usage": {"input_tokens": 3}},
    },
    "message_start",
)
A_DELTA = ev(
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
    "content_block_delta",
)
A_END = ev(
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}},
    "message_delta",
) + ev({"type": "message_stop"}, "message_stop")
A_ERR = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}

# OpenAI's chat completions
O_MSG = {
    "id": "c1",
    "object": "chat.completion",
    "model": "gpt-test",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi there"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}
O_CHUNK = ev(
    {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}],
    }
)
O_DONE = ev(b"[DONE]")


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # anthropic | openai
    stream: bool
    answer: bytes  # the provider's whole response
    status: int  # what the client gets
    code: str | None  # error.code (of the body, or of the final SSE error event); None: success
    path: str = "/v1/chat/completions"
    message: str | None = None  # a part of the error message the client must see
    hang: bool = False  # the provider keeps the connection open, silent, after ``answer``


CASES = [
    # --- kind: anthropic, plain
    Case("a-ok", "anthropic", False, plain(200, A_MSG), 200, None),
    Case(
        "a-not-json",
        "anthropic",
        False,
        plain(200, b"<html>oops</html>", "text/html"),
        502,
        "upstream_invalid_response",
    ),
    Case("a-array", "anthropic", False, plain(200, [A_MSG]), 502, "upstream_invalid_response"),
    Case(
        "a-no-content",
        "anthropic",
        False,
        plain(200, {**A_MSG, "content": None}),
        502,
        "upstream_invalid_response",
    ),
    Case(
        "a-content-str",
        "anthropic",
        False,
        plain(200, {**A_MSG, "content": "hi"}),
        502,
        "upstream_invalid_response",
    ),
    Case(
        "a-block-str",
        "anthropic",
        False,
        plain(200, {**A_MSG, "content": ["hi"]}),
        502,
        "upstream_invalid_response",
    ),
    Case(
        "a-text-num",
        "anthropic",
        False,
        plain(200, {**A_MSG, "content": [{"type": "text", "text": 5}]}),
        502,
        "upstream_invalid_response",
    ),
    Case(
        "a-usage-str",
        "anthropic",
        False,
        plain(200, {**A_MSG, "usage": {"input_tokens": "3", "output_tokens": 2}}),
        502,
        "upstream_invalid_response",
    ),
    Case(
        "a-usage-list",
        "anthropic",
        False,
        plain(200, {**A_MSG, "usage": [3, 2]}),
        502,
        "upstream_invalid_response",
    ),
    Case("a-cut", "anthropic", False, cut_body(200, orjson.dumps(A_MSG)[:20], 400), 502, "upstream_error"),
    Case("a-500-html", "anthropic", False, plain(500, b"<h1>500</h1>", "text/html"), 502, "upstream_error"),
    Case("a-503-text", "anthropic", False, plain(503, b"busy", "text/plain"), 503, "upstream_unavailable"),
    Case(
        "a-529",
        "anthropic",
        False,
        plain(529, {"type": "error", "error": A_ERR["error"]}),
        503,
        "upstream_unavailable",
        message="Overloaded",
    ),
    Case("a-400-text", "anthropic", False, plain(400, b"bad", "text/plain"), 400, None),
    Case(
        "a-404-json",
        "anthropic",
        False,
        plain(404, {"type": "error", "error": {"type": "not_found_error", "message": "model: claude-x"}}),
        404,
        None,
        message="model: claude-x",
    ),
    # --- kind: anthropic, streamed
    Case("a-s-ok", "anthropic", True, sse(A_START, A_DELTA, A_END), 200, None),
    Case("a-s-not-json", "anthropic", True, sse(A_START, ev(b"{oops"), A_END), 200, "upstream_invalid_event"),
    Case("a-s-array", "anthropic", True, sse(A_START, ev([1, 2]), A_END), 200, "upstream_invalid_event"),
    Case(
        "a-s-delta-str",
        "anthropic",
        True,
        sse(A_START, ev({"type": "content_block_delta", "delta": "hi"}), A_END),
        200,
        "upstream_invalid_event",
    ),
    Case(
        "a-s-usage-str",
        "anthropic",
        True,
        sse(A_START, A_DELTA, ev({"type": "message_delta", "delta": {}, "usage": {"output_tokens": "1"}})),
        200,
        "upstream_invalid_event",
    ),
    Case(
        "a-s-error",
        "anthropic",
        True,
        sse(A_START, A_DELTA, ev(A_ERR, "error")),
        200,
        "upstream_error",
        message="Overloaded",
    ),
    Case("a-s-ended", "anthropic", True, sse(A_START, A_DELTA), 200, "stream_truncated"),
    Case("a-s-broken", "anthropic", True, sse_cut(A_START, A_DELTA), 200, "upstream_error"),
    Case("a-s-500", "anthropic", True, plain(500, b"oops", "text/plain"), 502, "upstream_error"),
    Case("a-s-400", "anthropic", True, plain(400, b"bad", "text/plain"), 400, None),
    Case("a-s-stalls", "anthropic", True, sse(A_START, A_DELTA), 200, "idle_timeout", hang=True),
    Case("a-silent", "anthropic", False, b"", 504, "total_timeout", hang=True),
    Case(
        "a-huge-usage",
        "anthropic",
        False,
        plain(200, {**A_MSG, "usage": {"input_tokens": 2**64 - 1, "output_tokens": 1}}),
        502,
        "upstream_invalid_response",
    ),
    Case(
        "a-s-huge-usage",
        "anthropic",
        True,
        sse(
            A_START,
            A_DELTA,
            ev(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn"},
                    "usage": {"output_tokens": 2**64 - 1},
                }
            ),
        ),
        200,
        "upstream_invalid_event",
    ),
    Case(
        "a-s-cr",
        "anthropic",
        True,
        sse(A_START.replace(b"\n", b"\r"), A_DELTA.replace(b"\n", b"\r"), A_END.replace(b"\n", b"\r")),
        200,
        None,
    ),
    Case(
        "a-s-endless-event",
        "anthropic",
        True,
        sse(A_START, b"data: " + b"x" * (9 * 1024 * 1024)),
        200,
        "upstream_event_too_large",
    ),
    # --- kind: openai, plain
    Case("o-ok", "openai", False, plain(200, O_MSG), 200, None),
    Case(
        "o-not-json",
        "openai",
        False,
        plain(200, b"<html>oops</html>", "text/html"),
        502,
        "upstream_invalid_response",
    ),
    Case("o-array", "openai", False, plain(200, [O_MSG]), 502, "upstream_invalid_response"),
    Case(
        "o-no-choices",
        "openai",
        False,
        plain(200, {"id": "c1", "object": "chat.completion"}),
        502,
        "upstream_invalid_response",
    ),
    Case(
        "o-choices-str",
        "openai",
        False,
        plain(200, {**O_MSG, "choices": "hi"}),
        502,
        "upstream_invalid_response",
    ),
    Case(
        "o-usage-str",
        "openai",
        False,
        plain(200, {**O_MSG, "usage": {"prompt_tokens": "3", "completion_tokens": 2}}),
        502,
        "upstream_invalid_response",
    ),
    Case(
        "o-emb-no-data",
        "openai",
        False,
        plain(200, {"object": "list", "model": "emb"}),
        502,
        "upstream_invalid_response",
        path="/v1/embeddings",
    ),
    Case("o-cut", "openai", False, cut_body(200, orjson.dumps(O_MSG)[:20], 400), 502, "upstream_error"),
    Case("o-500-html", "openai", False, plain(500, b"<h1>500</h1>", "text/html"), 502, "upstream_error"),
    Case("o-503-text", "openai", False, plain(503, b"busy", "text/plain"), 503, "upstream_unavailable"),
    Case("o-400-text", "openai", False, plain(400, b"bad", "text/plain"), 400, None),
    Case(
        "o-400-json",
        "openai",
        False,
        plain(
            400,
            {
                "error": {
                    "message": "max_tokens too big",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            },
        ),
        400,
        None,
        message="max_tokens too big",
    ),
    # --- kind: openai, streamed
    Case("o-s-ok", "openai", True, sse(O_CHUNK, O_DONE), 200, None),
    Case("o-s-not-json", "openai", True, sse(O_CHUNK, ev(b"{oops"), O_DONE), 200, "upstream_invalid_event"),
    Case("o-s-array", "openai", True, sse(O_CHUNK, ev([1]), O_DONE), 200, "upstream_invalid_event"),
    Case(
        "o-s-error",
        "openai",
        True,
        sse(
            O_CHUNK,
            ev({"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}),
            O_DONE,
        ),
        200,
        None,
        message="boom",
    ),
    Case("o-s-ended", "openai", True, sse(O_CHUNK), 200, "stream_truncated"),
    Case("o-s-stalls", "openai", True, sse(O_CHUNK), 200, "idle_timeout", hang=True),
    Case("o-silent", "openai", False, b"", 504, "total_timeout", hang=True),
    Case("o-s-broken", "openai", True, sse_cut(O_CHUNK), 200, "upstream_error"),
    Case("o-s-500", "openai", True, plain(500, b"oops", "text/plain"), 502, "upstream_error"),
    Case("o-s-400", "openai", True, plain(400, b"bad", "text/plain"), 400, None),
]


# ----------------------------------------------------------------------------- the raw provider


@dataclass
class RawProvider:
    """A provider on 127.0.0.1 (its own thread and loop) that answers ``answers[case]`` verbatim.

    The case is the upstream request id up to its first ``.`` (the client's X-Request-Id);
    ``received`` lists the cases in arrival order. The connection closes after each answer.
    """

    answers: dict[str, bytes]
    hang: set[str] = field(default_factory=set)
    received: list[str] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        assert started.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self, started: threading.Event) -> None:
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        started.set()
        self._loop.run_forever()
        server.close()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            headers = dict(
                (k.strip().lower(), v.strip())
                for k, _, v in (h.partition(":") for h in head.decode("latin-1").split("\r\n")[1:] if h)
            )
            await reader.readexactly(int(headers.get("content-length", "0")))
            case = headers.get("x-request-id", "").split(".", 1)[0]
            self.received.append(case)
            writer.write(self.answers.get(case, plain(418, b"no such case", "text/plain")))
            await writer.drain()
            if case in self.hang:
                await reader.read()  # silent until the gateway gives up and closes
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def start_gateway(tmp: Path, kind: str, provider: RawProvider, fail_max: int) -> Gateway:
    local = Sim(None, "--embedding-model", "emb")
    cfg = {
        "backends": [{"url": local.url}],
        "routing": {"default_route": {"fallback": True}},
        "resilience": {"breaker_fail_max": fail_max, "breaker_reset_seconds": 600},
        "timeouts": {"idle": 1, "first_byte": 2, "total": 20},
        "external": {
            "kind": kind,
            "base_url": provider.url + "/v1",
            "models": {"tiny": "provider-model", "emb": "provider-emb"},
            "allow_teamless": True,
        },
    }
    path = tmp / f"gw-{kind}-{free_port()}.yaml"
    path.write_text(orjson.dumps(cfg).decode())
    try:
        return Gateway(
            [], config=path, env={"HTTP_PROXY": "", "http_proxy": "", "ALL_PROXY": "", "all_proxy": ""}
        )
    finally:
        local.proc.kill()


@pytest.fixture(scope="module")
def provider() -> Iterator[RawProvider]:
    p = RawProvider({c.name: c.answer for c in CASES}, {c.name for c in CASES if c.hang})
    yield p
    p.stop()


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory, provider: RawProvider) -> Iterator[dict[str, Gateway]]:
    tmp = tmp_path_factory.mktemp("fallback-errors")
    gws = {kind: start_gateway(tmp, kind, provider, fail_max=10_000) for kind in ("anthropic", "openai")}
    yield gws
    for gw in gws.values():
        gw.stop()


def ask(gw: Gateway, name: str, stream: bool, path: str = "/v1/chat/completions") -> httpx.Response:
    body: dict[str, Any] = (
        {"model": "emb", "input": "hello"}
        if path.endswith("embeddings")
        else {"model": "tiny", "messages": MSG, "max_tokens": 5, "stream": stream}
    )
    return httpx.post(gw.url + path, json=body, headers={"x-request-id": name}, timeout=30)


def sse_events(text: str) -> list[Any]:
    return [orjson.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]


# ----------------------------------------------------------------------------- the table


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_broken_provider_answer(gateways: dict[str, Gateway], provider: RawProvider, case: Case) -> None:
    r = ask(gateways[case.kind], case.name, case.stream, case.path)
    assert provider.received.count(case.name) == 1
    assert r.status_code == case.status, r.text
    assert r.headers["x-gateway-backend"] == "external"
    if r.status_code != 200:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["code"] == case.code
        if case.status == 503:
            assert r.headers["retry-after"]
        if case.message:
            assert case.message in err["message"]
        return
    if not case.stream:
        assert r.json()["choices"][0]["message"]["content"] == "hi there"
        return
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")
    events = sse_events(r.text)
    assert events and "error" not in events[0]  # the stream really had started
    last = events[-1]
    if case.code is None and case.message is None:
        assert "error" not in last
        return
    assert set(last["error"]) == {"message", "type", "param", "code"}
    if case.code is not None:
        assert last["error"]["code"] == case.code
    if case.message:
        assert case.message in last["error"]["message"]


def test_no_broken_answer_was_logged_as_a_gateway_bug(gateways: dict[str, Gateway]) -> None:
    for kind in ("anthropic", "openai"):
        for c in CASES:
            if c.kind == kind:
                ask(gateways[kind], c.name + "-again", c.stream, c.path)  # answered 418: unknown case
        log = gateways[kind].proc.output()
        assert '"internal error"' not in log and "Internal gateway error" not in log


# ----------------------------------------------------------------------------- the breaker


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
def test_breaker_counts_the_providers_faults_only(tmp_path: Path, kind: str) -> None:
    k = kind[0]
    answers = {
        f"{k}-client": plain(400, b"bad request", "text/plain"),
        f"{k}-broken": plain(200, b"<html>", "text/html"),
        f"{k}-ok": plain(200, A_MSG if kind == "anthropic" else O_MSG),
    }
    provider = RawProvider(answers)
    gw = start_gateway(tmp_path, kind, provider, fail_max=2)
    try:
        for _ in range(4):  # the request's fault: the breaker stays closed
            assert ask(gw, f"{k}-client", False).status_code == 400
        assert ask(gw, f"{k}-ok", False).status_code == 200
        for _ in range(2):  # the provider's fault: counted, the second one opens the breaker
            assert ask(gw, f"{k}-broken", False).status_code == 502
        r = ask(gw, f"{k}-ok", False)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "circuit_open"
        assert provider.received == [f"{k}-client"] * 4 + [f"{k}-ok"] + [f"{k}-broken"] * 2
    finally:
        gw.stop()
        provider.stop()


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_providers_absurd_usage_is_not_recorded(
    gateways: dict[str, Gateway], provider: RawProvider, kind: str, stream: bool
) -> None:
    """A provider reporting 1,000,000,000 output tokens for max_tokens 5: the Anthropic adapter
    wrote the figure straight into the request's record (limits, budget, ledger); now any
    provider's usage past what the request could use is estimated instead (account stage)."""
    name = f"absurd-{kind}-{'stream' if stream else 'plain'}"
    huge = 1_000_000_000
    if kind == "anthropic":
        answer = (
            sse(
                A_START,
                A_DELTA,
                ev(
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": "end_turn"},
                        "usage": {"output_tokens": huge},
                    },
                    "message_delta",
                ),
                ev({"type": "message_stop"}, "message_stop"),
            )
            if stream
            else plain(200, {**A_MSG, "usage": {"input_tokens": 3, "output_tokens": huge}})
        )
    else:
        usage = {"prompt_tokens": 3, "completion_tokens": huge, "total_tokens": huge + 3}
        answer = (
            sse(
                O_CHUNK,
                ev({**O_MSG, "object": "chat.completion.chunk", "choices": [], "usage": usage}),
                O_DONE,
            )
            if stream
            else plain(200, {**O_MSG, "usage": usage})
        )
    provider.answers[name] = answer
    r = ask(gateways[kind], name, stream)
    assert r.status_code == 200, r.text
    audit = gateways[kind].wait_audit(name)
    assert audit["usage_estimated"] is True, audit
    assert audit["completion_tokens"] <= 5, audit
