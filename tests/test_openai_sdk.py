"""The official OpenAI SDK, sync and async, plain and streamed, through the gateway."""

from __future__ import annotations

import httpx
import openai
import pytest

from gateway.sim.engine import expected_text
from tests.procs import Gateway, Sim

MSG = [{"role": "user", "content": "alpha beta gamma"}]


def test_models_lists_backend_models(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert ids == {"tiny", "embed-small"}
    assert client.models.retrieve("tiny").owned_by == "vllm"


def test_chat_plain(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=5)  # type: ignore[arg-type]
    assert r.choices[0].message.content == expected_text("alpha beta gamma", 5)
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 5 and r.usage.prompt_tokens > 0


def test_chat_stream_strips_usage_the_client_did_not_ask_for(client: openai.OpenAI, sim: Sim) -> None:
    chunks = list(
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, stream=True)  # type: ignore[arg-type]
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text("alpha beta gamma", 4)
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)  # no usage-only chunk leaked
    # ...but the gateway asked vLLM for usage, for its own accounting.
    sent = sim.stats()["requests"][-1]["body"]
    assert sent["stream_options"] == {"include_usage": True}


def test_chat_stream_with_usage_when_asked(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MSG,  # type: ignore[arg-type]
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_completions_plain_and_stream(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt="one two", max_tokens=3)
    assert r.choices[0].text == expected_text("one two", 3)
    stream = client.completions.create(model="tiny", prompt="one two", max_tokens=3, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected_text("one two", 3)


def test_embeddings_pass_through(client: openai.OpenAI) -> None:
    r = client.embeddings.create(model="embed-small", input=["a b", "c"])
    assert len(r.data) == 2 and len(r.data[0].embedding) == 16


def test_vllm_extra_fields_pass_through_untouched(client: openai.OpenAI, sim: Sim) -> None:
    extra = {
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
        "guided_json": {"type": "object"},
        "chat_template_kwargs": {"enable_thinking": False},
        "priority": 3,
    }
    client.chat.completions.create(model="tiny", messages=MSG, max_tokens=1, extra_body=extra)  # type: ignore[arg-type]
    sent = sim.stats()["requests"][-1]["body"]
    for key, value in extra.items():
        assert sent[key] == value


async def test_async_sdk_plain_and_stream(aclient: openai.AsyncOpenAI) -> None:
    r = await aclient.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)  # type: ignore[arg-type]
    assert r.choices[0].message.content == expected_text("alpha beta gamma", 2)
    stream = await aclient.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, stream=True)  # type: ignore[arg-type]
    parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(parts) == expected_text("alpha beta gamma", 6)


def test_request_id_echoed_and_unique_upstream(http: httpx.Client, sim: Sim) -> None:
    body = {"model": "tiny", "messages": MSG, "max_tokens": 1}
    ids = []
    for _ in range(2):
        r = http.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "client-abc-1"})
        assert r.status_code == 200
        assert r.headers["x-request-id"] == "client-abc-1"
        ids.append(sim.stats()["requests"][-1]["x_request_id"])
    assert ids[0] != ids[1] and all(i.startswith("client-abc-1") for i in ids)
    r = http.post("/v1/chat/completions", json=body)
    generated = r.headers["x-request-id"]
    assert len(generated) >= 16
    r = http.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "bad id\twith spaces"})
    assert r.headers["x-request-id"] != "bad id\twith spaces"


def test_client_authorization_never_goes_upstream(http: httpx.Client, sim: Sim) -> None:
    r = http.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": MSG, "max_tokens": 1},
        headers={"Authorization": "Bearer sk-client-secret"},
    )
    assert r.status_code == 200
    assert sim.stats()["requests"][-1]["authorization"] is None


def test_backend_api_key_is_sent_upstream() -> None:
    sim = Sim(None, "--api-key", "backend-key")
    try:
        gw = Gateway([], env={"GATEWAY_BACKENDS": f'[{{"url": "{sim.url}", "api_key": "backend-key"}}]'})
        try:
            c = openai.OpenAI(base_url=gw.v1, api_key="client", max_retries=0)
            r = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=1)  # type: ignore[arg-type]
            assert r.choices[0].message.content
            assert sim.stats()["requests"][-1]["authorization"] == "Bearer backend-key"
        finally:
            gw.stop()
    finally:
        sim.stop()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_get_on_post_endpoint_is_405(http: httpx.Client, path: str) -> None:
    for method in ("GET", "OPTIONS", "PUT", "DELETE"):  # OPTIONS was a 404 naming no path
        r = http.request(method, path)
        assert r.status_code == 405, (method, r.text)
        assert r.json()["error"]["code"] == "method_not_allowed"
        assert r.headers["allow"] == "POST"


def test_unknown_path_is_openai_shaped_404(http: httpx.Client) -> None:
    r = http.get("/v1/nope")
    assert r.status_code == 404
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_sdk_against_gateway_with_multiple_backends(sim: Sim) -> None:
    other = Sim(None, "--model", "tiny")
    try:
        gw = Gateway([sim.url, other.url])
        try:
            c = openai.OpenAI(base_url=gw.v1, api_key="x", max_retries=0)
            for _ in range(6):
                c.chat.completions.create(model="tiny", messages=MSG, max_tokens=1)  # type: ignore[arg-type]
            health = httpx.get(gw.url + "/health").json()
            assert [b["state"] for b in health["backends"]] == ["healthy", "healthy"]
        finally:
            gw.stop()
    finally:
        other.stop()
