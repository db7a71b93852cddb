"""examples/*.yaml: each passes `check-config` without secrets, and shows what its comments promise."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.config import Settings, load_settings
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
    assert {"auth-limits.yaml", "vllm-two-models.yaml", "production.yaml"} <= names


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
