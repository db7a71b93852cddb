"""Faults an adversarial review found after the first fixes, each through a real gateway.

* A stream whose first token is late goes to another replica while nothing reached the client
  (vLLM sends a stream's headers at once: its first token is the real first byte).
* A backend's failure before the client got anything is the backend's fault: not charged; a
  stream the client left before its first token is charged its prompt, not max_tokens.
* A backend reporting negative usage still gets its audit line, and costs nothing extra.
* An OpenAI-compatible server that writes JSON with spaces (Python's json) has its usage chunk
  read and stripped like vLLM's.
* The request that can never fit the budget says so without a Retry-After.
* Validation messages name no Python class; multi-member gzip bodies decode, trailing bytes do not.
"""

from __future__ import annotations

import gzip
import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.procs import Gateway, Sim, python_m
from tests.rawbackend import SSE_HEAD, RawBackend, answer, chunk
from tests.test_limits import SECRET, token

MSG = [{"role": "user", "content": "hello"}]


def _config(tmp_path: Path, extra: dict[str, Any]) -> Path:
    cfg = {
        "auth": {"jwt": {"algorithms": ["HS256"], "secret": SECRET}},
        "tiers": {"tpm": {"tokens_per_minute": 100_000}},
        **extra,
    }
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _headers(rid: str, sub: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token(sub, tier='tpm')}", "x-request-id": rid}


@pytest.mark.parametrize("heartbeat", [0, 10])
def test_a_stream_with_a_late_first_token_goes_to_another_replica(heartbeat: float, tmp_path: Path) -> None:
    slow = Sim(None, "--ttft", "5", "--itl", "0.01")
    fast = Sim(None, "--ttft", "0.01", "--itl", "0.01")
    cfg = _config(
        tmp_path,
        {
            "timeouts": {"first_byte": 1, "total": 30},
            "streaming": {"heartbeat_interval": heartbeat},
            "routing": {"load_aware": False},
        },
    )
    gw = Gateway([slow.url, fast.url], config=cfg)
    try:
        for i in range(4):  # round-robin ties: some land on the slow replica first
            body = {"model": "tiny", "messages": MSG, "max_tokens": 3, "stream": True}
            with httpx.stream(
                "POST",
                gw.v1 + "/chat/completions",
                json=body,
                headers=_headers(f"late-{i}", "late"),
                timeout=20,
            ) as r:
                assert r.status_code == 200
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert not any('"error"' in e for e in events), events
        assert fast.stats()["received"] == 4
        assert slow.stats()["received"] >= 1  # it was tried, timed out, and the request moved on
    finally:
        gw.stop()
        slow.stop()
        fast.stop()


@pytest.fixture(scope="module")
def charging(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Sim]]:
    sim = Sim(None, "--ttft", "2", "--itl", "0.02")
    cfg = _config(tmp_path_factory.mktemp("charging"), {"resilience": {"breaker_fail_max": 1000}})
    gw = Gateway([sim.url], config=cfg)
    yield gw, sim
    gw.stop()
    sim.stop()


def test_a_backend_503_costs_nothing(charging: tuple[Gateway, Sim]) -> None:
    gw, sim = charging
    sim.control(fault="status:503")
    try:
        body = {"model": "tiny", "messages": MSG, "max_tokens": 100}
        r = httpx.post(gw.v1 + "/chat/completions", json=body, headers=_headers("c503", "c503"), timeout=20)
        assert r.status_code == 503
        assert gw.wait_audit("c503")["tokens_charged"] == 0
    finally:
        sim.control(fault="")


def test_a_stream_left_before_its_first_token_is_charged_its_prompt_only(
    charging: tuple[Gateway, Sim],
) -> None:
    gw, _ = charging
    body = {"model": "tiny", "messages": MSG, "max_tokens": 500, "stream": True}
    # ttft is 2 s: leave at 0.5 s, while vLLM is still on the prompt.
    with (
        pytest.raises(httpx.ReadTimeout),
        httpx.stream(
            "POST", gw.v1 + "/chat/completions", json=body, headers=_headers("cleft", "cleft"), timeout=0.5
        ) as r,
    ):
        r.read()
    audit = gw.wait_audit("cleft")
    assert audit["client_disconnected"] is True
    assert 0 < audit["tokens_charged"] < 100  # the prompt estimate, not the 500 reserved


