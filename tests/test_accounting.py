"""What a request is charged against its token budget, through two real gateways on one Redis.

A request that produced nothing costs nothing: refused by vLLM (4xx) or by the gateway after
its reservation (unknown model). Work done is charged: once a request was written to a
backend its reservation stands unless vLLM's usage says otherwise, also when the client
leaves a plain (non-streamed) request while vLLM generates. The audit line's
``tokens_charged`` and ``gateway_ratelimit_tokens_charged_total`` say what was charged.

Redis: 127.0.0.1:6379 db 9 (subjects unique to this run); the simulator's context is 512
tokens and it streams one token every 20 ms.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.procs import Gateway, Sim
from tests.test_limits import (
    REDIS_DB,
    REDIS_HOST,
    REDIS_PORT,
    SECRET,
    assert_openai_error,
    audit_line,
    require_redis,
    token,
)

UID = secrets.token_hex(4)
LIMIT = 3000  # tokens per minute
LONG_PROMPT = "w " * 2000  # ~2000 prompt tokens: beyond the simulator's 512-token context


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    s = Sim(None, "--ttft", "0.05", "--itl", "0.02", "--output-tokens", "2000", "--max-model-len", "512")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gws(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Gateway]]:
    require_redis()
    path = tmp_path_factory.mktemp("accounting") / "gw.yaml"
    cfg = {
        "auth": {"jwt": {"algorithms": ["HS256"], "secret": SECRET}},
        "rate_limits": {"storage": f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"},
        "tiers": {"tpm": {"tokens_per_minute": LIMIT}},
    }
    path.write_text(yaml.safe_dump(cfg))
    a = Gateway([sim.url], config=path)
    try:
        b = Gateway([sim.url], config=path)
    except BaseException:
        a.stop()
        raise
    yield a, b
    a.stop()
    b.stop()


def fresh() -> str:
    return token(f"{UID}-{secrets.token_hex(4)}", tier="tpm")


def chat(content: str, max_tokens: int, **extra: Any) -> bytes:
    data = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    return json.dumps({**data, **extra}).encode()


def reservation(raw: bytes) -> int:
    return math.ceil(len(raw) / 4) + int(json.loads(raw)["max_tokens"])


def post(gw: Gateway, cred: str, raw: bytes, rid: str, timeout: float = 10) -> httpx.Response:
    headers = {"authorization": f"Bearer {cred}", "content-type": "application/json", "x-request-id": rid}
    return httpx.post(gw.v1 + "/chat/completions", content=raw, headers=headers, timeout=timeout)


def left_after(gw: Gateway, cred: str) -> int:
    """Tokens left in the budget before a small probe (its header minus its own reservation)."""
    raw = chat("probe", 8)
    r = post(gw, cred, raw, f"{UID}-probe-{secrets.token_hex(3)}")
    assert r.status_code == 200, r.text
    return int(r.headers["x-ratelimit-remaining-tokens"]) + reservation(raw)


def charged_metric(gw: Gateway) -> float:
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    m = re.search(r'^gateway_ratelimit_tokens_charged_total\{team="none"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_requests_vllm_refuses_cost_nothing(gws: tuple[Gateway, Gateway], stream: bool) -> None:
    """The reported input: two 400s from vLLM (prompt beyond the context) on two gateways."""
    cred = fresh()
    rejected = chat(LONG_PROMPT, 400, **({"stream": True} if stream else {}))
    assert 1300 < reservation(rejected) < 1500
    rids = [f"{UID}-refused-{stream}-{i}" for i in range(2)]
    for g, rid in zip(gws, rids, strict=True):
        r = post(g, cred, rejected, rid)
        assert r.status_code == 400, r.text
        assert "maximum context length" in r.json()["error"]["message"]
        audit_line(g, rid)  # settled
    r = post(gws[0], cred, chat("a valid small request", 300), f"{UID}-after-{stream}")
    assert r.status_code == 200, r.text
    used = r.json()["usage"]["prompt_tokens"] + r.json()["usage"]["completion_tokens"]
    assert left_after(gws[1], cred) == LIMIT - used
    for g, rid in zip(gws, rids, strict=True):
        assert audit_line(g, rid)["tokens_charged"] == 0


def test_a_gateway_refusal_after_the_reservation_costs_nothing(gws: tuple[Gateway, Gateway]) -> None:
    cred = fresh()
    raw = json.dumps(
        {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2000}
    ).encode()
    rid = f"{UID}-unknown-model"
    r = post(gws[0], cred, raw, rid)
    assert_openai_error(r, 404, "model_not_found")
    assert audit_line(gws[0], rid)["tokens_charged"] == 0
    assert left_after(gws[1], cred) == LIMIT


def test_a_plain_request_left_while_generating_is_charged_its_reservation(
    gws: tuple[Gateway, Gateway],
) -> None:
    """The reported input: max_tokens 400 (~8 s of generation), the client leaves after 3 s."""
    a, b = gws
    cred = fresh()
    raw = chat("count slowly", 400)
    rid = f"{UID}-left-plain"
    before = charged_metric(a)
    with pytest.raises(httpx.ReadTimeout):
        post(a, cred, raw, rid, timeout=3)
    line = audit_line(a, rid, timeout=10)
    assert line["client_disconnected"] is True
    assert left_after(b, cred) == LIMIT - reservation(raw)
    assert line["tokens_charged"] == reservation(raw), line
    assert charged_metric(a) - before == reservation(raw)


def test_a_stream_left_while_generating_is_charged_what_was_relayed(gws: tuple[Gateway, Gateway]) -> None:
    a, b = gws
    cred = fresh()
    raw = chat("count slowly", 400, stream=True)
    rid = f"{UID}-left-stream"
    headers = {"authorization": f"Bearer {cred}", "content-type": "application/json", "x-request-id": rid}
    events = 0
    with (
        httpx.Client(timeout=10) as c,
        c.stream("POST", a.v1 + "/chat/completions", content=raw, headers=headers) as r,
    ):
        assert r.status_code == 200
        for text in r.iter_lines():
            if text.startswith("data: "):
                events += 1
                if events == 5:
                    break
    line = audit_line(a, rid, timeout=10)
    assert line["client_disconnected"] is True
    prompt_estimate = math.ceil(len(raw) / 4)
    assert prompt_estimate + 5 <= line["tokens_charged"] <= prompt_estimate + 60, line
    assert left_after(b, cred) == LIMIT - line["tokens_charged"]


def test_a_served_request_is_charged_its_usage(gws: tuple[Gateway, Gateway]) -> None:
    a, b = gws
    cred = fresh()
    rid = f"{UID}-served"
    r = post(a, cred, chat("hello there", 400), rid)
    assert r.status_code == 200
    u = r.json()["usage"]
    used = u["prompt_tokens"] + u["completion_tokens"]
    assert audit_line(a, rid)["tokens_charged"] == used
    assert left_after(b, cred) == LIMIT - used


def test_no_token_limit_means_no_charge_in_the_audit_line(
    gws: tuple[Gateway, Gateway], tmp_path: Path
) -> None:
    a, _ = gws
    rid = f"{UID}-unlimited"
    cred = token(f"{UID}-unlimited")  # no tier: no limits apply
    r = post(a, cred, chat("hi", 4), rid)
    assert r.status_code == 200
    assert audit_line(a, rid)["tokens_charged"] is None
