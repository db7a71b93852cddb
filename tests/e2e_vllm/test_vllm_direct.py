"""Sanity checks straight against the real vLLM server (no gateway involved).

They prove the e2e infrastructure works: the server starts, serves the tiny model,
answers plain and streamed chat completions, and behaves as docs/vllm-cpu-e2e.md says.
"""

from __future__ import annotations

import json
import re
import uuid

import httpx
import pytest


@pytest.fixture(scope="module")
def client(vllm_server):
    with httpx.Client(base_url=vllm_server.url, timeout=60, trust_env=False) as c:
        yield c


def _chat_body(model: str, **extra) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 5}
    body.update(extra)
    return body


def _sse_data(lines) -> list[str]:
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200


def test_models_lists_tiny(client, vllm_server):
    r = client.get("/v1/models")
    assert r.status_code == 200
    ids = [m["id"] for m in r.json()["data"]]
    assert ids == [vllm_server.model]
    assert r.json()["data"][0]["max_model_len"] == 512


def test_chat_completion(client, vllm_server):
    r = client.post("/v1/chat/completions", json=_chat_body(vllm_server.model))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == vllm_server.model
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5


def test_chat_completion_stream_with_usage(client, vllm_server):
    body = _chat_body(vllm_server.model, stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        data = _sse_data(r.iter_lines())
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5
    finish = [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"]]
    assert finish[-1] == "length"


def test_request_id_header_is_used_and_echoed(client, vllm_server):
    rid = f"e2e-{uuid.uuid4().hex[:12]}"
    r = client.post("/v1/chat/completions", json=_chat_body(vllm_server.model), headers={"X-Request-Id": rid})
    assert r.status_code == 200
    assert r.headers.get("x-request-id") == rid  # needs --enable-request-id-headers
    assert r.json()["id"] == f"chatcmpl-{rid}"


def _finished_count(server, reason: str) -> float:
    pattern = (
        r"^vllm:request_success_total\{[^}]*finished_reason=\"" + re.escape(reason) + r"\"[^}]*\} (\S+)$"
    )
    m = re.search(pattern, server.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def test_client_disconnect_aborts_request(vllm_server):
    """Closing a stream early makes vLLM abort the request (visible in its log only:
    client aborts are NOT counted in vllm:request_success_total{finished_reason="abort"}).

    On this 2-core machine a busy CPU can starve vLLM's API server so that a 480-token
    stream is delivered in one burst at the end; then the client's disconnect comes too
    late to abort anything. Such a lost race is detected (the request counts as
    finished_reason="length") and retried.
    """
    for _attempt in range(3):
        rid = f"e2e-abort-{uuid.uuid4().hex[:12]}"
        offset = vllm_server.log_offset()
        finished_before = _finished_count(vllm_server, "length")
        body = _chat_body(vllm_server.model, max_tokens=480, ignore_eos=True, stream=True)
        with (
            httpx.Client(base_url=vllm_server.url, timeout=60, trust_env=False) as c,
            c.stream("POST", "/v1/chat/completions", json=body, headers={"X-Request-Id": rid}) as r,
        ):
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # leave mid-stream; closing the client drops the socket
        line = vllm_server.wait_for_log(f"Aborted request(s) chatcmpl-{rid}-", timeout=10, offset=offset)
        if line is not None:
            assert vllm_server.wait_for_log(f"Request chatcmpl-{rid} aborted.", timeout=5, offset=offset)
            return
        # Lost the race: generation had already finished when vLLM saw the disconnect.
        assert _finished_count(vllm_server, "length") > finished_before, (
            "request neither aborted nor finished:\n" + vllm_server.log_tail(30)
        )
    pytest.fail("vLLM finished the request before seeing the disconnect 3 times in a row (machine too busy?)")
