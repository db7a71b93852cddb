"""The OpenAI SDK through the gateway in front of REAL vLLM (CPU build, tiny random model).

The module starts its own vLLM *after* the gateway, so readiness during model
loading is observed for real (vLLM refuses connections until it is loaded).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e_vllm.conftest import (
    REQUIRED,
    VLLMServer,
    _free_port,
    _missing_prerequisites,
    _stop,
    start_vllm_server,
)
from tests.procs import Gateway

MSG = [{"role": "user", "content": "Hello there, how are you?"}]


class Stack:
    def __init__(self, gw: Gateway, vllm: VLLMServer, loading_seen: list[dict[str, Any]]) -> None:
        self.gw = gw
        self.vllm = vllm
        self.loading_seen = loading_seen
        self.client = openai.OpenAI(base_url=gw.v1, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    reason = _missing_prerequisites()
    if reason is not None:
        if REQUIRED:
            pytest.fail(f"E2E_VLLM_REQUIRED=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    port = _free_port()
    gw = Gateway([f"http://127.0.0.1:{port}"], wait_ready=False)
    seen: list[dict[str, Any]] = []
    stop_probing = threading.Event()

    def probe() -> None:
        # While vLLM loads, the gateway is live but not ready, and says why.
        while not stop_probing.is_set():
            try:
                r = httpx.get(gw.url + "/ready", timeout=5)
                health = httpx.get(gw.url + "/health", timeout=5).json()
                seen.append({"ready": r.status_code, "state": health["backends"][0]["state"]})
            except httpx.HTTPError as exc:
                seen.append({"error": repr(exc)})
            stop_probing.wait(1)

    # vLLM is started from the main thread: its PR_SET_PDEATHSIG follows the starting thread.
    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    server: VLLMServer | None = None
    try:
        try:
            server = start_vllm_server(Path(tmp_path_factory.mktemp("vllm-gw")), port=port)
        finally:
            stop_probing.set()
            prober.join()
        deadline = time.monotonic() + 30
        while httpx.get(gw.url + "/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        yield Stack(gw, server, seen)
    finally:
        gw.stop()
        if server is not None:
            _stop(server.proc)


def test_readiness_while_vllm_loads(stack: Stack) -> None:
    assert stack.loading_seen, "vLLM became healthy before the gateway was probed"
    first = stack.loading_seen[0]
    assert first["ready"] == 503
    assert first["state"] == "loading"
    r = httpx.get(stack.gw.url + "/ready")
    direct = httpx.get(stack.vllm.url + "/health").status_code
    assert r.status_code == 200, (r.text, stack.vllm.url, direct, stack.loading_seen)
    assert httpx.get(stack.gw.url + "/live").status_code == 200


def test_models_through_gateway(stack: Stack) -> None:
    models = stack.client.models.list()
    assert [m.id for m in models] == ["tiny"]


def test_chat_plain_and_usage(stack: Stack) -> None:
    r = stack.client.chat.completions.create(model="tiny", messages=MSG, max_tokens=5)  # type: ignore[arg-type]
    assert r.object == "chat.completion"
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert r.usage.completion_tokens == 5


def test_chat_stream_usage_accounted_and_stripped(stack: Stack) -> None:
    before = _completion_tokens(stack.gw)
    chunks = list(
        stack.client.chat.completions.create(model="tiny", messages=MSG, max_tokens=7, stream=True)  # type: ignore[arg-type]
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)
    # The gateway read vLLM's usage chunk it asked for: exact token count, not an estimate.
    assert _completion_tokens(stack.gw) - before == 7


def test_chat_stream_with_client_usage(stack: Stack) -> None:
    chunks = list(
        stack.client.chat.completions.create(
            model="tiny",
            messages=MSG,  # type: ignore[arg-type]
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


def test_completions_plain_and_stream(stack: Stack) -> None:
    r = stack.client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5)
    assert r.usage is not None
    assert r.usage.completion_tokens == 5
    parts = list(stack.client.completions.create(model="tiny", prompt="Once upon", max_tokens=5, stream=True))
    assert parts[-1].choices[0].finish_reason == "length"


async def test_async_sdk(stack: Stack) -> None:
    c = openai.AsyncOpenAI(base_url=stack.gw.v1, api_key="x", max_retries=0, timeout=120)
    try:
        r = await c.chat.completions.create(model="tiny", messages=MSG, max_tokens=3)  # type: ignore[arg-type]
        assert r.usage is not None
        assert r.usage.completion_tokens == 3
    finally:
        await c.close()


def test_vllm_400_passes_through_intact(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        stack.client.chat.completions.create(model="tiny", messages=MSG, max_tokens=600)  # type: ignore[arg-type]
    assert info.value.status_code == 400
    assert info.value.body["message"].startswith(  # type: ignore[index]
        "max_tokens=600 cannot be greater than max_model_len=512."
    )


def test_vllm_errors_reach_the_client_in_openais_shape(stack: Stack) -> None:
    # vLLM's own body has "type": "BadRequestError" and an integer code; OpenAI's spec has one
    # of its error types and a string or null code. Message and param are vLLM's.
    r = httpx.post(
        stack.gw.v1 + "/chat/completions",
        json={"model": "tiny", "messages": MSG, "max_tokens": 600},
        timeout=60,
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["code"] is None or isinstance(err["code"], str)
    assert err["message"].startswith("max_tokens=600 cannot be greater than max_model_len=512.")


def _stream_chunks(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [orjson.loads(x) for x in lines[:-1]]


def test_a_stream_without_stream_options_is_what_vllm_sends_directly(stack: Stack) -> None:
    # The gateway asks vLLM for usage (exact accounting) and strips that chunk; the client must
    # still get what a direct call gives: the system_fingerprint, and no usage anywhere.
    body = {"model": "tiny", "messages": MSG, "max_tokens": 4, "stream": True, "ignore_eos": True}
    direct = _stream_chunks(stack.vllm.url, body)
    through = _stream_chunks(stack.gw.url, body)

    def shape(chunks: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [
            (
                sorted(k for k in c if k not in ("id", "created")),
                c.get("system_fingerprint"),
                [ch.get("finish_reason") for ch in c["choices"]],
                c.get("usage"),
            )
            for c in chunks
        ]

    assert shape(through) == shape(direct)


def test_gateway_rejects_what_vllm_would_accept(stack: Stack) -> None:
    # vLLM's chat template renders any role; the gateway refuses before the GPU sees it.
    with pytest.raises(openai.BadRequestError) as info:
        stack.client.chat.completions.create(model="tiny", messages=[{"role": "bogus", "content": "x"}])  # type: ignore[misc,list-item]
    assert info.value.body["param"] == "messages.0.role"  # type: ignore[index]


def test_client_disconnect_aborts_in_vllm(stack: Stack) -> None:
    # On two busy cores vLLM may finish 480 tokens before the disconnect lands; retry then.
    for attempt in range(4):
        rid = f"gw-e2e-abort-{attempt}-{time.time_ns()}"
        offset = stack.vllm.log_offset()
        with httpx.stream(
            "POST",
            stack.gw.v1 + "/chat/completions",
            json={
                "model": "tiny",
                "messages": MSG,
                "max_tokens": 480,
                "ignore_eos": True,
                "stream": True,
            },
            headers={"X-Request-Id": rid},
            timeout=60,
        ) as r:
            assert r.status_code == 200
            it = r.iter_raw()
            next(it)
        line = stack.vllm.wait_for_log(f"Aborted request(s) chatcmpl-{rid}", timeout=5, offset=offset)
        if line is not None:
            return
    pytest.fail("vLLM never logged an abort for a disconnected stream:\n" + stack.vllm.log_tail(30))


def _completion_tokens(gw: Gateway) -> float:
    text = httpx.get(gw.url + "/metrics").text
    for fam in text_string_to_metric_families(text):
        if fam.name == "gateway_completion_tokens":
            return sum(s.value for s in fam.samples if s.name.endswith("_total"))
    return 0.0


def test_batch_and_async_job_on_real_vllm(stack: Stack, tmp_path: Path) -> None:
    """The whole Batch API flow with the SDK, and a 202 + poll job, executed by real vLLM."""
    from tests.jobs_helpers import ALICE, chat_lines, jobs_config, jsonl, poll

    path, _ = jobs_config(tmp_path)
    gw = Gateway([stack.vllm.url], config=path)
    try:
        c = openai.OpenAI(base_url=gw.v1, api_key=ALICE, max_retries=0, timeout=120)
        data = chat_lines(12, max_tokens=8) + (
            b'{"custom_id": "too-long", "method": "POST", "url": "/v1/chat/completions", "body": '
            b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}}\n'
        )
        f = c.files.create(file=("in.jsonl", data), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert [x.id for x in c.batches.list().data] == [b.id]
        done = poll(
            lambda: c.batches.retrieve(b.id),
            lambda x: x.status in ("completed", "failed", "expired", "cancelled"),
            300,
            "batch on vLLM",
        )
        assert done.status == "completed", done
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (12, 1)
        out = jsonl(c.files.content(done.output_file_id or "").content)
        assert sorted(x["custom_id"] for x in out) == sorted(f"req-{i}" for i in range(12))
        for x in out:
            body = x["response"]["body"]
            assert body["model"] == "tiny" and body["usage"]["completion_tokens"] >= 1
        errs = jsonl(c.files.content(done.error_file_id or "").content)
        assert [e["custom_id"] for e in errs] == ["too-long"]
        assert errs[0]["response"]["status_code"] == 400  # vLLM's own refusal, kept
        assert errs[0]["response"]["body"]["error"]["type"] == "invalid_request_error"
        # 202 + poll for one request
        r = httpx.post(
            gw.v1 + "/chat/completions",
            json={"model": "tiny", "messages": MSG, "max_tokens": 6},
            headers={"Authorization": f"Bearer {ALICE}", "Prefer": "respond-async"},
        )
        assert r.status_code == 202, r.text
        job = poll(
            lambda: httpx.get(
                gw.url + r.headers["location"], headers={"Authorization": f"Bearer {ALICE}"}
            ).json(),
            lambda j: j["status"] in ("completed", "failed"),
            120,
            "job on vLLM",
        )
        assert job["response"]["status_code"] == 200
        assert job["response"]["body"]["object"] == "chat.completion"
    finally:
        gw.stop()


def test_response_cache_on_real_vllm(stack: Stack, tmp_path: Path) -> None:
    """Real vLLM's answers stored and served in both forms: a stream replayed byte for byte, a
    stream folded into one body, a body cut into chunks (the SDK parses each)."""
    from tests.jobs_helpers import ALICE, poll
    from tests.test_cache import cache_config

    gw = Gateway([stack.vllm.url], config=cache_config(tmp_path))
    try:
        c = openai.OpenAI(base_url=gw.v1, api_key=ALICE, max_retries=0, timeout=120)
        h = {"Authorization": f"Bearer {ALICE}"}
        body: dict[str, Any] = {"model": "tiny", "messages": MSG, "max_tokens": 8, "temperature": 0}

        def post(b: dict[str, Any]) -> httpx.Response:
            return httpx.post(gw.v1 + "/chat/completions", json=b, headers=h, timeout=120)

        first = post({**body, "stream": True})
        assert first.headers["x-gateway-cache"] == "miss"
        replay = poll(
            lambda: post({**body, "stream": True}),
            lambda r: r.headers["x-gateway-cache"] == "hit",
            30,
            "the stream stored",
        )
        assert replay.content == first.content
        text = "".join(
            ch["choices"][0]["delta"].get("content") or ""
            for ch in (orjson.loads(e[6:]) for e in first.content.split(b"\n\n") if e.startswith(b"data: {"))
            if ch["choices"]
        )
        folded = c.chat.completions.with_raw_response.create(
            model="tiny", messages=MSG, max_tokens=8, temperature=0
        )  # type: ignore[arg-type]
        assert folded.headers["x-gateway-cache"] == "hit"
        assert folded.parse().choices[0].message.content == text
        # A plain answer first, then served as a stream.
        other = [{"role": "user", "content": "Name three colours."}]
        plain = c.chat.completions.create(model="tiny", messages=other, max_tokens=8, temperature=0)  # type: ignore[arg-type]

        def streamed() -> tuple[str, str]:
            raw = c.chat.completions.with_raw_response.create(
                model="tiny",
                messages=other,  # type: ignore[arg-type]
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = list(raw.parse())
            assert chunks[-1].usage is not None
            return raw.headers["x-gateway-cache"], "".join(
                ch.choices[0].delta.content or "" for ch in chunks if ch.choices
            )

        _, cut = poll(streamed, lambda r: r[0] == "hit", 30, "the plain answer as a stream")
        assert cut == plain.choices[0].message.content
    finally:
        gw.stop()
