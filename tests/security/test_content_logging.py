"""Content logging (``log_content: true``) survives any body the validator accepts, and its
redaction is bounded work: a hostile prompt can neither crash the request nor stall the loop.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.api.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from gateway.pipeline.content_log import prompt_text
from gateway.redact import MAX_LOGGED_CHARS, redact
from tests.procs import ROOT, Gateway, Sim

KEY = "sk-content-logging-team-key"
TRUNCATED = " [truncated]"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    sim = Sim(None, "--ttft", "0", "--itl", "0", "--embedding-model", "embed-small")
    cfg: Path = tmp_path_factory.mktemp("content") / "gw.yaml"
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    cfg.write_text(
        f"auth:\n  api_keys:\n    - {{sha256: {digest}, subject: logger, team: audited}}\n"
        "teams:\n  audited: {log_content: true}\n"
    )
    g = Gateway([sim.url], config=cfg)
    yield g
    g.stop()
    sim.stop()


def audit_line(gw: Gateway, rid: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in gw.log_lines():
            if rid in line and '"event":"request"' in line:
                rec: dict[str, Any] = orjson.loads(line)
                return rec
        time.sleep(0.05)
    raise AssertionError(f"no audit line for {rid}")


CHAT_SHAPES = {
    "text-part-with-number": [{"role": "user", "content": [{"type": "text", "text": 5}]}],
    "text-part-without-text": [{"role": "user", "content": [{"type": "text"}]}],
    "text-part-with-object": [{"role": "user", "content": [{"type": "text", "text": {"a": [1]}}]}],
    "image-part": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,x"}}]},
        {"role": "user", "content": "describe it"},
    ],
    "assistant-without-content": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "user", "content": "again"},
    ],
    "empty-parts": [{"role": "user", "content": []}, {"role": "user", "content": "x"}],
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("messages", CHAT_SHAPES.values(), ids=CHAT_SHAPES.keys())
def test_any_accepted_chat_shape_logs_without_error(gw: Gateway, messages: Any, stream: bool) -> None:
    rid = f"content-{time.monotonic_ns()}"
    body = {"model": "tiny", "messages": messages, "max_tokens": 2, "stream": stream}
    r = httpx.post(
        gw.v1 + "/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {KEY}", "x-request-id": rid},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert isinstance(audit_line(gw, rid)["prompt"], str)


OTHER_SHAPES = [
    pytest.param("/completions", {"prompt": [1, 2, 3]}, id="completions-token-ids"),
    pytest.param("/completions", {"prompt": [[1, 2], [3]]}, id="completions-token-id-batches"),
    pytest.param("/completions", {"prompt": ["a", "b"]}, id="completions-string-batch"),
    pytest.param("/embeddings", {"input": [[1, 2], [3]]}, id="embeddings-token-id-batches"),
    pytest.param("/embeddings", {"input": "text"}, id="embeddings-text"),
]


@pytest.mark.parametrize(("path", "fields"), OTHER_SHAPES)
def test_completions_and_embeddings_shapes_log_without_error(
    gw: Gateway, path: str, fields: dict[str, Any]
) -> None:
    rid = f"content-{time.monotonic_ns()}"
    model = "embed-small" if path == "/embeddings" else "tiny"
    body = {"model": model, **fields, **({} if path == "/embeddings" else {"max_tokens": 2})}
    r = httpx.post(
        gw.v1 + path, json=body, headers={"authorization": f"Bearer {KEY}", "x-request-id": rid}, timeout=30
    )
    assert r.status_code == 200, r.text
    assert isinstance(audit_line(gw, rid)["prompt"], str)


def test_a_huge_prompt_is_logged_cut_to_the_cap(gw: Gateway) -> None:
    rid = f"content-{time.monotonic_ns()}"
    hostile = "-eyJ" * 500_000  # 2 MB that made the old JWT pattern quadratic
    body = {"model": "tiny", "messages": [{"role": "user", "content": hostile}], "max_tokens": 1}
    r = httpx.post(
        gw.v1 + "/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {KEY}", "x-request-id": rid},
        timeout=60,
    )
    assert r.status_code == 200
    prompt = audit_line(gw, rid)["prompt"]
    assert prompt.endswith(TRUNCATED)
    assert len(prompt) <= MAX_LOGGED_CHARS + len(TRUNCATED)


# ---------------------------------------------------------------- in-process: any accepted body

# What orjson (the receive stage's parser) can give: 64-bit integers, finite floats.
json_int = st.integers(min_value=-(2**63), max_value=2**64 - 1)
json_leaf = (
    st.none()
    | st.booleans()
    | json_int
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
part = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "input_audio", "x"])},
    optional={"text": json_value, "image_url": json_value},
)
content = st.none() | st.text(max_size=50) | st.lists(part, max_size=4)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"])},
    optional={"content": content, "name": st.text(max_size=5), "extra": json_value},
)
prompt = (
    st.text(min_size=1, max_size=50)
    | st.lists(st.text(max_size=10), min_size=1, max_size=4)
    | st.lists(json_int, min_size=1, max_size=8)
    | st.lists(st.lists(st.integers(min_value=0, max_value=50_000), max_size=4), min_size=1, max_size=3)
)
bodies = st.one_of(
    st.builds(
        lambda ms, x: {"model": "m", "messages": ms, "extra": x}, st.lists(message, max_size=4), json_value
    ),
    st.builds(lambda p: {"model": "m", "prompt": p}, prompt),
    st.builds(lambda p: {"model": "m", "input": p}, prompt),
)


def accepted(body: dict[str, Any]) -> bool:
    schema = (
        ChatCompletionRequest
        if "messages" in body
        else CompletionRequest
        if "prompt" in body
        else EmbeddingRequest
    )
    try:
        schema.model_validate(orjson.loads(orjson.dumps(body)))
    except ValidationError:
        return False
    return True


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(bodies.filter(accepted))
def test_every_body_the_validator_accepts_gives_a_bounded_log_text(body: dict[str, Any]) -> None:
    text = redact(prompt_text(orjson.loads(orjson.dumps(body))))
    assert isinstance(text, str)
    assert len(text) <= MAX_LOGGED_CHARS + 2 * len(TRUNCATED)


@given(st.lists(st.text(max_size=3000), max_size=12))
def test_prompt_text_is_cut_at_the_cap(texts: list[str]) -> None:
    body = {"messages": [{"role": "user", "content": t} for t in texts]}
    text = prompt_text(body, limit=1000)
    assert len(text) <= 1000 + len(TRUNCATED)
    full = "\n".join(f"user: {t}" for t in texts)
    assert text == full if len(full) <= 1000 else text == full[:1000] + TRUNCATED


# ---------------------------------------------------------------- redaction is linear

ADVERSARIAL = {
    "pem-headers-without-end": "-----BEGIN PRIVATE KEY-----" * 40_000,
    "pem-long-name": "-----BEGIN " + "A" * 1_000_000,
    "jwt-starts": "-eyJ" * 250_000,
    "jwt-segments": "eyJaaaaa." * 110_000,
    "key-starts": "-sk-" * 250_000,
    "bearer-words": "bearer " * 150_000,
    "bearer-spaces": "bearer" + " " * 1_000_000,
    "assignments": "token " * 170_000,
    "long-token-starts": "+a" * 500_000,
    "short-tokens": ("a" * 39 + " ") * 25_000,
}


@pytest.mark.parametrize("text", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_redaction_of_a_hostile_megabyte_is_capped(text: str) -> None:
    out = redact(text)
    assert len(out) <= MAX_LOGGED_CHARS + len(TRUNCATED)


def test_redaction_patterns_are_linear_even_without_the_cap() -> None:
    """Every pattern over every adversarial megabyte, uncapped, in a child process.

    The child finishes in about a second with linear patterns; a quadratic one (the old JWT
    pattern on ``-eyJ`` repeated) would need hours, so the guard below is a hang detector, not
    a speed target.
    """
    script = (
        "import orjson, sys\n"
        "from gateway.redact import redact\n"
        "for text in orjson.loads(sys.stdin.buffer.read()):\n"
        "    redact(text, limit=len(text))\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=orjson.dumps(list(ADVERSARIAL.values())),
        capture_output=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.stdout == b"ok\n", done.stderr[-2000:]


def test_redaction_still_finds_secrets() -> None:
    text = (
        "key sk-live-abcdefghijklmnop1234, password: hunter2, Bearer abcdefghijklmnopqrstu, "
        "jwt eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl, AKIAABCDEFGHIJKLMNOP, "
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEabc\n-----END RSA PRIVATE KEY----- tail " + "Q" * 41
    )
    out = redact(text)
    for secret in (
        "abcdefghijklmnop1234",
        "hunter2",
        "abcdefghijklmnopqrstu",
        "c2lnbmF0dXJl",
        "AKIA",
        "MIIE",
    ):
        assert secret not in out
    assert out.count("[REDACTED]") == 7
    assert out == (
        "key [REDACTED], password: [REDACTED] [REDACTED], jwt [REDACTED], [REDACTED], [REDACTED] "
        "tail [REDACTED]"
    )
    assert redact("-----BEGIN PRIVATE KEY-----\nMIIE cut off here") == "[REDACTED]"
