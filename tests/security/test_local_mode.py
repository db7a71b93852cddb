"""No-auth loopback mode refuses what a browser can be made to send: DNS rebinding (a foreign
Host) and cross-site requests that need no CORS preflight (foreign Origin, form or text bodies).
Probes stay open to any Host. With authentication configured none of this applies.
"""

from __future__ import annotations

import hashlib
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.config import Settings
from gateway.pipeline.authenticate import Authenticator
from tests.procs import Gateway, Sim

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
JSON = "application/json"


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    s = Sim(None, "--ttft", "0", "--itl", "0")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local(sim: Sim) -> Iterator[Gateway]:
    g = Gateway([sim.url])  # no auth, 127.0.0.1
    yield g
    g.stop()


def request(
    gw: Gateway, method: str, path: str, headers: dict[str, str], body: bytes | None = None
) -> httpx.Response:
    with httpx.Client(timeout=30) as c:
        return c.request(method, gw.url + path, headers=headers, content=body)


def chat(gw: Gateway, headers: dict[str, str], stream: bool = False) -> httpx.Response:
    body = httpx.Request("POST", "http://x", json={**CHAT, "stream": stream}).content
    return request(gw, "POST", "/v1/chat/completions", {"content-type": JSON, **headers}, body)


def assert_refused(r: httpx.Response, status: int, type_: str, code: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["code"], err["param"]) == (type_, code, None)


FOREIGN_HOSTS = [
    "attacker.example",
    "attacker.example:8080",
    "localhost.attacker.example",
    "127.0.0.1.attacker.example",
    "127.0.0.1:80@attacker.example",
    "localhost:abc",
    "[::1]x",
    "10.0.0.1",
    "0.0.0.0",
]


@pytest.mark.parametrize("host", FOREIGN_HOSTS)
def test_foreign_host_is_misdirected(local: Gateway, host: str) -> None:
    for r in (
        request(local, "GET", "/v1/models", {"host": host}),
        request(local, "GET", "/v1/models/tiny", {"host": host}),
        request(local, "GET", "/docs", {"host": host}),
        chat(local, {"host": host}),
        chat(local, {"host": host}, stream=True),
    ):
        assert_refused(r, 421, "invalid_request_error", "host_not_allowed")


def test_missing_host_is_misdirected(local: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", local.port), timeout=10) as s:
        s.sendall(b"GET /v1/models HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 421 ")
    assert b'"code":"host_not_allowed"' in data


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LOCALHOST:1234",
        "localhost.:9",
        "127.0.0.1",
        "127.0.0.1:{port}",
        "127.9.9.9:1",
        "[::1]",
        "[::1]:{port}",
    ],
)
def test_loopback_hosts_are_served(local: Gateway, host: str) -> None:
    host = host.format(port=local.port)
    assert request(local, "GET", "/v1/models", {"host": host}).status_code == 200
    assert chat(local, {"host": host}).status_code == 200


@pytest.mark.parametrize("path", ["/live", "/ready", "/health", "/metrics"])
def test_probes_answer_this_machine_only(local: Gateway, path: str) -> None:
    """The probes answered any Host, so a page rebinding its name to 127.0.0.1 could read
    /health (backend URLs, models) and /metrics; a loopback-bound gateway has no remote prober
    to keep them open for."""
    r = request(local, "GET", path, {"host": "attacker.example", "origin": "http://attacker.example"})
    assert_refused(r, 421, "invalid_request_error", "host_not_allowed")
    r = request(local, "GET", path, {"host": f"127.0.0.1:{local.port}"})
    assert r.status_code == 200


@pytest.mark.parametrize(
    "origin",
    ["http://attacker.example", "https://localhost.attacker.example", "null", "file://", "localhost"],
)
def test_foreign_origin_is_refused(local: Gateway, origin: str) -> None:
    for r in (
        request(local, "GET", "/v1/models", {"origin": origin}),
        request(local, "OPTIONS", "/v1/chat/completions", {"origin": origin}),
        chat(local, {"origin": origin}),
    ):
        assert_refused(r, 403, "permission_error", "cross_site_request")


@pytest.mark.parametrize("origin", ["http://localhost:3000", "http://127.0.0.1", "https://[::1]:8443"])
def test_loopback_origin_is_served(local: Gateway, origin: str) -> None:
    assert chat(local, {"origin": origin}).status_code == 200


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        None,
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
def test_bodies_a_browser_sends_without_preflight_are_refused(
    local: Gateway, content_type: str | None, path: str
) -> None:
    body = httpx.Request("POST", "http://x", json=CHAT).content  # valid JSON all the same
    headers = {} if content_type is None else {"content-type": content_type}
    r = request(local, "POST", path, headers, body)
    assert_refused(r, 403, "permission_error", "unsupported_content_type")


def test_json_with_parameters_is_served(local: Gateway) -> None:
    assert chat(local, {"content-type": "Application/JSON; charset=utf-8"}).status_code == 200


def test_with_auth_configured_any_host_and_content_type_pass(sim: Sim, tmp_path: Path) -> None:
    key = "sk-local-mode-auth-key-01"
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        f"auth:\n  api_keys:\n    - {{sha256: {hashlib.sha256(key.encode()).hexdigest()}, subject: s}}\n"
    )
    gw = Gateway([sim.url], config=cfg)
    try:
        body = httpx.Request("POST", "http://x", json=CHAT).content
        headers = {"authorization": f"Bearer {key}", "host": "gateway.internal", "content-type": "text/plain"}
        assert request(gw, "POST", "/v1/chat/completions", headers, body).status_code == 200
        r = request(
            gw, "GET", "/v1/models", {"host": "attacker.example", "origin": "http://attacker.example"}
        )
        assert r.status_code == 401  # a credential is what a browser lacks
    finally:
        gw.stop()


def test_this_machines_operator_may_purge_the_cache_without_a_body(sim: Sim, tmp_path: Path) -> None:
    """`make run` turns the cache on without auth: DELETE /v1/cache was refused twice over (403
    "send the body with Content-Type: application/json" for a request with no body, then 403 "needs
    the admin scope"). DELETE needs a CORS preflight, which a page cannot get here."""
    prefix = f"test:localcache:{secrets.token_hex(4)}:"
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"cache:\n  storage: redis://127.0.0.1:6379/0\n  key_prefix: '{prefix}'\n")
    gw = Gateway([sim.url], config=cfg)
    try:
        r = request(gw, "DELETE", "/v1/cache?all=true", {})
        assert r.status_code == 200, r.text
        r = request(gw, "DELETE", "/v1/cache?all=true", {"origin": "http://attacker.example"})
        assert r.status_code == 403  # a page still cannot
    finally:
        gw.stop()


async def test_without_auth_off_loopback_the_anonymous_caller_is_no_operator() -> None:
    """allow_unauthenticated on a routable address: anyone who reaches it is anonymous, and gets
    no admin scope (only local-only mode's callers are this machine's own)."""
    local = Authenticator(Settings())
    open_ = Authenticator(Settings(server={"host": "0.0.0.0", "allow_unauthenticated": True}))
    scope = {"type": "http", "headers": []}
    assert "admin" in (await local.authenticate(scope)).scopes
    assert not (await open_.authenticate(scope)).scopes
