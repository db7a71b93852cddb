"""Token budgets cannot be gamed through request fields, on every endpoint and both storages.

A reservation is computed only from validated values the endpoint honours (vLLM: chat
``max_completion_tokens`` then ``max_tokens``, completions ``max_tokens``, embeddings nothing),
so a negative, huge, fractional, boolean or string field can neither shrink the reservation
(more requests than the budget) nor blow it up into a storage error (fail-open on Redis).

Real gateway processes (memory:// and redis:// db 9) in front of a real simulator whose
context is 512 tokens. Every response's ``x-ratelimit-remaining-tokens`` must stay within the
budget, and a probe after each hostile request must see exactly the budget minus what was
really charged (vLLM's usage of a served request, nothing for a refused one).
"""

from __future__ import annotations

import hashlib
import json
import math
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
    body,
    require_redis,
    reserved,
    storage_errors,
    token,
)

UID = secrets.token_hex(4)
SMALL, LARGE = 200, 5000  # tokens per minute of the two tiers
TIERS = {"t200": {"tokens_per_minute": SMALL}, "t5000": {"tokens_per_minute": LARGE}}
HOSTILE: list[Any] = [-(10**15), -1, 0, 2**63, 2**64 + 1, 1.5, 600.0, True, "600", [600]]


def write(path: Path, storage: str) -> Path:
    cfg = {
        "auth": {"jwt": {"algorithms": ["HS256"], "secret": SECRET}},
        "rate_limits": {"storage": storage},
        "tiers": TIERS,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    s = Sim(None, "--ttft", "0", "--itl", "0", "--embedding-model", "embed", "--max-model-len", "512")
    yield s
    s.stop()


@pytest.fixture(scope="module", params=["memory", "redis"])
def gw(
    request: pytest.FixtureRequest, sim: Sim, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    if request.param == "redis":
        require_redis()
        storage = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    else:
        storage = "memory://"
    g = Gateway([sim.url], config=write(tmp_path_factory.mktemp("bypass") / "gw.yaml", storage))
    g.storage = request.param  # type: ignore[attr-defined]
    yield g
    g.stop()


def raw_json(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()  # json, not orjson: integers beyond 64 bits, like a client's


def send(gw: Gateway, cred: str, path: str, raw: bytes) -> httpx.Response:
    return httpx.post(
        gw.v1 + path,
        content=raw,
        headers={"authorization": f"Bearer {cred}", "content-type": "application/json"},
        timeout=10,
    )


def remaining(r: httpx.Response, limit: int) -> int:
    left = int(r.headers["x-ratelimit-remaining-tokens"])
    assert 0 <= left < limit, f"x-ratelimit-remaining-tokens {left} outside [0, {limit})"
    return left


def charged(r: httpx.Response) -> int:
    if r.status_code != 200:
        return 0
    u = r.json()["usage"]
    return int(u["prompt_tokens"]) + int(u.get("completion_tokens") or 0)


def probe_sees(gw: Gateway, cred: str, limit: int, spent: int) -> None:
    """The next small chat request sees exactly the budget minus what was charged before."""
    raw = body(max_tokens=8)
    r = send(gw, cred, "/chat/completions", raw)
    assert r.status_code == 200, r.text
    assert remaining(r, limit) == limit - spent - reserved(raw)


def fresh(gw: Gateway, tier: str) -> str:
    return token(f"{UID}-{gw.storage}-{secrets.token_hex(4)}", tier=tier)  # type: ignore[attr-defined]


def test_completions_ignore_a_negative_max_completion_tokens(gw: Gateway) -> None:
    """The reported input: with 200 tokens a minute, a negative field must not buy a budget."""
    cred = fresh(gw, "t200")
    hostile = raw_json(
        {"model": "tiny", "prompt": "x", "max_tokens": 600, "max_completion_tokens": -(10**15)}
    )
    r = send(gw, cred, "/completions", hostile)
    err = assert_openai_error(r, 429, "tokens_exceed_limit")  # more than the whole budget
    needs = math.ceil(len(hostile) / 4) + 600
    assert f"needs about {needs} tokens" in err["message"]
    probe_sees(gw, cred, SMALL, 0)
    spent, refused = 0, False
    for _ in range(40):  # the 40 requests of the report: the budget runs out, as it should
        r = send(gw, cred, "/chat/completions", body(max_tokens=8))
        if r.status_code == 429:
            refused = True
            break
        remaining(r, SMALL)
        spent += charged(r)
    assert refused and spent <= SMALL


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
def test_completions_max_completion_tokens_never_feeds_the_reservation(gw: Gateway, value: Any) -> None:
    cred = fresh(gw, "t5000")
    before = storage_errors(gw)
    raw = raw_json({"model": "tiny", "prompt": "one two", "max_tokens": 4, "max_completion_tokens": value})
    r = send(gw, cred, "/completions", raw)
    assert r.status_code == 200, r.text
    assert remaining(r, LARGE) == LARGE - math.ceil(len(raw) / 4) - 4
    probe_sees(gw, cred, LARGE, charged(r))
    assert storage_errors(gw) == before


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens", "n"])
def test_embeddings_reserve_their_input_only(gw: Gateway, name: str, value: Any) -> None:
    cred = fresh(gw, "t5000")
    before = storage_errors(gw)
    raw = raw_json({"model": "embed", "input": "one two three", name: value})
    r = send(gw, cred, "/embeddings", raw)
    assert r.status_code == 200, r.text
    assert remaining(r, LARGE) == LARGE - math.ceil(len(raw) / 4)
    probe_sees(gw, cred, LARGE, charged(r))
    assert storage_errors(gw) == before


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/chat/completions", "max_tokens"),
        ("/chat/completions", "max_completion_tokens"),
        ("/chat/completions", "n"),
        ("/completions", "max_tokens"),
        ("/completions", "n"),
    ],
)
def test_fields_that_feed_the_reservation_are_validated(
    gw: Gateway, path: str, name: str, value: Any
) -> None:
    cred = fresh(gw, "t5000")
    base: dict[str, Any] = (
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
        if path == "/chat/completions"
        else {"model": "tiny", "prompt": "hi"}
    )
    r = send(gw, cred, path, raw_json({**base, name: value}))
    err = assert_openai_error(r, 400, r.json()["error"]["code"])
    assert err["param"] == name, err
    probe_sees(gw, cred, LARGE, 0)


def test_a_value_above_the_ceiling_is_refused_before_any_reservation(gw: Gateway) -> None:
    cred = fresh(gw, "t5000")
    r = send(gw, cred, "/completions", raw_json({"model": "tiny", "prompt": "hi", "max_tokens": 32769}))
    err = assert_openai_error(r, 400, "invalid_value")
    assert err["param"] == "max_tokens"
    probe_sees(gw, cred, LARGE, 0)


def test_api_key_principals_are_held_to_the_same_rules(
    sim: Sim, tmp_path_factory: pytest.TempPathFactory
) -> None:
    key = f"sk-{UID}-bypass"
    cfg = {
        "auth": {
            "api_keys": [
                {"sha256": hashlib.sha256(key.encode()).hexdigest(), "subject": f"{UID}-k", "tier": "t200"}
            ]
        },
        "tiers": TIERS,
    }
    path = tmp_path_factory.mktemp("bypass-key") / "gw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    g = Gateway([sim.url], config=path)
    try:
        hostile = raw_json(
            {"model": "tiny", "prompt": "x", "max_tokens": 600, "max_completion_tokens": -(10**15)}
        )
        assert_openai_error(send(g, key, "/completions", hostile), 429, "tokens_exceed_limit")
    finally:
        g.stop()
