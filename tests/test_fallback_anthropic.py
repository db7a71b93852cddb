"""External fallback through Anthropic's Messages API (the simulator plays Anthropic)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.procs import Gateway, Sim

MSG = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "red green blue"}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Sim, Sim]]:
    local, claude = Sim(None), Sim(None, "--itl", "0.005")
    cfg = Path(tmp_path_factory.mktemp("anthropic")) / "gw.yaml"
    key = lambda k: hashlib.sha256(k.encode()).hexdigest()  # noqa: E731
    cfg.write_text(
        f"""
backends: [{{url: "{local.url}"}}]
auth:
  api_keys:
    - {{sha256: {key("sk-open")}, subject: open, team: open}}
    - {{sha256: {key("sk-strict")}, subject: strict, team: strict}}
teams:
  open: {{}}
  strict: {{data_residency: strict}}
routing:
  default_route: {{fallback: true}}
external:
  kind: anthropic
  base_url: "{claude.url}/v1"
  api_key_env: TEST_ANTHROPIC_KEY
  models: {{tiny: claude-test}}
"""
    )
    gw = Gateway([], config=cfg, env={"TEST_ANTHROPIC_KEY": "sk-ant-test"})
    local.proc.kill()  # every local replica gone: only the fallback can serve
    yield gw, local, claude
    gw.stop()
    claude.stop()


def test_plain_chat_is_translated_both_ways(stack: tuple[Gateway, Sim, Sim]) -> None:
    gw, _, claude = stack
    c = openai.OpenAI(base_url=gw.v1, api_key="sk-open", max_retries=0)
    raw = c.chat.completions.with_raw_response.create(model="tiny", messages=MSG, max_tokens=3)  # type: ignore[arg-type]
    r = raw.parse()
    assert raw.headers["x-gateway-backend"] == "external"
    assert raw.headers["x-gateway-fallback"] != "false"
    assert r.choices[0].message.content == " red green blue"
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 3
    sent = claude.stats()["requests"][-1]
    assert sent["path"] == "/v1/messages"
    assert sent["x_api_key"] == "sk-ant-test"  # the provider's key, never the client's
    assert sent["body"]["model"] == "claude-test"
    assert sent["body"]["system"] == "be brief"
    assert sent["body"]["messages"] == [{"role": "user", "content": "red green blue"}]
    assert sent["body"]["max_tokens"] == 3


def test_stream_is_translated_to_openai_chunks(stack: tuple[Gateway, Sim, Sim]) -> None:
    gw, _, _ = stack
    c = openai.OpenAI(base_url=gw.v1, api_key="sk-open", max_retries=0)
    chunks = list(
        c.chat.completions.create(
            model="tiny",
            messages=MSG,  # type: ignore[arg-type]
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == " red green blue red green"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    with httpx.stream(
        "POST",
        gw.v1 + "/chat/completions",
        json={"model": "tiny", "messages": MSG, "max_tokens": 2, "stream": True},
        headers={"Authorization": "Bearer sk-open"},
    ) as r:
        body = b"".join(r.iter_raw())
    assert body.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in body  # not asked for, not sent


def test_strict_team_never_reaches_the_provider(stack: tuple[Gateway, Sim, Sim]) -> None:
    gw, _, claude = stack
    before = claude.stats()["received"]
    c = openai.OpenAI(base_url=gw.v1, api_key="sk-strict", max_retries=0)
    for _ in range(3):
        with pytest.raises(openai.APIStatusError) as info:
            c.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)  # type: ignore[arg-type]
        assert info.value.status_code == 503
        assert info.value.response.headers["retry-after"]
    assert claude.stats()["received"] == before


def test_unconfigured_team_stays_on_premises(tmp_path: Path) -> None:
    """A team the config does not know (a typo in a JWT claim, say) has no known data policy."""
    local, claude = Sim(None), Sim(None)
    cfg = tmp_path / "gw.yaml"
    digest = hashlib.sha256(b"sk-typo").hexdigest()
    cfg.write_text(
        f"""
backends: [{{url: "{local.url}"}}]
auth: {{api_keys: [{{sha256: {digest}, subject: s, team: legl}}]}}
teams: {{legal: {{data_residency: strict}}}}
routing: {{default_route: {{fallback: true}}}}
external: {{kind: anthropic, base_url: "{claude.url}/v1", models: {{tiny: claude-test}}}}
"""
    )
    gw = Gateway([], config=cfg)
    try:
        local.proc.kill()
        c = openai.OpenAI(base_url=gw.v1, api_key="sk-typo", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            c.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)  # type: ignore[arg-type]
        assert info.value.status_code == 503
        assert claude.stats()["received"] == 0
    finally:
        gw.stop()
        claude.stop()
