"""Blame reaches the audit line, odd backend answers are blamed on the backend, a content-logging
team survives a backend's malformed message, and a connect timeout may go to another replica."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from gateway.backends import Backend
from gateway.config import BackendSettings, ResilienceSettings, TimeoutSettings
from gateway.errors import UpstreamTimeout
from gateway.pipeline.upstream import UpstreamClient
from tests.procs import Gateway, Sim
from tests.rawbackend import RawBackend, answer

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    s = Sim(None, "--ttft", "0.01", "--itl", "0.001", "--max-model-len", "64")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gw(sim: Sim) -> Iterator[Gateway]:
    g = Gateway([sim.url])
    yield g
    g.stop()


def _post(gw: Gateway, rid: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(gw.v1 + "/chat/completions", json=body, headers={"x-request-id": rid}, timeout=10)


def test_the_audit_line_names_who_caused_each_outcome(gw: Gateway) -> None:
    ok = _post(gw, "fault-ok", BODY)
    assert ok.status_code == 200
    assert gw.wait_audit("fault-ok")["fault"] is None
    too_long = _post(gw, "fault-4xx", BODY | {"max_tokens": 600})  # past vLLM's context: vLLM's 400
    assert too_long.status_code == 400
    assert gw.wait_audit("fault-4xx")["fault"] == "client"
    invalid = _post(gw, "fault-invalid", {"model": "tiny"})  # the gateway's own validation
    assert invalid.status_code == 400
    assert gw.wait_audit("fault-invalid")["fault"] == "client"


def test_a_backend_redirect_is_the_backends_fault_not_the_clients() -> None:
    def redirect(conn: socket.socket) -> None:
        answer(conn, 302, b"moved")

    raw = RawBackend(redirect)
    gw = Gateway([raw.url])
    try:
        r = _post(gw, "fault-302", BODY)
        assert r.status_code == 502
        assert r.json()["error"]["type"] == "server_error"
        audit = gw.wait_audit("fault-302")
        assert (audit["error_reason"], audit["fault"]) == ("upstream_error", "backend")
    finally:
        gw.stop()
        raw.stop()


def test_content_logging_survives_a_backend_message_that_is_not_an_object(tmp_path: Path) -> None:
    def odd(conn: socket.socket) -> None:
        body = {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": "text"}]}
        answer(conn, 200, orjson.dumps(body | {"usage": {"prompt_tokens": 1, "completion_tokens": 1}}))

    raw = RawBackend(odd)
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "auth": {"api_keys": [{"key": "sk-log-content-test-key-0001", "subject": "a", "team": "t"}]},
                "teams": {"t": {"log_content": True}},
            }
        )
    )
    gw = Gateway([raw.url], config=cfg)
    try:
        r = httpx.post(
            gw.v1 + "/chat/completions",
            json=BODY,
            headers={"authorization": "Bearer sk-log-content-test-key-0001", "x-request-id": "odd-msg"},
            timeout=10,
        )
        assert r.status_code == 200
        assert gw.wait_audit("odd-msg")["status"] == 200
        assert "internal error" not in gw.proc.output()
    finally:
        gw.stop()
        raw.stop()


async def test_a_connect_timeout_may_go_to_another_replica() -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, so connecting hangs.
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        client = UpstreamClient(TimeoutSettings(connect=0.3))
        backend = Backend.from_settings(BackendSettings(url=f"http://127.0.0.1:{port}"), ResilienceSettings())
        try:
            with pytest.raises(UpstreamTimeout) as caught:
                await asyncio.wait_for(client.post(backend, b"/v1/chat/completions", b"{}", "rid"), 10)
        finally:
            await client.close()
        assert caught.value.code == "upstream_connect_timeout"
        assert caught.value.retryable
    finally:
        for s in fillers:
            s.close()
        full.close()
