"""Model allowances are checked on the model that serves, whatever path led there.

A team or key allowed only ``tiny`` must not reach ``big`` through a task route (header or body
field), an alias, or a route that names an alias; an allowance may name an alias, which allows the
model it resolves to. ``/v1/models`` lists exactly what a request would be allowed to use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.procs import Gateway, Sim

RESEARCH = "sk-research-team-key-0001"  # team research: models [tiny]
KEYONLY = "sk-key-allowance-only-0002"  # no team; the key itself: models [tiny]
ALIASED = "sk-aliased-team-key-00003"  # team aliased: models [small] (an alias of tiny)
JWT_LIKE = "sk-open-team-key-0000004"  # team open: no allowance at all


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


CONFIG = f"""
auth:
  api_keys:
    - {{sha256: {sha(RESEARCH)}, subject: researcher, team: research}}
    - {{sha256: {sha(KEYONLY)}, subject: keyonly, models: [tiny]}}
    - {{sha256: {sha(ALIASED)}, subject: aliaser, team: aliased}}
    - {{sha256: {sha(JWT_LIKE)}, subject: opener, team: open}}
routing:
  aliases: {{small: tiny, fast: big}}
  routes:
    summarize: {{model: big}}
    cheap: {{model: tiny}}
    quick: {{model: fast}}
teams:
  research: {{models: [tiny]}}
  aliased: {{models: [small]}}
  open: {{}}
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    sim = Sim(None, "--model", "tiny", "--model", "big", "--ttft", "0", "--itl", "0")
    cfg: Path = tmp_path_factory.mktemp("authz") / "gw.yaml"
    cfg.write_text(CONFIG)
    g = Gateway([sim.url], config=cfg)
    yield g
    g.stop()
    sim.stop()


def call(
    gw: Gateway,
    key: str,
    model: str,
    *,
    header_task: str | None = None,
    body_task: str | None = None,
    stream: bool = False,
    endpoint: str = "chat",
) -> httpx.Response:
    body: dict[str, Any] = {"model": model, "max_tokens": 2}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": "alpha beta"}]
    else:
        body["prompt"] = "alpha beta"
    if stream:
        body["stream"] = True
    if body_task is not None:
        body["task_type"] = body_task
    headers = {"authorization": f"Bearer {key}"}
    if header_task is not None:
        headers["x-task-type"] = header_task
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    return httpx.post(gw.url + path, json=body, headers=headers, timeout=30)


def assert_forbidden(r: httpx.Response) -> None:
    assert r.status_code == 403, r.text
    assert r.json() == {
        "error": {
            "message": r.json()["error"]["message"],
            "type": "permission_error",
            "param": "model",
            "code": "model_not_allowed",
        }
    }


FORBIDDEN = [
    pytest.param(RESEARCH, "tiny", {"header_task": "summarize"}, id="team-task-header-to-big"),
    pytest.param(RESEARCH, "tiny", {"body_task": "summarize"}, id="team-task-body-to-big"),
    pytest.param(RESEARCH, "tiny", {"header_task": "summarize", "stream": True}, id="team-task-stream"),
    pytest.param(
        RESEARCH, "tiny", {"header_task": "summarize", "endpoint": "completions"}, id="team-task-completions"
    ),
    pytest.param(RESEARCH, "big", {}, id="team-direct-big"),
    pytest.param(RESEARCH, "fast", {}, id="team-alias-to-big"),
    pytest.param(RESEARCH, "tiny", {"header_task": "quick"}, id="team-route-to-alias-to-big"),
    pytest.param(KEYONLY, "tiny", {"header_task": "summarize"}, id="key-task-header-to-big"),
    pytest.param(KEYONLY, "tiny", {"body_task": "summarize", "stream": True}, id="key-task-body-stream"),
    pytest.param(KEYONLY, "fast", {}, id="key-alias-to-big"),
    pytest.param(ALIASED, "big", {}, id="alias-allowance-direct-big"),
    pytest.param(ALIASED, "fast", {}, id="alias-allowance-other-alias"),
    pytest.param(ALIASED, "small", {"header_task": "summarize"}, id="alias-allowance-task-to-big"),
]


@pytest.mark.parametrize(("key", "model", "how"), FORBIDDEN)
def test_the_served_model_must_be_allowed(gw: Gateway, key: str, model: str, how: dict[str, Any]) -> None:
    assert_forbidden(call(gw, key, model, **how))


ALLOWED = [
    pytest.param(RESEARCH, "tiny", {}, "tiny", id="team-direct"),
    pytest.param(RESEARCH, "big", {"header_task": "cheap"}, "tiny", id="team-route-to-allowed-model"),
    pytest.param(RESEARCH, "small", {}, "tiny", id="team-alias-to-allowed-model"),
    pytest.param(KEYONLY, "tiny", {"stream": True}, "tiny", id="key-direct-stream"),
    pytest.param(ALIASED, "small", {}, "tiny", id="alias-allowance-by-alias"),
    pytest.param(ALIASED, "tiny", {}, "tiny", id="alias-allowance-allows-its-target"),
    pytest.param(JWT_LIKE, "tiny", {"header_task": "summarize"}, "big", id="no-allowance-route"),
]


@pytest.mark.parametrize(("key", "model", "how", "served"), ALLOWED)
def test_allowed_paths_are_served_by_the_resolved_model(
    gw: Gateway, key: str, model: str, how: dict[str, Any], served: str
) -> None:
    r = call(gw, key, model, **how)
    assert r.status_code == 200, r.text
    if how.get("stream"):
        assert f'"model":"{served}"' in r.text
    else:
        assert r.json()["model"] == served


@pytest.mark.parametrize(
    ("key", "listed"),
    [
        pytest.param(RESEARCH, ["small", "tiny"], id="team"),
        pytest.param(KEYONLY, ["small", "tiny"], id="key"),
        pytest.param(ALIASED, ["small", "tiny"], id="alias-allowance"),
        pytest.param(JWT_LIKE, ["big", "fast", "small", "tiny"], id="no-allowance"),
    ],
)
def test_models_list_matches_what_a_request_may_use(gw: Gateway, key: str, listed: list[str]) -> None:
    headers = {"authorization": f"Bearer {key}"}
    r = httpx.get(gw.url + "/v1/models", headers=headers, timeout=10)
    assert r.status_code == 200
    ids = sorted(m["id"] for m in r.json()["data"])
    assert ids == listed
    for model in ("tiny", "big", "small", "fast"):  # listed exactly when a request would pass
        assert (call(gw, key, model).status_code == 200) == (model in ids)
        got = httpx.get(gw.url + f"/v1/models/{model}", headers=headers, timeout=10).status_code
        assert got == (200 if model in ids else 404)
