"""What the client sees is what the backend meant, in OpenAI's shape: any SSE framing, errors in
OpenAI's error object, and nothing of what the gateway asked for itself."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import orjson
import pytest

from gateway.sim.engine import expected_text
from tests.procs import Gateway, Sim
from tests.rawbackend import SSE_HEAD, RawBackend, answer, chunk

FIXTURES = Path(__file__).parent / "fixtures"
VALIDATOR = jsonschema.Draft202012Validator(
    json.loads((FIXTURES / "openai-openapi" / "error_response.schema.json").read_text())
)
OPENAI_TYPES = {"invalid_request_error", "not_found_error", "authentication_error", "server_error"}
PROMPT = "red green blue"
CHAT: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5}
COMP: dict[str, Any] = {"model": "tiny", "prompt": PROMPT, "max_tokens": 5}


def events(raw: bytes) -> list[bytes]:
    """The payloads of a canonical SSE stream (asserting it is canonical)."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    out = []
    for e in raw[:-2].split(b"\n\n"):
        assert e.startswith(b"data: ") and b"\n" not in e, e
        out.append(e[6:])
    return out


def stream(url: str, path: str, body: dict[str, Any]) -> list[bytes]:
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200, r.read()
        return events(r.read())


def openai_error(raw: bytes) -> dict[str, Any]:
    parsed = orjson.loads(raw)
    VALIDATOR.validate(parsed)
    err: dict[str, Any] = parsed["error"]
    assert err["type"] in OPENAI_TYPES, err
    return err