def _raw_gateway(tmp_path: Path, on_post: Any) -> tuple[Gateway, RawBackend]:
    raw = RawBackend(on_post)
    return Gateway([raw.url], config=_config(tmp_path, {})), raw


def test_negative_usage_from_a_backend_still_gets_its_audit_line(tmp_path: Path) -> None:
    def negative(conn: socket.socket) -> None:
        body = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": "tiny",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": -5, "completion_tokens": -7, "total_tokens": -12},
        }
        answer(conn, 200, json.dumps(body).encode())

    gw, raw = _raw_gateway(tmp_path, negative)
    try:
        body = {"model": "tiny", "messages": MSG, "max_tokens": 10}
        r = httpx.post(gw.v1 + "/chat/completions", json=body, headers=_headers("neg", "neg"), timeout=10)
        assert r.status_code == 200
        audit = gw.wait_audit("neg")
        # Unusable numbers are not recorded: the gateway's estimate stands in, and says so.
        assert audit["usage_estimated"] is True
        assert audit["prompt_tokens"] >= 0 and audit["completion_tokens"] == 10  # max_tokens
        assert audit["tokens_charged"] > 0  # the reservation stands: the numbers were not usable
        assert "Exception in ASGI application" not in gw.proc.output()
    finally:
        gw.stop()
        raw.stop()


def test_a_spaced_json_usage_chunk_is_read_and_stripped(tmp_path: Path) -> None:
    def spaced(conn: socket.socket) -> None:
        events = [
            {
                "id": "x",
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": "hi"}}],
            },
            {
                "id": "x",
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            },
            {
                "id": "x",
                "object": "chat.completion.chunk",
                "choices": [],
                "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
            },
        ]
        out = SSE_HEAD
        for e in events:
            out += chunk(b"data: " + json.dumps(e).encode() + b"\n\n")  # json's ", " and ": "
        out += chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
        conn.sendall(out)

    gw, raw = _raw_gateway(tmp_path, spaced)
    try:
        body = {"model": "tiny", "messages": MSG, "max_tokens": 10, "stream": True}
        with httpx.stream(
            "POST", gw.v1 + "/chat/completions", json=body, headers=_headers("spaced", "spaced"), timeout=10
        ) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert not any('"usage"' in e for e in events)  # the client did not ask for it
        audit = gw.wait_audit("spaced")
        assert (audit["prompt_tokens"], audit["completion_tokens"], audit["tokens_charged"]) == (7, 2, 9)
    finally:
        gw.stop()
        raw.stop()


@pytest.fixture(scope="module")
def plain_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    sim = Sim(None, "--ttft", "0.01", "--itl", "0.001")
    cfg = _config(tmp_path_factory.mktemp("plain"), {"tiers": {"tpm": {"tokens_per_minute": 200}}})
    gw = Gateway([sim.url], config=cfg)
    yield gw
    gw.stop()
    sim.stop()


def test_a_request_larger_than_the_whole_budget_has_no_retry_after(plain_gw: Gateway) -> None:
    body = {"model": "tiny", "messages": MSG, "max_tokens": 5000}
    r = httpx.post(plain_gw.v1 + "/chat/completions", json=body, headers=_headers("huge", "huge"), timeout=10)
    assert r.status_code == 429
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("tokens_exceed_limit", "tokens")
    assert "max_tokens" in err["message"]
    assert "retry-after" not in r.headers and r.headers["x-should-retry"] == "false"
    assert r.headers["x-ratelimit-remaining-tokens"] == "200"  # nothing of the budget was used


