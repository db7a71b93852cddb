"""examples/*.yaml: each passes `check-config` without secrets, and shows what its comments promise."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from gateway.config import Settings, load_settings
from tests.jobs_helpers import poll
from tests.procs import ROOT, Gateway, Sim, python_m

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def check_config(*args: str) -> subprocess.CompletedProcess[str]:
    """`llm-gateway check-config` as a CI job without secrets runs it: no GATEWAY_* or provider keys."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GATEWAY_") and k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")
    }
    return subprocess.run(
        [*python_m("gateway"), "check-config", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )


def test_the_examples_are_there() -> None:
    names = {p.name for p in EXAMPLES}
    assert {
        "auth-limits.yaml",
        "vllm-two-models.yaml",
        "production.yaml",
        "jobs.yaml",
        "cache.yaml",
        "ledger.yaml",
    } <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_check_config_without_secrets(path: Path) -> None:
    p = check_config(str(path.relative_to(ROOT)))
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"{path.relative_to(ROOT)}: OK")
    assert yaml.safe_load(p.stdout.split("\n", 1)[1])["backends"], "stdout: the verdict, then YAML"


def example(name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in list(os.environ):
        if key.startswith("GATEWAY_"):
            monkeypatch.delenv(key)
    return load_settings(ROOT / "examples" / name)


def test_vllm_two_models_has_two_models_replicas_aliases_and_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    s = example("vllm-two-models.yaml", monkeypatch)
    replicas: dict[str, int] = {}
    for b in s.backends:
        for m in b.models:
            replicas[m] = replicas.get(m, 0) + 1
    assert len(replicas) == 2 and max(replicas.values()) >= 2, replicas
    assert set(s.routing.aliases.values()) <= set(replicas)
    assert {r.model for r in s.routing.routes.values()} <= set(s.routing.aliases) | set(replicas)


def test_production_has_jwks_redis_teams_and_a_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    s = example("production.yaml", monkeypatch)
    assert s.auth.jwt is not None and s.auth.jwt.jwks_url and s.auth.jwt.algorithms == ["RS256"]
    assert s.rate_limits.storage.startswith("redis://")
    assert {t.data_residency for t in s.teams.values()} == {"strict", "any"}
    assert s.external is not None and s.external.api_key_env == "OPENAI_API_KEY"
    assert any(r.fallback for r in s.routing.routes.values())
    assert s.server.host == "0.0.0.0"


def test_production_requires_its_secrets_where_serve_runs() -> None:
    p = check_config("--require-secrets", "examples/production.yaml")
    assert p.returncode == 2
    assert "OPENAI_API_KEY (named by external.api_key_env) is not set" in p.stderr


def test_cache_has_redis_team_scope_and_a_classification_route_cached_always_for_a_day(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = example("cache.yaml", monkeypatch)
    assert s.cache is not None and s.cache.storage.startswith("redis://")
    assert (s.cache.scope, s.cache.when, s.cache.ttl) == ("team", "deterministic", 3600)
    assert s.cache.routes["classification"].when == "always"
    assert s.cache.routes["classification"].ttl == 86400
    assert set(s.cache.routes) <= set(s.routing.routes)
    assert {k.team for k in s.auth.api_keys} == set(s.teams)


# ---------------------------------------------------------------- vllm-two-models.yaml, served


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The example in front of three simulators standing in for its three vLLM servers."""
    data: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "vllm-two-models.yaml").read_text())
    sims: list[Sim] = []
    try:
        for backend in data["backends"]:
            sims.append(Sim(None, *[f"--model={m}" for m in backend["models"]]))
            backend["url"] = sims[-1].url
        cfg = tmp_path_factory.mktemp("two-models") / "gw.yaml"
        cfg.write_text(yaml.safe_dump(data))
        gw = Gateway([], config=cfg)
        yield gw
        gw.stop()
    finally:
        for sim in sims:
            sim.stop()


def chat(gw: Gateway, model: str, task: str | None = None) -> httpx.Response:
    headers = {"x-task-type": task} if task else {}
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return httpx.post(gw.v1 + "/chat/completions", json=body, headers=headers, timeout=30)


@pytest.mark.parametrize(
    ("model", "task", "served", "backends"),
    [
        ("default", None, "qwen2.5-7b", {"qwen7b-a", "qwen7b-b"}),
        ("fast", None, "qwen2.5-0.5b", {"qwen05b"}),
        ("default", "classification", "qwen2.5-0.5b", {"qwen05b"}),
        ("qwen2.5-0.5b", "generation", "qwen2.5-7b", {"qwen7b-a", "qwen7b-b"}),
    ],
)
def test_vllm_two_models_routes_as_its_comments_say(
    two_models: Gateway, model: str, task: str | None, served: str, backends: set[str]
) -> None:
    r = chat(two_models, model, task)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == served
    assert r.headers["x-gateway-backend"] in backends


def test_vllm_two_models_lists_models_and_aliases(two_models: Gateway) -> None:
    ids = {m["id"] for m in httpx.get(two_models.v1 + "/models", timeout=10).json()["data"]}
    assert ids == {"qwen2.5-7b", "qwen2.5-0.5b", "default", "fast"}


# ---------------------------------------------------------------- cache.yaml, served

SUPPORT, SEARCH = "sk-demo-support-key", "sk-demo-search-key"  # the keys its comments name


@pytest.fixture(scope="module")
def cache_example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, str]]:
    """The example in front of a simulator, on the test Redis under a key prefix of its own."""
    data: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "cache.yaml").read_text())
    prefix = f"test:examples:{secrets.token_hex(4)}:"
    data["cache"]["key_prefix"] = prefix
    sim = Sim(None)
    try:
        data["backends"][0]["url"] = sim.url
        cfg = tmp_path_factory.mktemp("cache") / "gw.yaml"
        cfg.write_text(yaml.safe_dump(data))
        gw = Gateway([], config=cfg)
        yield gw, prefix
        gw.stop()
    finally:
        sim.stop()
        r = redis.Redis.from_url(data["cache"]["storage"])
        for key in r.scan_iter(match=prefix + "*", count=1000):
            r.unlink(key)
        r.close()


def cached_chat(gw: Gateway, key: str, task: str | None, temperature: float, tag: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}", **({"x-task-type": task} if task else {})}
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": f"label {tag}"}],
        "temperature": temperature,
        "max_tokens": 3,
    }
    r = httpx.post(gw.v1 + "/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r


def until_hit(gw: Gateway, key: str, task: str | None, temperature: float, tag: str) -> httpx.Response:
    """The same request again until the first one's answer is stored (fills follow the response)."""
    return poll(
        lambda: cached_chat(gw, key, task, temperature, tag),
        lambda r: r.headers["x-gateway-cache"] == "hit",
        10,
        "a hit",
    )


def entry_keys(gw_prefix: str) -> set[bytes]:
    r = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        return set(r.scan_iter(match=gw_prefix + "e:*", count=1000))
    finally:
        r.close()


@pytest.mark.parametrize(
    ("task", "temperature", "first"),
    [
        ("classification", 0.9, "miss"),  # when: always
        (None, 0.0, "miss"),  # the default route: deterministic requests
        (None, 0.9, "bypass"),
        ("generation", 0.0, "bypass"),  # when: never
    ],
)
def test_cache_example_caches_as_its_comments_say(
    cache_example: tuple[Gateway, str], task: str | None, temperature: float, first: str
) -> None:
    gw, _ = cache_example
    tag = secrets.token_hex(4)
    assert cached_chat(gw, SUPPORT, task, temperature, tag).headers["x-gateway-cache"] == first
    if first == "miss":
        hit = until_hit(gw, SUPPORT, task, temperature, tag)
        assert int(hit.headers["age"]) >= 0 and hit.headers["x-gateway-backend"] == "cache"
    else:
        assert cached_chat(gw, SUPPORT, task, temperature, tag).headers["x-gateway-cache"] == "bypass"


def test_cache_example_keeps_teams_apart(cache_example: tuple[Gateway, str]) -> None:
    gw, _ = cache_example
    tag = secrets.token_hex(4)
    cached_chat(gw, SUPPORT, "classification", 0.9, tag)
    until_hit(gw, SUPPORT, "classification", 0.9, tag)
    assert cached_chat(gw, SEARCH, "classification", 0.9, tag).headers["x-gateway-cache"] == "miss"


def test_cache_example_keeps_classification_answers_a_day(cache_example: tuple[Gateway, str]) -> None:
    gw, prefix = cache_example
    tag = secrets.token_hex(4)
    before = entry_keys(prefix)
    cached_chat(gw, SUPPORT, "classification", 0.9, tag)
    until_hit(gw, SUPPORT, "classification", 0.9, tag)
    new = entry_keys(prefix) - before
    assert new, "no entry stored"
    r = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        ttls = {r.ttl(k) for k in new}
    finally:
        r.close()
    assert all(3600 < t <= 86400 for t in ttls), ttls  # the route's ttl, not cache.ttl (3600)
