"""JWT strictness (RFC 7515, 7519, 8725): critical extensions, NumericDate claims, duplicate
members, key-locating headers, `kid` injection, `alg: none`.

Every token below except the controls carries a valid signature from the configured key, so
the one reason it must be refused is the property under test. Real gateway processes; the
JWKS one in front of ``tests/idp.py``, with a second "attacker" IdP that must never be asked.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.idp import IdP, SigningKey
from tests.procs import Gateway, Sim

SECRET = "jwt-headers-secret-" + secrets.token_hex(16)
SECRET_ENV = "TEST_JWT_HEADERS_SECRET"
MSG = [{"role": "user", "content": "alpha beta"}]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    c: dict[str, Any] = {"sub": "alice", "iat": now, "exp": now + 600, "jti": secrets.token_hex(8)}
    c.update(changes)
    return c


def signed(header: dict[str, Any] | str, payload: dict[str, Any] | str) -> str:
    """An HS256 token over exactly this header and payload JSON text, signed with SECRET."""
    h = header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))
    p = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    signing_input = f"{b64(h.encode())}.{b64(p.encode())}"
    sig = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def post(gw: Gateway, token: str) -> httpx.Response:
    return httpx.post(
        gw.v1 + "/chat/completions",
        json={"model": "tiny", "messages": MSG, "max_tokens": 2},
        headers={"authorization": f"Bearer {token}"},
        timeout=30,
    )


def assert_401(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert r.json()["error"]["type"] == "authentication_error"
    assert r.json()["error"]["code"] == "invalid_token"
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'


@pytest.fixture(scope="module")
def backend() -> Iterator[Sim]:
    s = Sim(None, "--ttft", "0", "--itl", "0")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def hs_gw(backend: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    cfg: Path = tmp_path_factory.mktemp("hs") / "gw.yaml"
    cfg.write_text(f"auth:\n  jwt:\n    algorithms: [HS256]\n    secret_env: {SECRET_ENV}\n")
    g = Gateway([backend.url], config=cfg, env={SECRET_ENV: SECRET})
    yield g
    g.stop()


HS = {"alg": "HS256", "typ": "JWT"}

REFUSED = {
    "crit-unknown-extension": lambda: signed({**HS, "crit": ["x-unknown"], "x-unknown": 1}, claims()),
    "crit-unknown-extension-absent": lambda: signed({**HS, "crit": ["x-unknown"]}, claims()),
    "crit-empty-list": lambda: signed({**HS, "crit": []}, claims()),
    "crit-not-a-list": lambda: signed({**HS, "crit": "x-unknown"}, claims()),
    "crit-registered-name": lambda: signed({**HS, "crit": ["alg"]}, claims()),
    "b64-false-with-crit": lambda: signed({**HS, "b64": False, "crit": ["b64"]}, claims()),
    "b64-false": lambda: signed({**HS, "b64": False}, claims()),
    "exp-string": lambda: signed(HS, claims(exp="9999999999")),
    "exp-bool": lambda: signed(HS, claims(exp=True)),
    "exp-null": lambda: signed(HS, claims(exp=None)),
    "exp-infinity": lambda: signed(HS, claims(exp=float("inf"))),
    "exp-huge-exponent": lambda: signed(HS, '{"sub":"alice","exp":1e400}'),
    "nbf-string": lambda: signed(HS, claims(nbf="0")),
    "iat-string": lambda: signed(HS, claims(iat=str(int(time.time())))),
    "iat-list": lambda: signed(HS, claims(iat=[1])),
    "duplicate-alg-in-header": lambda: signed('{"alg":"HS256","alg":"HS256"}', claims()),
    "duplicate-alg-none-last": lambda: signed('{"alg":"HS256","alg":"none"}', claims()),
    "duplicate-sub-in-payload": lambda: signed(HS, json.dumps(claims())[:-1] + ',"sub":"admin"}'),
    "duplicate-exp-in-payload": lambda: signed(HS, json.dumps(claims())[:-1] + ',"exp":99999999999}'),
    "kid-not-a-string": lambda: signed({**HS, "kid": 5}, claims()),
    "kid-object": lambda: signed({**HS, "kid": {"path": "/dev/null"}}, claims()),
    "alg-none": lambda: signed({"alg": "none"}, claims()).rpartition(".")[0] + ".",
    "alg-None": lambda: signed({"alg": "None"}, claims()),
    "alg-padded": lambda: signed({"alg": "HS256 "}, claims()),
    "header-not-an-object": lambda: signed('["HS256"]', claims()),
    "payload-not-an-object": lambda: signed(HS, '"alice"'),
}


@pytest.mark.parametrize("make", REFUSED.values(), ids=REFUSED.keys())
def test_strictness_hs256(hs_gw: Gateway, make: Any) -> None:
    assert_401(post(hs_gw, make()))


ACCEPTED = {
    "plain": lambda: signed(HS, claims()),
    "exp-float": lambda: signed(HS, claims(exp=time.time() + 600.5)),
    "kid-path-like-with-a-static-key": lambda: signed({**HS, "kid": "../../../../dev/null"}, claims()),
    "harmless-cty": lambda: signed({**HS, "cty": "JWT"}, claims()),
}


@pytest.mark.parametrize("make", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_controls_are_accepted(hs_gw: Gateway, make: Any) -> None:
    r = post(hs_gw, make())
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------- key-locating headers (JWKS)


@pytest.fixture(scope="module")
def real_key() -> SigningKey:
    return SigningKey("RS256", "real-1")


@pytest.fixture(scope="module")
def attacker_key() -> SigningKey:
    return SigningKey("RS256", "attacker-1")


@pytest.fixture(scope="module")
def idps(real_key: SigningKey, attacker_key: SigningKey) -> Iterator[tuple[IdP, IdP]]:
    real, attacker = IdP(), IdP()
    real.publish(real_key)
    attacker.publish(attacker_key)
    yield real, attacker
    real.stop()
    attacker.stop()


@pytest.fixture(scope="module")
def jwks_gw(
    backend: Sim, idps: tuple[IdP, IdP], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    cfg: Path = tmp_path_factory.mktemp("jwks") / "gw.yaml"
    cfg.write_text(
        "auth:\n  jwt:\n    algorithms: [RS256]\n"
        f"    jwks_url: {idps[0].url}\n    jwks_min_refresh_seconds: 60\n"
    )
    g = Gateway([backend.url], config=cfg)
    yield g
    g.stop()


@pytest.mark.parametrize("where", ["jku", "x5u"])
def test_key_urls_in_the_token_are_never_followed(
    jwks_gw: Gateway, idps: tuple[IdP, IdP], attacker_key: SigningKey, real_key: SigningKey, where: str
) -> None:
    attacker = idps[1]
    before = attacker.count
    forged = attacker_key.sign(claims(), headers={where: attacker.url})
    assert_401(post(jwks_gw, forged))
    forged_real_kid = attacker_key.sign(claims(), headers={where: attacker.url}, kid=real_key.kid)
    assert_401(post(jwks_gw, forged_real_kid))
    # The right key's signature passes whatever URL the header names, and that URL is not asked.
    genuine = real_key.sign(claims(), headers={where: attacker.url})
    assert post(jwks_gw, genuine).status_code == 200
    assert attacker.count == before


def test_a_key_embedded_in_the_token_is_never_used(
    jwks_gw: Gateway, attacker_key: SigningKey, real_key: SigningKey
) -> None:
    embedded = attacker_key.jwk()
    for kid in (None, real_key.kid, attacker_key.kid):
        forged = attacker_key.sign(claims(), headers={"jwk": embedded}, kid=kid)
        assert_401(post(jwks_gw, forged))


@pytest.mark.parametrize(
    "kid",
    ["../../../../dev/null", "' OR '1'='1", "real-1\x00", "real-1/../real-1", "x" * 2000],
)
def test_kid_injection_finds_no_key(jwks_gw: Gateway, attacker_key: SigningKey, kid: str) -> None:
    assert_401(post(jwks_gw, attacker_key.sign(claims(), kid=kid)))
