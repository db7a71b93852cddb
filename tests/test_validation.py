"""Every validation error path of the gateway, through real gateway and simulator processes.

Each rejection must be an OpenAI-shaped error (``{"error": {"message", "type", "param", "code"}}``)
with the right status and a useful ``param``, must make the OpenAI SDK raise the matching exception
class, and must never reach the backend. Errors that vLLM itself produces (the simulator speaks
vLLM 0.32.0's wording) must reach the client untouched.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.sim.engine import expected_text
from tests.procs import Gateway, Sim

FIXTURES = Path(__file__).parent / "fixtures" / "vllm-0.32.0-cpu"
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
EMB = "/v1/embeddings"
MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "alpha beta"}]
OK_CHAT: dict[str, Any] = {"model": "tiny", "messages": MSG, "max_tokens": 2}
ERROR_KEYS = ["message", "type", "param", "code"]
STREAM_OPTIONS_MSG = "Stream options can only be defined when `stream=True`."


def chat(**fields: Any) -> dict[str, Any]:
    return {**OK_CHAT, **fields}


def without(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


@dataclass(frozen=True)
class Case:
    id: str
    path: str
    body: dict[str, Any] | bytes
    status: int
    param: str | None
    message: str = ""  # a substring the message must contain


CASES = [
    # --- the body itself
    Case("invalid-json", CHAT, b'{"model": "tiny", "messages": [', 400, None, "not valid JSON"),
    Case("invalid-json-bare-word", CHAT, b"{bad", 400, None, "not valid JSON"),
    Case("empty-body", CHAT, b"", 400, None, "not valid JSON"),
    Case("body-array", CHAT, b'[{"model": "tiny"}]', 400, None, "JSON object"),
    Case("body-string", CHAT, b'"hello"', 400, None, "JSON object"),
    Case("body-number", CHAT, b"42", 400, None, "JSON object"),
    Case("body-null", CHAT, b"null", 400, None, "JSON object"),
    Case("nan-literal", CHAT, b'{"model": "tiny", "temperature": NaN}', 400, None, "not valid JSON"),
    # --- model
    Case("model-missing", CHAT, without(OK_CHAT, "model"), 400, "model", "model"),
    Case("model-not-string", CHAT, chat(model=5), 400, "model", "string"),
    Case("model-list", CHAT, chat(model=["tiny"]), 400, "model"),
    Case("model-empty", CHAT, chat(model=""), 400, "model"),
    Case("model-unknown", CHAT, chat(model="nope"), 404, "model", "`nope` does not exist"),
    Case("model-unknown-completions", COMP, {"model": "nope", "prompt": "x"}, 404, "model", "nope"),
    Case("model-unknown-embeddings", EMB, {"model": "nope", "input": "x"}, 404, "model", "nope"),
    # --- messages
    Case("messages-missing", CHAT, without(OK_CHAT, "messages"), 400, "messages", "required"),
    Case("messages-empty", CHAT, chat(messages=[]), 400, "messages"),
    Case("messages-not-a-list", CHAT, chat(messages="hello"), 400, "messages", "list"),
    Case("messages-object", CHAT, chat(messages={"role": "user", "content": "x"}), 400, "messages"),
    Case("message-not-an-object", CHAT, chat(messages=["hello"]), 400, "messages.0"),
    Case(
        "message-bad-role", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role"
    ),
    Case("message-no-role", CHAT, chat(messages=[{"content": "x"}]), 400, "messages.0.role"),
    Case(
        "message-second-bad-role",
        CHAT,
        chat(messages=[*MSG, {"role": 7, "content": "x"}]),
        400,
        "messages.1.role",
    ),
    Case("message-no-content", CHAT, chat(messages=[{"role": "user"}]), 400, "messages.0", "content"),
    Case("content-int", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages.0.content"),
    Case(
        "content-object",
        CHAT,
        chat(messages=[{"role": "user", "content": {"text": "x"}}]),
        400,
        "messages.0.content",
    ),
    Case(
        "content-part-no-type",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"text": "x"}]}]),
        400,
        "messages.0.content",
    ),
    # --- max_tokens / max_completion_tokens
    Case("max-tokens-zero", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    Case("max-tokens-negative", CHAT, chat(max_tokens=-1), 400, "max_tokens"),
    Case("max-tokens-string", CHAT, chat(max_tokens="5"), 400, "max_tokens"),
    Case("max-tokens-float", CHAT, chat(max_tokens=5.5), 400, "max_tokens"),
    Case("max-tokens-bool", CHAT, chat(max_tokens=True), 400, "max_tokens"),
    Case("max-tokens-above-ceiling", CHAT, chat(max_tokens=32769), 400, "max_tokens", "32768"),
    Case("max-tokens-huge", CHAT, chat(max_tokens=10**12), 400, "max_tokens", "32768"),
    Case("max-completion-tokens-zero", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    Case(
        "max-completion-tokens-above-ceiling",
        CHAT,
        chat(max_completion_tokens=40000),
        400,
        "max_completion_tokens",
        "32768",
    ),
    Case(
        "completions-max-tokens-above-ceiling",
        COMP,
        {"model": "tiny", "prompt": "x", "max_tokens": 32769},
        400,
        "max_tokens",
        "32768",
    ),
    # --- sampling
    Case("temperature-negative", CHAT, chat(temperature=-1), 400, "temperature"),
    Case("temperature-too-high", CHAT, chat(temperature=2.5), 400, "temperature"),
    Case("temperature-string", CHAT, chat(temperature="hot"), 400, "temperature"),
    Case("top-p-zero", CHAT, chat(top_p=0), 400, "top_p"),
    Case("top-p-too-high", CHAT, chat(top_p=1.5), 400, "top_p"),
    Case("n-zero", CHAT, chat(n=0), 400, "n"),
    Case("n-above-max", CHAT, chat(n=9), 400, "n", "8"),
    Case("n-string", CHAT, chat(n="2"), 400, "n"),
    Case("stop-too-many", CHAT, chat(stop=[f"s{i}" for i in range(17)]), 400, "stop", "16"),
    Case("stop-int", CHAT, chat(stop=5), 400, "stop"),
    Case("stop-list-of-ints", CHAT, chat(stop=[1, 2]), 400, "stop"),
    Case(
        "completions-stop-too-many", COMP, {"model": "tiny", "prompt": "x", "stop": ["a"] * 17}, 400, "stop"
    ),
    # --- streaming flags
    Case(
        "stream-not-bool",
        CHAT,
        chat(stream="yes"),
        400,
        "stream",
        "boolean",
    ),
    Case("stream-int", CHAT, chat(stream=1), 400, "stream"),
    Case(
        "stream-options-without-stream",
        CHAT,
        chat(stream_options={"include_usage": True}),
        400,
        "stream_options",
        STREAM_OPTIONS_MSG,
    ),
    Case(
        "stream-options-with-stream-false",
        COMP,
        {"model": "tiny", "prompt": "x", "stream": False, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
        STREAM_OPTIONS_MSG,
    ),
    Case(
        "stream-options-not-object",
        CHAT,
        chat(stream=True, stream_options=[1]),
        400,
        "stream_options",
    ),
    Case(
        "stream-options-include-usage-not-bool",
        CHAT,
        chat(stream=True, stream_options={"include_usage": "yes"}),
        400,
        "stream_options.include_usage",
    ),
    Case("embeddings-stream", EMB, {"model": "embed-small", "input": "x", "stream": True}, 400, "stream"),
    # --- completions and embeddings
    Case("prompt-missing", COMP, {"model": "tiny"}, 400, "prompt", "required"),
    Case(
        "prompt-empty-string",
        COMP,
        {"model": "tiny", "prompt": ""},
        400,
        "prompt",
        "empty",
    ),
    Case(
        "prompt-empty-list",
        COMP,
        {"model": "tiny", "prompt": []},
        400,
        "prompt",
        "empty",
    ),
    Case("prompt-int", COMP, {"model": "tiny", "prompt": 5}, 400, "prompt"),
    Case("prompt-mixed-list", COMP, {"model": "tiny", "prompt": ["a", 1]}, 400, "prompt"),
    Case("completions-model-missing", COMP, {"prompt": "x"}, 400, "model"),
    Case("embeddings-input-missing", EMB, {"model": "embed-small"}, 400, "input", "required"),
    Case("embeddings-input-int", EMB, {"model": "embed-small", "input": 5}, 400, "input"),
    Case("embeddings-model-missing", EMB, {"input": "x"}, 400, "model"),
]

SDK_ERRORS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError,
    404: openai.NotFoundError,
}


def _post(http: httpx.Client, path: str, body: dict[str, Any] | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return http.post(path, content=content, headers={"content-type": "application/json"})


def assert_error_shape(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["error"], body
    err: dict[str, Any] = body["error"]
    assert list(err) == ERROR_KEYS, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)  # OpenAI: a string or null
    return err


@pytest.fixture
def received(sim: Sim) -> Iterator[Any]:
    """How many generation requests reached the simulator since the test began."""
    start = sim.stats()["received"]
    yield lambda: sim.stats()["received"] - start


# --------------------------------------------------------------------------- rejections
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_gateway_rejects_with_openai_error(http: httpx.Client, received: Any, case: Case) -> None:
    r = _post(http, case.path, case.body)
    err = assert_error_shape(r, case.status)
    assert err["type"] == "invalid_request_error"
    assert case.message.lower() in err["message"].lower()
    assert r.headers.get("x-request-id")
    assert err["param"] == case.param, err
    assert received() == 0, "a request the gateway rejects must not reach the backend"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_sdk_raises_the_matching_class(client: openai.OpenAI, case: Case) -> None:
    path = case.path.removeprefix("/v1")
    with pytest.raises(openai.APIStatusError) as info:
        if isinstance(case.body, bytes):
            client.post(path, cast_to=httpx.Response, content=case.body)
        else:
            client.post(path, cast_to=httpx.Response, body=case.body)
    assert type(info.value) is SDK_ERRORS[case.status]
    assert info.value.status_code == case.status
    assert info.value.type == "invalid_request_error" and isinstance(info.value.code, str)
    assert info.value.param == case.param


def test_sdk_typed_calls_raise(client: openai.OpenAI, received: Any) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=MSG)
    assert nf.value.param == "model" and nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=0)
    assert bad.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=MSG, temperature=-1)
    assert bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=[], n=1)
    assert bad.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt="x", max_tokens=40000)
    assert bad.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="tiny",
            messages=MSG,
            stream_options={"include_usage": True},
        )
    assert STREAM_OPTIONS_MSG in bad.value.message
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
    assert received() == 0


# --------------------------------------------------------------------------- boundaries accepted
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 0),
        ("temperature", 2),
        ("temperature", 0.7),
        ("top_p", 1),
        ("top_p", 0.01),
        ("n", 8),
        ("n", 1),
        ("max_tokens", 1),
        ("max_completion_tokens", 3),
        ("stop", [f"s{i}" for i in range(16)]),
        ("stop", "s"),
        ("stop", None),
        ("stream", False),
    ],
)
def test_boundary_values_are_accepted(http: httpx.Client, received: Any, field: str, value: Any) -> None:
    r = _post(http, CHAT, chat(**{field: value}))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    assert received() == 1


def test_accepted_values_through_the_sdk(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny",
        messages=MSG,
        temperature=2,
        top_p=1,
        n=8,
        max_tokens=3,
        stop=[f"s{i}" for i in range(16)],
    )
    assert len(r.choices) == 8
    assert r.choices[0].message.content == expected_text("alpha beta", 3)
    r2 = client.completions.create(model="tiny", prompt="one", temperature=0, max_tokens=2)
    assert r2.choices[0].text == expected_text("one", 2)
    e = client.embeddings.create(model="embed-small", input=["a"])
    assert len(e.data) == 1


def test_assistant_message_without_content_is_accepted(http: httpx.Client) -> None:
    msgs = [*MSG, {"role": "assistant", "content": None}, {"role": "user", "content": "again"}]
    r = _post(http, CHAT, chat(messages=msgs))
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- vLLM's own errors
def _vllm_error(name: str) -> tuple[int, dict[str, Any]]:
    body, status = (FIXTURES / name).read_text().rstrip("\n").rsplit("\n", 1)
    return int(status), orjson.loads(body)


def test_max_tokens_within_ceiling_but_above_max_model_len_is_vllms_400(
    http: httpx.Client, client: openai.OpenAI, sim: Sim, received: Any
) -> None:
    status, recorded = _vllm_error("err_max_tokens.json")
    expected = orjson.loads(orjson.dumps(recorded).replace(b"100000", b"600"))
    r = _post(http, CHAT, chat(max_tokens=600))
    err = assert_error_shape(r, status)
    # vLLM's text and param; OpenAI's type and a string-or-null code instead of vLLM's integer
    expected["error"].update(type="invalid_request_error", code=None)
    assert r.json() == expected
    assert err["message"] == (
        "max_tokens=600 cannot be greater than max_model_len=512. Please request fewer output "
        "tokens. (parameter=max_tokens, value=600)"
    )
    assert received() == 1  # the gateway's ceiling (32768) let it through; vLLM said no
    direct = httpx.post(sim.url + CHAT, json=chat(max_tokens=600))
    assert direct.json()["error"]["message"] == err["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=600)
    assert info.value.param == "max_tokens" and info.value.code is None
    assert info.value.message.endswith("(parameter=max_tokens, value=600)")


def test_max_tokens_at_the_ceiling_reaches_vllm(http: httpx.Client, received: Any) -> None:
    r = _post(http, CHAT, chat(max_tokens=32768))
    err = assert_error_shape(r, 400)
    assert err["type"] == "invalid_request_error"
    assert err["message"].startswith("max_tokens=32768 cannot be greater than max_model_len=512.")
    assert received() == 1


def test_prompt_too_long_is_vllms_400(http: httpx.Client, client: openai.OpenAI, received: Any) -> None:
    status, recorded = _vllm_error("err_prompt_too_long.json")
    long_msg = [{"role": "user", "content": "word " * 600}]
    r = _post(http, CHAT, chat(messages=long_msg))
    err = assert_error_shape(r, status)
    recorded["error"].update(type="invalid_request_error", code="context_length_exceeded")
    assert r.json() == recorded
    assert err["param"] == "input_tokens"
    assert "This model's maximum context length is 512 tokens." in err["message"]
    assert received() == 1
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="word " * 600)
    assert info.value.param == "input_tokens"
    assert "exceeds this limit even without any output tokens" in info.value.message


def test_stream_options_wording_matches_vllm(http: httpx.Client) -> None:
    _, recorded = _vllm_error("err_stream_options.json")
    err = _post(http, CHAT, chat(stream_options={"include_usage": True})).json()["error"]
    vllm_sentence = recorded["error"]["message"].split(" (parameter=")[0]
    assert vllm_sentence == STREAM_OPTIONS_MSG
    assert vllm_sentence in err["message"]


# --------------------------------------------------------------------------- body size (413)
@pytest.fixture(scope="module")
def small_gw(sim: Sim) -> Iterator[Gateway]:
    g = Gateway([sim.url], env={"GATEWAY_SERVER__MAX_BODY_BYTES": "2048"})
    yield g
    g.stop()


def _padded_chat(size: int) -> bytes:
    """A valid chat request of exactly `size` bytes."""
    base = orjson.dumps(chat(messages=[{"role": "user", "content": ""}]))
    pad = size - len(base)
    assert pad >= 0
    return orjson.dumps(chat(messages=[{"role": "user", "content": "x" * pad}]))


@pytest.mark.parametrize("size", [2049, 4096, 1_000_000])
def test_oversize_body_with_content_length_is_413(small_gw: Gateway, received: Any, size: int) -> None:
    body = _padded_chat(size)
    assert len(body) == size
    r = httpx.post(
        small_gw.v1 + "/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert r.request.headers["content-length"] == str(size)
    err = assert_error_shape(r, 413)
    assert err["type"] == "invalid_request_error" and err["code"] == "request_too_large"
    assert err["param"] is None
    assert "2048" in err["message"]
    assert received() == 0


@pytest.mark.parametrize("size", [2049, 4096, 1_000_000])
def test_oversize_chunked_body_without_content_length_is_413(
    small_gw: Gateway, received: Any, size: int
) -> None:
    body = _padded_chat(size)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    r = httpx.post(
        small_gw.v1 + "/chat/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in r.request.headers
    assert r.request.headers["transfer-encoding"] == "chunked"
    err = assert_error_shape(r, 413)
    assert err["code"] == "request_too_large" and "2048" in err["message"]
    assert received() == 0


def test_body_exactly_at_the_limit_is_accepted(small_gw: Gateway, received: Any) -> None:
    body = _padded_chat(2048)
    r = httpx.post(
        small_gw.v1 + "/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 200, r.text
    r = httpx.post(
        small_gw.v1 + "/chat/completions",
        content=iter([body[:1000], body[1000:]]),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 200, r.text
    assert received() == 2


def test_oversize_body_through_the_sdk(small_gw: Gateway, received: Any) -> None:
    c = openai.OpenAI(base_url=small_gw.v1, api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 5000}])
    assert info.value.status_code == 413 and info.value.code == "request_too_large"
    c.close()
    assert received() == 0


# --------------------------------------------------------------------------- fuzz
def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(10 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2, 7, 600, 32768, 32769, 2**31, -(2**63), 10**30])
    if kind == 3:
        return rng.choice([0.0, -0.5, 0.5, 1.0, 1.5, 2.0, 2.5, 1e308, -1e-300, math.nan, math.inf])
    if kind == 4:
        return rng.choice(["", "tiny", "nope", "user", "\u0000", "\ud800", "x" * 300, "é😀"])
    if kind in (5, 6):
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(8)))
    if kind in (7, 8):
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(FUZZ_KEYS): _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


FUZZ_KEYS = [
    "model",
    "messages",
    "role",
    "content",
    "prompt",
    "input",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "stream",
    "stream_options",
    "include_usage",
    "type",
    "text",
    "name",
]


def _dumps(value: Any) -> bytes:
    # The stdlib, not orjson: it writes what orjson refuses to (NaN, Infinity, integers beyond
    # 64 bits, lone surrogates as \\ud800 escapes), which is exactly what a fuzz should send.
    return json.dumps(value).encode()


def _fuzz_body(rng: random.Random, path: str) -> bytes:
    base: dict[str, Any] = (
        chat()
        if path == CHAT
        else {"model": "tiny", "prompt": "a b", "max_tokens": 2}
        if path == COMP
        else {"model": "embed-small", "input": "a b"}
    )
    style = rng.randrange(6)
    if style == 0:  # random bytes
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    if style == 1:  # a valid request cut short
        raw = _dumps(base)
        return raw[: rng.randrange(len(raw))]
    if style == 2:  # one field replaced by a random value
        key = rng.choice([*FUZZ_KEYS, *base])
        return _dumps({**base, key: _random_value(rng)})
    if style == 3:  # one field dropped, another mangled
        body = {k: v for k, v in base.items() if rng.random() < 0.7}
        body[rng.choice(FUZZ_KEYS)] = _random_value(rng)
        return _dumps(body)
    if style == 4:  # any JSON value at all
        return _dumps(_random_value(rng))
    # byte-level mutation of a valid body
    mutated = bytearray(_dumps(base))
    for _ in range(rng.randrange(1, 4)):
        mutated[rng.randrange(len(mutated))] = rng.choice(b'{}[]",:0\\\xff n')
    return bytes(mutated)


def _run_fuzz(http: httpx.Client, seed: int, paths: list[str], count: int = 200) -> dict[int, int]:
    rng = random.Random(seed)
    seen: dict[int, int] = {}
    for i in range(count):
        path = rng.choice(paths)
        raw = _fuzz_body(rng, path)
        r = http.post(path, content=raw, headers={"content-type": "application/json"})
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        where = f"#{i} {path} {raw[:300]!r} -> {r.status_code} {r.text[:300]}"
        assert r.status_code < 500, where
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
            except (ValueError, KeyError, TypeError):
                pytest.fail(f"not OpenAI-shaped: {where}")
            assert list(err) == ERROR_KEYS, where
            assert isinstance(err["message"], str) and err["message"], where
    assert sum(seen.values()) == count
    assert seen.get(400, 0) >= count // 2, seen  # the fuzz mostly produced invalid requests
    return seen


def test_fuzz_chat_never_5xx_and_always_openai_shaped(http: httpx.Client) -> None:
    _run_fuzz(http, 20261122, [CHAT])


def test_fuzz_all_endpoints_never_5xx_and_always_openai_shaped(http: httpx.Client) -> None:
    _run_fuzz(http, 20261122, [CHAT, CHAT, COMP, EMB])


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (EMB, {"model": "embed-small", "input": "x", "n": "2"}),
        (EMB, {"model": "embed-small", "input": "x", "max_tokens": "5"}),
        (COMP, {"model": "tiny", "prompt": "x", "max_tokens": 2, "max_completion_tokens": "5"}),
        (COMP, {"model": "tiny", "prompt": "x", "max_tokens": 2, "max_completion_tokens": {}}),
    ],
    ids=[
        "embeddings-n-string",
        "embeddings-max-tokens-string",
        "completions-mct-string",
        "completions-mct-object",
    ],
)
def test_undeclared_fields_of_the_wrong_type_are_not_500(
    http: httpx.Client, path: str, body: dict[str, Any]
) -> None:
    r = _post(http, path, body)
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        assert_error_shape(r, r.status_code)