def test_validation_messages_name_no_python_class(plain_gw: Gateway) -> None:
    for body in (
        {"model": "tiny", "messages": ["not an object"]},
        {"model": "tiny", "messages": MSG, "stream": True, "stream_options": "x"},
    ):
        r = httpx.post(plain_gw.v1 + "/chat/completions", json=body, headers=_headers("v", "v"), timeout=10)
        assert r.status_code == 400
        message = r.json()["error"]["message"]
        assert "ChatMessage" not in message and "StreamOptions" not in message, message
        assert "JSON object" in message


def test_gzip_bodies_of_several_members_decode_and_trailing_bytes_do_not(plain_gw: Gateway) -> None:
    raw = json.dumps({"model": "tiny", "messages": MSG, "max_tokens": 2}).encode()
    half = len(raw) // 2
    members = gzip.compress(raw[:half]) + gzip.compress(raw[half:])  # RFC 1952 §2.2
    headers = {**_headers("gz", "gz"), "content-encoding": "gzip", "content-type": "application/json"}
    r = httpx.post(plain_gw.v1 + "/chat/completions", content=members, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    bad = httpx.post(
        plain_gw.v1 + "/chat/completions", content=gzip.compress(raw) + b"junk", headers=headers, timeout=10
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_encoding"


def test_every_prompt_of_a_completions_list_is_reserved(tmp_path: Path) -> None:
    sim = Sim(None, "--ttft", "0.01", "--itl", "0.001")
    gw = Gateway([sim.url], config=_config(tmp_path, {"tiers": {"tpm": {"tokens_per_minute": 100_000}}}))
    try:
        body = {"model": "tiny", "prompt": ["a"] * 50, "n": 2, "max_tokens": 100}
        r = httpx.post(gw.v1 + "/completions", json=body, headers=_headers("arr", "arr"), timeout=10)
        assert r.status_code == 200, r.text
        # 50 prompts x 2 choices x 100 tokens are reserved, not 2 x 100.
        assert int(r.headers["x-ratelimit-remaining-tokens"]) <= 100_000 - 50 * 2 * 100
    finally:
        gw.stop()
        sim.stop()


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"prompt": ["a"] * 1000}, "prompt"),
        ({"best_of": 1000}, "best_of"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"best_of": 0}, "best_of"),
    ],
)
def test_completions_sequence_counts_are_validated(
    plain_gw: Gateway, extra: dict[str, Any], param: str
) -> None:
    body = {"model": "tiny", "prompt": "a", "max_tokens": 2, **extra}
    r = httpx.post(plain_gw.v1 + "/completions", json=body, headers=_headers("seq", "seq"), timeout=10)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param


def test_an_unknown_model_card_is_an_invalid_request_error(plain_gw: Gateway) -> None:
    r = httpx.get(plain_gw.v1 + "/models/nope", headers=_headers("card", "card"), timeout=10)
    assert r.status_code == 404
    assert (r.json()["error"]["type"], r.json()["error"]["code"]) == (
        "invalid_request_error",
        "model_not_found",
    )


@pytest.mark.parametrize(
    "section",
    [
        {"external": {"base_url": "ftp://x"}},
        {"routing": {"aliases": {"a": "b", "b": "a"}}},
        {"routing": {"task_header": "x task"}},
    ],
)
def test_configs_that_cannot_work_are_refused_with_the_key_named(
    tmp_path: Path, section: dict[str, Any]
) -> None:

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"backends": [{"url": "http://127.0.0.1:9"}], **section}))
    res = subprocess.run(
        [*python_m("gateway"), "check-config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2, res.stderr
    assert next(iter(section)) in res.stderr
    assert "Traceback" not in res.stderr


def test_content_capture_keeps_at_most_the_logged_size() -> None:
    from gateway.pipeline.relay import _capture_events
    from gateway.redact import MAX_LOGGED_CHARS

    event = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * 1000 + b'"}}]}\n\n'
    into: list[str] = []
    kept = _capture_events(event * 100, into, MAX_LOGGED_CHARS)
    assert kept == MAX_LOGGED_CHARS == sum(map(len, into))
    assert _capture_events(event, into, 0) == 0