def circuit_open(gw: Gateway, backend: str) -> float:
    for line in httpx.get(gw.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("gateway_backend_circuit_open{") and f'backend="{backend}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no circuit metric for " + backend)


# ------------------------------------------------------------------ SSE framings
@pytest.fixture(scope="module", params=["crlf", "cr", "bare"])
def framed(request: pytest.FixtureRequest) -> Iterator[tuple[Sim, Gateway]]:
    sim = Sim(None, "--ttft", "0.01", "--itl", "0.002", "--sse-framing", request.param)
    gw = Gateway([sim.url])
    yield sim, gw
    gw.stop()
    sim.stop()


def test_other_framings_reach_the_client_as_canonical_events(framed: tuple[Sim, Gateway]) -> None:
    sim, gw = framed
    with httpx.stream("POST", sim.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        assert b'}\n\ndata: {"' not in r.read()  # really not vLLM's framing
    got = stream(gw.v1, "/chat/completions", CHAT)
    assert got[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in got[:-1]]
    assert all("error" not in c for c in chunks), chunks
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == expected_text(PROMPT, 5)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_other_framings_work_with_the_openai_sdk_on_both_endpoints(framed: tuple[Sim, Gateway]) -> None:
    _, gw = framed
    with openai.OpenAI(base_url=gw.v1, api_key="unused", max_retries=0) as client:
        chat = client.chat.completions.create(
            model="tiny", messages=CHAT["messages"], max_tokens=5, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == expected_text(
            PROMPT, 5
        )
        comp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, stream=True)
        assert "".join(c.choices[0].text for c in comp if c.choices) == expected_text(PROMPT, 5)


def test_other_framings_do_not_open_the_healthy_backends_breaker(framed: tuple[Sim, Gateway]) -> None:
    sim, gw = framed
    for _ in range(6):  # one more than breaker_fail_max
        assert stream(gw.v1, "/chat/completions", CHAT)[-1] == b"[DONE]"
    assert circuit_open(gw, f"127.0.0.1:{sim.port}") == 0.0


# ------------------------------------------------------------------ errors in OpenAI's shape
@pytest.fixture(scope="module")
def esim() -> Iterator[Sim]:
    s = Sim(None, "--ttft", "0.01", "--itl", "0.002")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def egw(esim: Sim) -> Iterator[Gateway]:
    g = Gateway([esim.url], env={"GATEWAY_RESILIENCE__BREAKER_FAIL_MAX": "1000"})
    yield g
    g.stop()


@pytest.fixture
def fault(esim: Sim) -> Iterator[Any]:
    yield lambda value: esim.control(fault=value)
    esim.control(fault="")


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
@pytest.mark.parametrize("streamed", [False, True])
def test_max_tokens_past_the_context_is_an_openai_error(egw: Gateway, path: str, streamed: bool) -> None:
    body = {**(CHAT if path == "/chat/completions" else COMP), "max_tokens": 600, "stream": streamed}
    r = httpx.post(egw.v1 + path, json=body, timeout=30)
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert openai_error(r.content) == {
        "message": "max_tokens=600 cannot be greater than max_model_len=512. Please request fewer "
        "output tokens. (parameter=max_tokens, value=600)",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": None,
    }


def test_the_sdk_raises_bad_request_with_vllms_message_and_param(egw: Gateway) -> None:
    with openai.OpenAI(base_url=egw.v1, api_key="unused", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny", messages=CHAT["messages"], max_tokens=600)
        assert info.value.param == "max_tokens" and info.value.code is None
        assert info.value.type == "invalid_request_error"
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="tiny", prompt="word " * 600)
        assert info.value.code == "context_length_exceeded" and info.value.param == "input_tokens"


def test_a_bare_detail_body_is_an_openai_error(egw: Gateway) -> None:
    # A generative vLLM does not mount /v1/embeddings: FastAPI's {"detail": "Not Found"}.
    r = httpx.post(egw.v1 + "/embeddings", json={"model": "tiny", "input": "x"}, timeout=30)
    assert r.status_code == 404
    assert openai_error(r.content) == {
        "message": "Not Found",
        "type": "not_found_error",
        "param": None,
        "code": None,
    }


@pytest.mark.parametrize(
    ("status", "type_"),
    [(400, "invalid_request_error"), (404, "not_found_error"), (422, "invalid_request_error")],
)  # 401, 403, 407 and 429 refuse the gateway, not the client: tests/test_adversary_round3.py
def test_backend_4xx_types_follow_the_status(egw: Gateway, fault: Any, status: int, type_: str) -> None:
    fault(f"status:{status}")
    r = httpx.post(egw.v1 + "/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == status
    assert openai_error(r.content) == {
        "message": "Simulated engine failure",
        "type": type_,
        "param": None,
        "code": None,
    }


def test_backend_5xx_is_a_502_server_error(egw: Gateway, fault: Any) -> None:
    fault("status:500")
    r = httpx.post(egw.v1 + "/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 502
    assert openai_error(r.content) == {
        "message": "The backend failed (500): Simulated engine failure",
        "type": "server_error",
        "param": None,
        "code": "upstream_error",
    }


def test_a_mid_stream_error_event_is_an_openai_error(egw: Gateway, fault: Any) -> None:
    fault("error-event:2")
    got = stream(egw.v1, "/chat/completions", CHAT)
    assert got[-1] == b"[DONE]"
    assert openai_error(got[-2]) == {
        "message": "Simulated engine error mid-stream",
        "type": "server_error",
        "param": None,
        "code": "upstream_error",
    }
    assert all(b'"error"' not in e for e in got[:-2])


def test_the_gateways_own_errors_use_openai_types(egw: Gateway) -> None:
    r = httpx.post(egw.v1 + "/chat/completions", json={**CHAT, "model": "nope"}, timeout=30)
    assert r.status_code == 404
    assert openai_error(r.content)["code"] == "model_not_found"
    dead = Gateway(
        [f"http://127.0.0.1:{_closed_port()}"],
        wait_ready=False,
        env={"GATEWAY_ADMISSION__COLD_START_WAIT": "0.5"},
    )
    try:
        r = httpx.post(dead.v1 + "/chat/completions", json=CHAT, timeout=30)
        assert r.status_code == 503
        err = openai_error(r.content)
        assert err["type"] == "server_error" and isinstance(err["code"], str)
    finally:
        dead.stop()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_non_json_error_body_is_an_openai_error() -> None:
    b = RawBackend(lambda conn: answer(conn, 400, b"<html>400 Bad Request</html>", b"text/html"))
    gw = Gateway([b.url])
    try:
        r = httpx.post(gw.v1 + "/chat/completions", json=CHAT, timeout=30)
        assert r.status_code == 400
        assert openai_error(r.content) == {
            "message": "The backend answered 400.",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    finally:
        gw.stop()
        b.stop()


# ------------------------------------------------------------------ nothing the gateway asked for itself
@pytest.fixture(scope="module")
def fsim() -> Iterator[Sim]:
    s = Sim(None, "--ttft", "0.01", "--itl", "0.002")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def fgw(fsim: Sim) -> Iterator[Gateway]:
    g = Gateway([fsim.url])
    yield g
    g.stop()


def _same_but_ids(payload: bytes) -> Any:
    if payload == b"[DONE]":
        return payload
    chunk = orjson.loads(payload)
    return {k: v for k, v in chunk.items() if k not in ("id", "created")}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat/completions", CHAT),
        ("/completions", COMP),
        ("/chat/completions", {**CHAT, "n": 2}),
        ("/chat/completions", {**CHAT, "stream_options": {"continuous_usage_stats": True}}),
        ("/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}),
        (
            "/chat/completions",
            {**CHAT, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
        ),
    ],
    ids=["chat", "completions", "n2", "continuous-only", "include-usage", "continuous-usage"],
)
def test_the_stream_is_what_vllm_sends_the_client_directly(
    fsim: Sim, fgw: Gateway, path: str, body: dict[str, Any]
) -> None:
    direct = stream(fsim.url + "/v1", path, body)
    through = stream(fgw.v1, path, body)
    assert [_same_but_ids(e) for e in through] == [_same_but_ids(e) for e in direct]


def test_the_fingerprint_sits_where_recorded_vllm_puts_it_without_stream_options(fgw: Gateway) -> None:
    recorded = events((FIXTURES / "vllm-0.32.0-cpu" / "chat_stream.sse").read_bytes())
    through = stream(fgw.v1, "/chat/completions", CHAT)
    assert through[-1] == recorded[-1] == b"[DONE]"
    rec_last, got_last = orjson.loads(recorded[-2]), orjson.loads(through[-2])
    assert list(got_last) == list(rec_last)  # same keys in the same order: the fingerprint last
    assert got_last["system_fingerprint"] == rec_last["system_fingerprint"]
    assert [b"system_fingerprint" in e for e in through] == [b"system_fingerprint" in e for e in recorded]
    assert all(b'"usage"' not in e for e in through)


def _as_with_include_usage(recorded: bytes) -> list[bytes]:
    """The recorded no-options stream as vLLM sends it with include_usage (the gateway's request):
    the fingerprint moves from the terminal chunk to a usage chunk before [DONE]."""
    out = [e + b"\n\n" for e in recorded.split(b"\n\n") if e]
    terminal = orjson.loads(out[-2][6:])
    fingerprint = terminal.pop("system_fingerprint")
    usage = {
        **{k: terminal[k] for k in ("id", "object", "created", "model")},
        "choices": [],
        "usage": {"prompt_tokens": 13, "total_tokens": 18, "completion_tokens": 5},
        "system_fingerprint": fingerprint,
    }
    out[-2] = b"data: " + orjson.dumps(terminal) + b"\n\n"
    return [*out[:-1], b"data: " + orjson.dumps(usage) + b"\n\n", out[-1]]


@pytest.mark.parametrize("together", [False, True], ids=["usage-in-its-own-read", "usage-with-terminal"])
def test_stripping_the_usage_chunk_gives_back_vllms_exact_bytes(together: bool) -> None:
    recorded = (FIXTURES / "vllm-0.32.0-cpu" / "chat_stream.sse").read_bytes()
    events_ = _as_with_include_usage(recorded)
    if together:
        events_ = [*events_[:-3], b"".join(events_[-3:-1]), events_[-1]]

    def on_post(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(SSE_HEAD)
        for e in events_:
            conn.sendall(chunk(e))
            time.sleep(0.02)  # the backend's pace: separate reads at the gateway
        conn.sendall(b"0\r\n\r\n")

    b = RawBackend(on_post)
    gw = Gateway([b.url])
    try:
        with httpx.stream(
            "POST", gw.v1 + "/chat/completions", json={**CHAT, "stream": True}, timeout=30
        ) as r:
            assert r.read() == recorded
    finally:
        gw.stop()
        b.stop()
