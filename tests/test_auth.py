"""Authentication end to end: a JWT attack suite, JWKS rotation and outages, API keys, principals.

Everything goes through real processes over loopback sockets: one simulator, and one gateway per
authentication configuration (module-scoped, each costs about a second to start):

* ``hs_gw``: HS256 with issuer, audience, leeway 30 s, ``org_id`` as the team claim, API keys,
  tiers and a team allowed only ``tiny``; its backend has an api_key (the gateway's, not the client's);
* ``rs_gw``: RS256 with a static PEM public key;
* ``jwks_gw``: RS256 + ES256 from a JWKS served by ``tests/idp.py``, short cache and refresh times;
* ``jwks_down_gw``: JWKS only, its identity provider down from the start;
* ``example_gw``: ``examples/auth-limits.yaml`` as shipped, with ``llm-gateway token``.

Every rejection must be an OpenAI-shaped 401 with ``WWW-Authenticate: Bearer error=...``, never a 500,
never echoing the credential or key material; the OpenAI SDK must raise ``AuthenticationError``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from jose import jwt as jose_jwt

from tests.idp import IdP, SigningKey
from tests.procs import ROOT, Gateway, Sim, free_port, python_m

MSG = [{"role": "user", "content": "alpha beta"}]
ISS = "https://idp.example.test"
AUD = "llm-gateway-tests"
SECRET = "hs256-test-secret-" + secrets.token_hex(16)
SECRET_ENV = "TEST_AUTH_JWT_SECRET"
BACKEND_KEY = "sk-backend-" + secrets.token_hex(8)
API_KEY = "sk-test-ok-" + secrets.token_hex(12)
REVOKED_KEY = "sk-test-revoked-" + secrets.token_hex(12)
LIMITED_KEY = "sk-test-limited-" + secrets.token_hex(12)
EXAMPLE_SECRET = "example-secret-" + secrets.token_hex(16)
EXAMPLE_API_KEY = "sk-demo-batch-key"  # the key whose sha256 examples/auth-limits.yaml stores
MIN_REFRESH = 1.0  # jwks_min_refresh_seconds of the JWKS gateways
CACHE_SECONDS = 2.0  # jwks_cache_seconds of the JWKS gateway
DROP = object()  # claims(x=DROP) removes claim x


# ---------------------------------------------------------------- tokens


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def seg(obj: Any) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


def unseg(token: str, index: int) -> Any:
    part = token.split(".")[index]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def claims(**changes: Any) -> dict[str, Any]:
    """Valid claims for the gateways of this module (fresh jti: never served from the verdict cache)."""
    now = int(time.time())
    c: dict[str, Any] = {
        "sub": "alice",
        "iss": ISS,
        "aud": AUD,
        "iat": now,
        "exp": now + 600,
        "jti": secrets.token_hex(8),
    }
    for key, value in changes.items():
        if value is DROP:
            c.pop(key, None)
        else:
            c[key] = value
    return c


def hs(c: dict[str, Any] | None = None, secret: str = SECRET, alg: str = "HS256") -> str:
    token: str = jose_jwt.encode(claims() if c is None else c, secret, algorithm=alg)
    return token


def forge(header: Any, payload: Any, key: bytes | None) -> str:
    """A JWT built by hand: HMAC-SHA256 over whatever header and payload, or no signature at all."""
    signing_input = f"{seg(header)}.{seg(payload)}"
    sig = "" if key is None else b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())
    return f"{signing_input}.{sig}"


def with_segment(token: str, index: int, obj: Any) -> str:
    parts = token.split(".")
    parts[index] = seg(obj)
    return ".".join(parts)


def flip_signature(token: str) -> str:
    head, _, sig = token.rpartition(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    raw[0] ^= 0x01
    return f"{head}.{b64(bytes(raw))}"


def pem_pieces(pem: str) -> list[str]:
    return [line for line in pem.splitlines() if line and not line.startswith("-----")]


# ---------------------------------------------------------------- checks


def assert_error(r: httpx.Response, status: int, type_: str, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == type_
    if code is not None:
        assert err["code"] == code
    return err


def assert_no_leak(r: httpx.Response, credential: str, extra: list[str] | tuple[str, ...] = ()) -> None:
    text = r.text + "\n" + "\n".join(f"{k}: {v}" for k, v in r.headers.items())
    pieces = [credential, *credential.split("."), *extra] if credential else list(extra)
    for piece in pieces:
        if len(piece) >= 12:
            assert piece not in text, f"response echoes secret material {piece[:16]}..."


def assert_401(
    r: httpx.Response,
    credential: str,
    code: str | None = None,
    bearer_error: str | None = "invalid_token",
    extra: list[str] | tuple[str, ...] = (),
) -> None:
    """``bearer_error`` None: a request without a bearer credential, whose challenge names no
    error code (RFC 6750 3.1)."""
    assert_error(r, 401, "authentication_error", code)
    want = "Bearer" if bearer_error is None else f'Bearer error="{bearer_error}"'
    assert r.headers["www-authenticate"] == want
    assert_no_leak(r, credential, extra)


def post_chat(gw: Gateway, headers: dict[str, Any], model: str = "tiny", **extra: Any) -> httpx.Response:
    return httpx.post(
        gw.v1 + "/chat/completions",
        json={"model": model, "messages": MSG, "max_tokens": 2},
        headers=headers,
        timeout=30,
        **extra,
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def sdk(gw: Gateway, api_key: str, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key=api_key, max_retries=0, timeout=30, **kw)


def sdk_chat(gw: Gateway, api_key: str, model: str = "tiny") -> str:
    with sdk(gw, api_key) as c:
        r = c.chat.completions.create(model=model, messages=MSG, max_tokens=2)  # type: ignore[arg-type]
    assert r.choices[0].message.content
    return r.choices[0].message.content


def assert_sdk_rejects(gw: Gateway, api_key: str, exc: type[openai.APIStatusError]) -> openai.APIStatusError:
    with sdk(gw, api_key) as c, pytest.raises(exc) as info:
        c.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)  # type: ignore[arg-type]
    return info.value


def sent_upstream(sim: Sim, request_id: str) -> dict[str, Any]:
    for entry in reversed(sim.stats()["requests"]):
        if (entry["x_request_id"] or "").startswith(request_id + "."):
            found: dict[str, Any] = entry
            return found
    raise AssertionError(f"request {request_id} never reached the simulator")


def audit_records(gw: Gateway) -> list[dict[str, Any]]:
    out = []
    for line in gw.log_lines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("event") == "request":
            out.append(rec)
    return out


# ---------------------------------------------------------------- processes


def write_config(d: Path, name: str, cfg: dict[str, Any]) -> Path:
    path = d / f"{name}.yaml"
    path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
    return path


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def backend() -> Iterator[Sim]:
    s = Sim(None, "--model", "tiny", "--model", "big", "--ttft", "0.01", "--itl", "0.002")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def hs_gw(backend: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    cfg = {
        "backends": [{"url": backend.url, "api_key": BACKEND_KEY}],
        "auth": {
            "jwt": {
                "algorithms": ["HS256"],
                "secret_env": SECRET_ENV,
                "issuer": ISS,
                "audience": AUD,
                "leeway": 30,
                "team_claim": "org_id",
            },
            "api_keys": [
                {"sha256": sha(API_KEY), "subject": "svc-ok", "team": "search"},
                {"sha256": sha(REVOKED_KEY), "subject": "svc-revoked", "revoked": True},
                {"sha256": sha(LIMITED_KEY), "subject": "svc-limited", "models": ["tiny"]},
            ],
            "default_tier": "standard",
        },
        "tiers": {"standard": {"requests_per_minute": 100000}, "premium": {"requests_per_minute": 100000}},
        "teams": {"research": {"models": ["tiny"]}, "search": {}},
    }
    path = write_config(tmp_path_factory.mktemp("hs"), "hs256", cfg)
    g = Gateway([], config=path, env={SECRET_ENV: SECRET})
    yield g
    g.stop()


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return SigningKey("RS256", "static-rsa")


@pytest.fixture(scope="module")
def rs_gw(backend: Sim, rsa_key: SigningKey, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    cfg = {
        "backends": [{"url": backend.url}],
        "auth": {"jwt": {"algorithms": ["RS256"], "public_key": rsa_key.pem, "issuer": ISS, "audience": AUD}},
    }
    path = write_config(tmp_path_factory.mktemp("rs"), "rs256", cfg)
    g = Gateway([], config=path)
    yield g
    g.stop()


class Keys:
    """The JWKS gateway's base key set: an RSA key, an EC key, and an RSA key published without `alg`."""

    def __init__(self) -> None:
        self.rsa = SigningKey("RS256", "rsa-1")
        self.ec = SigningKey("ES256", "ec-1")
        self.bare = SigningKey("RS256", "rsa-bare", publish_alg=False)

    @property
    def base(self) -> tuple[SigningKey, ...]:
        return (self.rsa, self.ec, self.bare)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def idp(keys: Keys) -> Iterator[IdP]:
    i = IdP()
    i.publish(*keys.base)
    yield i
    i.stop()


@pytest.fixture(scope="module")
def jwks_gw(
    backend: Sim, idp: IdP, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, int]]:
    cfg = {
        "backends": [{"url": backend.url}],
        "auth": {
            "jwt": {
                "algorithms": ["RS256", "ES256"],
                "jwks_url": idp.url,
                "jwks_cache_seconds": CACHE_SECONDS,
                "jwks_min_refresh_seconds": MIN_REFRESH,
                "issuer": ISS,
                "audience": AUD,
            }
        },
    }
    path = write_config(tmp_path_factory.mktemp("jwks"), "jwks", cfg)
    g = Gateway([], config=path)
    yield g, idp.count  # the fetches made while starting
    g.stop()


@pytest.fixture
def jwks(jwks_gw: tuple[Gateway, int], idp: IdP, keys: Keys) -> Iterator[Gateway]:
    """The JWKS gateway with the IdP up and publishing the base key set (restored afterwards)."""
    idp.available = True
    idp.publish(*keys.base)
    yield jwks_gw[0]
    idp.available = True
    idp.publish(*keys.base)


def resync(gw: Gateway, signer: SigningKey) -> None:
    """Make the gateway refetch the JWKS now (an unknown kid, once the refresh budget is back)."""
    time.sleep(MIN_REFRESH + 0.1)
    r = post_chat(gw, bearer(signer.sign(claims(), kid="resync-" + secrets.token_hex(4))))
    assert r.status_code == 401


@pytest.fixture(scope="module")
def idp_down() -> Iterator[IdP]:
    i = IdP()
    i.available = False
    yield i
    i.stop()


@pytest.fixture(scope="module")
def jwks_down_gw(backend: Sim, idp_down: IdP, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    cfg = {
        "backends": [{"url": backend.url}],
        "auth": {
            "jwt": {
                "algorithms": ["RS256"],
                "jwks_url": idp_down.url,
                "jwks_min_refresh_seconds": MIN_REFRESH,
                "issuer": ISS,
                "audience": AUD,
            }
        },
    }
    path = write_config(tmp_path_factory.mktemp("jwksdown"), "jwks-down", cfg)
    g = Gateway([], config=path)
    yield g
    g.stop()


@pytest.fixture(scope="module")
def example_gw(backend: Sim) -> Iterator[Gateway]:
    g = Gateway(
        [backend.url],
        config=ROOT / "examples" / "auth-limits.yaml",
        env={"GATEWAY_JWT_SECRET": EXAMPLE_SECRET},
    )
    yield g
    g.stop()


# ---------------------------------------------------------------- the HS256 attack suite

Maker = Callable[[], str]


def _tampered_payload() -> str:
    token = hs()
    return with_segment(token, 1, {**unseg(token, 1), "sub": "admin", "org_id": "research"})


def _tampered_header() -> str:
    token = hs()
    return with_segment(token, 0, {**unseg(token, 0), "kid": "someone-else"})


def _header_alg_swapped() -> str:
    token = hs()
    return with_segment(token, 0, {**unseg(token, 0), "alg": "HS512"})


HS_ATTACKS = [
    pytest.param(lambda: forge({"alg": "none", "typ": "JWT"}, claims(), None), None, id="alg-none"),
    pytest.param(lambda: forge({"alg": "None"}, claims(), None), None, id="alg-None"),
    pytest.param(lambda: forge({"alg": "NONE"}, claims(), None), None, id="alg-NONE"),
    pytest.param(lambda: forge({"alg": "none"}, claims(), SECRET.encode()), None, id="alg-none-with-sig"),
    pytest.param(lambda: forge({"typ": "JWT"}, claims(), SECRET.encode()), None, id="alg-missing"),
    pytest.param(lambda: hs(claims(exp=int(time.time()) - 120)), "token_expired", id="expired"),
    pytest.param(lambda: hs(claims(exp=int(time.time()) - 45)), "token_expired", id="expired-past-leeway"),
    pytest.param(lambda: hs(claims(nbf=int(time.time()) + 120)), None, id="nbf-future"),
    pytest.param(lambda: hs(claims(exp=DROP)), None, id="exp-missing"),
    pytest.param(lambda: hs(claims(iss="https://evil.example")), None, id="iss-wrong"),
    pytest.param(lambda: hs(claims(iss=DROP)), None, id="iss-missing"),
    pytest.param(lambda: hs(claims(aud="some-other-service")), None, id="aud-wrong"),
    pytest.param(lambda: hs(claims(aud=["a", "b"])), None, id="aud-list-without-us"),
    pytest.param(lambda: hs(claims(aud=DROP)), None, id="aud-missing"),
    pytest.param(lambda: hs(claims(sub=DROP)), None, id="sub-missing"),
    pytest.param(lambda: hs(claims(sub=12345)), None, id="sub-not-a-string"),
    pytest.param(lambda: hs(secret="not-the-secret-" + secrets.token_hex(8)), None, id="wrong-secret"),
    pytest.param(_tampered_payload, None, id="tampered-payload"),
    pytest.param(_tampered_header, None, id="tampered-header"),
    pytest.param(_header_alg_swapped, None, id="tampered-header-alg"),
    pytest.param(lambda: flip_signature(hs()), None, id="tampered-signature"),
    pytest.param(lambda: hs().rpartition(".")[0] + ".", None, id="signature-stripped"),
    pytest.param(lambda: hs(alg="HS512"), None, id="hs512-not-configured"),
    pytest.param(lambda: "a.b.c", None, id="garbage-dots"),
    pytest.param(lambda: "..", None, id="garbage-empty-segments"),
    pytest.param(lambda: "not-a-jwt-at-all", "invalid_api_key", id="garbage-word"),
    pytest.param(lambda: "eyJ.eyJ.eyJ", None, id="garbage-b64"),
    pytest.param(lambda: b64(b"\xff\xfe{") + "." + seg(claims()) + ".sig", None, id="header-not-utf8"),
    pytest.param(lambda: forge([], claims(), SECRET.encode()), None, id="header-not-object"),
    pytest.param(lambda: forge({"alg": "HS256"}, [1, 2], SECRET.encode()), None, id="payload-not-object"),
    pytest.param(lambda: forge({"alg": 256}, claims(), SECRET.encode()), None, id="alg-number"),
    pytest.param(
        lambda: forge({"alg": ["HS256"]}, claims(), SECRET.encode()),
        None,
        id="alg-list",
    ),
    pytest.param(
        lambda: forge({"alg": {"x": 1}}, claims(), SECRET.encode()),
        None,
        id="alg-object",
    ),
    pytest.param(lambda: "A" * 60_000, None, id="oversized-garbage-60k"),  # within server.max_header_bytes
    pytest.param(lambda: hs(claims(pad="x" * 9000)), None, id="oversized-but-validly-signed"),
]

# Correctly signed, but with claim values of the wrong type: python-jose only catches ValueError
# around int(claims[...]), so TypeError/OverflowError escape it.
HS_SIGNED_BAD_CLAIMS = [
    pytest.param({"exp": None}, id="exp-null"),
    pytest.param({"exp": [1]}, id="exp-list"),
    pytest.param({"exp": float("inf")}, id="exp-infinity"),
    pytest.param({"exp": 10**400}, id="exp-huge-int"),
    pytest.param({"iat": None}, id="iat-null"),
    pytest.param({"nbf": {"a": 1}}, id="nbf-object"),
    pytest.param({"exp": "soon"}, id="exp-string"),
    pytest.param({"exp": float("nan")}, id="exp-nan"),
]


@pytest.mark.parametrize(("make", "code"), HS_ATTACKS)
def test_hs256_attack_is_401(hs_gw: Gateway, make: Maker, code: str | None) -> None:
    token = make()
    r = post_chat(hs_gw, bearer(token))
    assert_401(r, token, code=code, extra=[SECRET])
    err = assert_sdk_rejects(hs_gw, token, openai.AuthenticationError)
    assert err.status_code == 401
    assert token not in hs_gw.proc.output()


@pytest.mark.parametrize("changes", HS_SIGNED_BAD_CLAIMS)
def test_hs256_signed_token_with_malformed_claims_is_401(hs_gw: Gateway, changes: dict[str, Any]) -> None:
    token = forge({"alg": "HS256", "typ": "JWT"}, {**claims(), **changes}, SECRET.encode())
    r = post_chat(hs_gw, bearer(token))
    assert_401(r, token, extra=[SECRET])


def test_valid_hs256_token_works_with_the_sdk_plain_and_stream(hs_gw: Gateway) -> None:
    token = hs()
    assert sdk_chat(hs_gw, token)
    with sdk(hs_gw, token) as c:
        stream = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=3, stream=True)  # type: ignore[arg-type]
        text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text


def test_leeway_is_honoured(hs_gw: Gateway) -> None:
    now = int(time.time())
    assert sdk_chat(hs_gw, hs(claims(exp=now - 10)))  # expired 10 s ago, leeway 30 s
    assert sdk_chat(hs_gw, hs(claims(nbf=now + 10)))  # valid in 10 s
    r = post_chat(hs_gw, bearer(hs(claims(exp=now - 60))))
    assert_error(r, 401, "authentication_error", "token_expired")


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-header"),
        pytest.param({"Authorization": "Bearer"}, id="bearer-without-token"),
        pytest.param({"Authorization": ""}, id="empty-authorization"),
        pytest.param({"x-api-key": ""}, id="empty-x-api-key"),
        pytest.param({"Authorization": "Basic dXNlcjpwYXNz"}, id="basic-scheme"),
        pytest.param({"Authorization": "Token abc.def.ghi"}, id="other-scheme"),
    ],
)
def test_missing_credential_is_401_without_an_error_code(hs_gw: Gateway, headers: dict[str, str]) -> None:
    r = post_chat(hs_gw, headers)
    assert_401(r, "", code="missing_credentials", bearer_error=None)


def test_sdk_without_a_key_gets_authentication_error(hs_gw: Gateway) -> None:
    # The SDK refuses to start without a key; a per-request Omit() sends no Authorization at all.
    with sdk(hs_gw, "placeholder") as c, pytest.raises(openai.AuthenticationError) as info:
        c.chat.completions.create(
            model="tiny",
            messages=MSG,  # type: ignore[arg-type]
            max_tokens=2,
            extra_headers={"Authorization": openai.Omit()},
        )
    assert info.value.code == "missing_credentials"


def raw_post(gw: Gateway, header_lines: list[bytes]) -> tuple[int, dict[str, str], bytes]:
    """A request written by hand, for header values httpx refuses to send (trailing spaces)."""
    body = json.dumps({"model": "tiny", "messages": MSG}).encode()
    head = [
        b"POST /v1/chat/completions HTTP/1.1",
        f"Host: 127.0.0.1:{gw.port}".encode(),
        b"Content-Type: application/json",
        f"Content-Length: {len(body)}".encode(),
        b"Connection: close",
        *header_lines,
    ]
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_raw, _, payload = data.partition(b"\r\n\r\n")
    status_line, *lines = head_raw.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, payload


@pytest.mark.parametrize("line", [b"Authorization: Bearer ", b"Authorization: Bearer \t ", b"x-api-key:  "])
def test_whitespace_credential_is_401_without_an_error_code(hs_gw: Gateway, line: bytes) -> None:
    status, headers, payload = raw_post(hs_gw, [line])
    assert status == 401, payload
    assert headers["www-authenticate"] == "Bearer"
    assert json.loads(payload)["error"]["code"] == "missing_credentials"


def test_non_ascii_credential_is_401(hs_gw: Gateway) -> None:
    for raw in (b"Bearer \xe9\xe9.\xff.\x80", b"Bearer caf\xe9-key"):
        r = httpx.post(
            hs_gw.v1 + "/chat/completions",
            json={"model": "tiny", "messages": MSG},
            headers={"Authorization": raw},
            timeout=30,
        )
        assert_error(r, 401, "authentication_error")
        assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'


# ---------------------------------------------------------------- RS256 with a static PEM


def _rs(key: SigningKey, **changes: Any) -> str:
    return key.sign(claims(**changes))


def test_rs256_pem_accepts_a_valid_token(rs_gw: Gateway, rsa_key: SigningKey) -> None:
    assert sdk_chat(rs_gw, _rs(rsa_key))


def test_rs256_pem_rejects_attacks(rs_gw: Gateway, rsa_key: SigningKey) -> None:
    pem = rsa_key.pem
    other = SigningKey("RS256", "static-rsa")  # same kid, another key
    ec = SigningKey("ES256", "static-rsa")
    good = _rs(rsa_key)
    attacks = {
        # algorithm confusion: HS256 with the public key (every usual spelling) as the HMAC secret
        "hs256-pem": forge({"alg": "HS256", "typ": "JWT"}, claims(), pem.encode()),
        "hs256-pem-stripped": forge({"alg": "HS256"}, claims(), pem.strip().encode()),
        "hs256-pem-body": forge({"alg": "HS256"}, claims(), "".join(pem_pieces(pem)).encode()),
        "alg-none": forge({"alg": "none"}, claims(), None),
        "other-rsa-key": _rs(other),
        "es256-token": ec.sign(claims()),
        "expired": _rs(rsa_key, exp=int(time.time()) - 3600),
        "aud-missing": _rs(rsa_key, aud=DROP),
        "iss-wrong": _rs(rsa_key, iss="https://evil.example"),
        "tampered-payload": with_segment(good, 1, {**unseg(good, 1), "sub": "root"}),
        "tampered-header": with_segment(good, 0, {**unseg(good, 0), "alg": "RS384"}),
        "tampered-signature": flip_signature(good),
    }
    for name, token in attacks.items():
        r = post_chat(rs_gw, bearer(token))
        assert r.status_code == 401, (name, r.text)
        assert_401(r, token, extra=pem_pieces(pem))
        assert_sdk_rejects(rs_gw, token, openai.AuthenticationError)


# ---------------------------------------------------------------- JWKS: RS256 + ES256


def test_jwks_fetched_at_start(jwks_gw: tuple[Gateway, int]) -> None:
    assert jwks_gw[1] >= 1


def test_jwks_rs256_and_es256_accepted(jwks: Gateway, keys: Keys) -> None:
    assert sdk_chat(jwks, keys.rsa.sign(claims()))
    assert sdk_chat(jwks, keys.ec.sign(claims()))
    assert sdk_chat(jwks, keys.bare.sign(claims()))  # a JWK without `alg` is fine for its own kty


def test_jwks_attacks_are_401(jwks: Gateway, keys: Keys) -> None:
    impostor_ec = SigningKey("ES256", "ec-1")
    impostor_rsa = SigningKey("RS256", "rsa-1")
    attacks = {
        "ec-impostor-same-kid": impostor_ec.sign(claims()),
        "rsa-impostor-same-kid": impostor_rsa.sign(claims()),
        "hs256-with-jwks-public-key": forge(
            {"alg": "HS256", "kid": "rsa-1"}, claims(), keys.rsa.pem.encode()
        ),
        "alg-none-known-kid": forge({"alg": "none", "kid": "rsa-1"}, claims(), None),
        "alg-swapped-to-es256-for-rsa-kid": keys.ec.sign(claims(), kid="rsa-1"),
        "kid-number": keys.rsa.sign(claims(), kid=5),
        "kid-list": keys.rsa.sign(claims(), kid=["rsa-1"]),
        "no-kid-several-keys": keys.rsa.sign(claims(), kid=None),
        "expired": keys.ec.sign(claims(exp=int(time.time()) - 3600)),
        "aud-wrong": keys.ec.sign(claims(aud="elsewhere")),
        "unknown-kid": impostor_rsa.sign(claims(), kid="kid-nobody-published"),
    }
    for name, token in attacks.items():
        r = post_chat(jwks, bearer(token))
        assert r.status_code == 401, (name, r.text)
        assert_401(r, token, extra=pem_pieces(keys.rsa.pem))
        assert_sdk_rejects(jwks, token, openai.AuthenticationError)


def test_jwks_kty_mismatch_is_401(jwks: Gateway, keys: Keys) -> None:
    # The JWK `rsa-bare` has no `alg`; a forged header claims ES256 for it.
    token = keys.ec.sign(claims(), kid="rsa-bare")
    r = post_chat(jwks, bearer(token))
    assert_401(r, token)


def test_jwks_unknown_kid_triggers_one_refresh_then_rate_limited(jwks: Gateway, idp: IdP) -> None:
    stranger = SigningKey("ES256", "nobody")
    time.sleep(MIN_REFRESH + 0.1)
    before = idp.count
    token = stranger.sign(claims(), kid="unknown-" + secrets.token_hex(4))
    assert_401(post_chat(jwks, bearer(token)), token)
    assert idp.count == before + 1
    token = stranger.sign(claims(), kid="unknown-" + secrets.token_hex(4))
    assert_401(post_chat(jwks, bearer(token)), token)
    assert idp.count == before + 1  # within jwks_min_refresh_seconds: no second fetch


async def test_jwks_flood_of_unknown_kids_is_rate_limited(jwks: Gateway, idp: IdP) -> None:
    stranger = SigningKey("ES256", "nobody")
    tokens = [stranger.sign(claims(), kid=secrets.token_hex(6)) for _ in range(50)]
    await asyncio.sleep(MIN_REFRESH + 0.1)
    before = idp.count
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=30) as c:
        rs = await asyncio.gather(
            *(
                c.post(
                    jwks.v1 + "/chat/completions",
                    json={"model": "tiny", "messages": MSG, "max_tokens": 2},
                    headers=bearer(t),
                )
                for t in tokens
            )
        )
    flood_seconds = time.monotonic() - started
    assert [r.status_code for r in rs] == [401] * 50
    # One fetch per jwks_min_refresh_seconds at most, concurrent ones coalesced: one fetch for a
    # flood shorter than MIN_REFRESH, one more per further MIN_REFRESH a slow machine needed.
    fetched, allowed = idp.count - before, 1 + int(flood_seconds / MIN_REFRESH)
    if allowed == 1:
        assert fetched == 1
    else:  # the limit is a rate: on a slow machine the flood spans several refresh periods
        assert 1 <= fetched <= allowed, (fetched, flood_seconds)


def test_jwks_rotation_new_key_accepted_old_key_rejected_once_removed(
    jwks: Gateway, idp: IdP, keys: Keys
) -> None:
    old = SigningKey("RS256", "old-" + secrets.token_hex(3))
    new = SigningKey("ES256", "new-" + secrets.token_hex(3))
    idp.publish(*keys.base, old)
    time.sleep(MIN_REFRESH + 0.1)
    assert sdk_chat(jwks, old.sign(claims()))  # unknown kid → refresh → accepted
    # The IdP rotates: `new` appears, `old` is withdrawn.
    idp.publish(*keys.base, new)
    time.sleep(MIN_REFRESH + 0.1)
    assert sdk_chat(jwks, new.sign(claims()))  # new kid → refresh → accepted; old now gone
    token = old.sign(claims())
    assert_401(post_chat(jwks, bearer(token)), token)
    assert_sdk_rejects(jwks, old.sign(claims()), openai.AuthenticationError)
    assert sdk_chat(jwks, keys.rsa.sign(claims()))


def test_jwks_removed_key_rejected_after_scheduled_refresh(jwks: Gateway, idp: IdP, keys: Keys) -> None:
    """Removal noticed without any new kid: the key set is refetched after jwks_cache_seconds."""
    old = SigningKey("RS256", "sched-" + secrets.token_hex(3))
    idp.publish(*keys.base, old)
    time.sleep(MIN_REFRESH + 0.1)
    assert sdk_chat(jwks, old.sign(claims()))
    idp.publish(*keys.base)
    time.sleep(CACHE_SECONDS + 0.2)
    token = old.sign(claims())  # a fresh token: not in the verdict cache
    assert_401(post_chat(jwks, bearer(token)), token)


def test_jwks_same_token_rejected_after_its_key_is_withdrawn(jwks: Gateway, idp: IdP, keys: Keys) -> None:
    old = SigningKey("RS256", "reuse-" + secrets.token_hex(3))
    idp.publish(*keys.base, old)
    time.sleep(MIN_REFRESH + 0.1)
    token = old.sign(claims())
    assert sdk_chat(jwks, token)  # an SDK client sends this same token on every request
    idp.publish(*keys.base)
    time.sleep(CACHE_SECONDS + 0.2)
    assert_401(post_chat(jwks, bearer(token)), token)


def test_jwks_idp_down_after_start_cached_keys_still_work(jwks: Gateway, idp: IdP, keys: Keys) -> None:
    resync(jwks, keys.rsa)  # the gateway holds the base key set
    idp.available = False
    time.sleep(CACHE_SECONDS + 0.2)  # the cached set is now stale: the next request refetches, and fails
    before = idp.count
    assert sdk_chat(jwks, keys.rsa.sign(claims()))
    assert idp.count > before  # it did try the IdP
    assert sdk_chat(jwks, keys.ec.sign(claims()))
    stranger = SigningKey("RS256", "nobody")
    token = stranger.sign(claims(), kid="rsa-1")
    assert_401(post_chat(jwks, bearer(token)), token)


def test_jwks_client_token_never_goes_upstream(jwks: Gateway, keys: Keys, backend: Sim) -> None:
    token = keys.rsa.sign(claims())
    rid = "auth-jwks-" + secrets.token_hex(4)
    r = post_chat(jwks, {**bearer(token), "X-Request-Id": rid})
    assert r.status_code == 200, r.text
    entry = sent_upstream(backend, rid)
    assert entry["authorization"] is None  # no backend api_key configured: nothing at all


# ---------------------------------------------------------------- JWKS down from the start


def test_jwks_unreachable_from_start_is_503_with_retry_after(
    jwks_down_gw: Gateway, idp_down: IdP, keys: Keys
) -> None:
    token = keys.rsa.sign(claims())
    r = post_chat(jwks_down_gw, bearer(token))
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == "auth_unavailable"
    assert int(r.headers["retry-after"]) >= 1
    assert_no_leak(r, token)
    with sdk(jwks_down_gw, keys.rsa.sign(claims())) as c, pytest.raises(openai.APIStatusError) as info:
        c.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)  # type: ignore[arg-type]
    assert info.value.status_code == 503
    assert idp_down.count >= 1  # it did try
    # Not a JWT: still a plain 401, and the probes do not depend on the IdP.
    assert_401(post_chat(jwks_down_gw, bearer("not-a-jwt")), "not-a-jwt", code="invalid_api_key")
    assert httpx.get(jwks_down_gw.url + "/ready", timeout=5).status_code == 200


def test_jwks_unreachable_503_has_the_server_error_type(jwks_down_gw: Gateway, keys: Keys) -> None:
    r = post_chat(jwks_down_gw, bearer(keys.rsa.sign(claims())))
    assert_error(r, 503, "server_error", "auth_unavailable")


def test_jwks_recovers_when_the_idp_comes_back(jwks_down_gw: Gateway, idp_down: IdP, keys: Keys) -> None:
    idp_down.publish(keys.rsa)
    idp_down.available = True
    time.sleep(MIN_REFRESH + 0.1)
    assert sdk_chat(jwks_down_gw, keys.rsa.sign(claims()))


# ---------------------------------------------------------------- API keys


def test_api_key_via_bearer_and_x_api_key(hs_gw: Gateway) -> None:
    assert sdk_chat(hs_gw, API_KEY)
    r = post_chat(hs_gw, {"x-api-key": API_KEY})
    assert r.status_code == 200, r.text
    headers = {"Authorization": openai.Omit(), "x-api-key": API_KEY}
    with sdk(hs_gw, "placeholder") as c:
        r2 = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=2, extra_headers=headers)  # type: ignore[arg-type]
        assert r2.choices[0].message.content


def test_api_key_revoked(hs_gw: Gateway) -> None:
    for headers in (bearer(REVOKED_KEY), {"x-api-key": REVOKED_KEY}):
        r = post_chat(hs_gw, headers)
        assert_401(r, REVOKED_KEY, code="revoked_api_key")
    err = assert_sdk_rejects(hs_gw, REVOKED_KEY, openai.AuthenticationError)
    assert err.code == "revoked_api_key"


def test_api_key_wrong(hs_gw: Gateway) -> None:
    wrong = API_KEY[:-1] + ("0" if API_KEY[-1] != "0" else "1")
    for headers in (bearer(wrong), {"x-api-key": wrong}):
        assert_401(post_chat(hs_gw, headers), wrong, code="invalid_api_key", extra=[API_KEY])
    err = assert_sdk_rejects(hs_gw, wrong, openai.AuthenticationError)
    assert err.code == "invalid_api_key"


def test_authorization_and_another_x_api_key_are_refused(hs_gw: Gateway) -> None:
    """The Authorization header won, silently: a proxy in front that authorizes by x-api-key would
    let one caller in while the gateway served another."""
    r = post_chat(hs_gw, {**bearer("sk-wrong"), "x-api-key": API_KEY})
    assert_401(r, "sk-wrong", code="duplicate_credentials", bearer_error="invalid_request", extra=[API_KEY])


def test_api_key_comparison_is_constant_time() -> None:
    source = (ROOT / "gateway" / "auth" / "apikeys.py").read_text()
    assert "hmac.compare_digest(" in source


# ---------------------------------------------------------------- principal: team, models, tier


def test_team_claim_name_is_configurable(hs_gw: Gateway) -> None:
    # org_id = research: the team may use only `tiny`.
    research = hs(claims(org_id="research"))
    assert sdk_chat(hs_gw, research, "tiny")
    with sdk(hs_gw, research) as c, pytest.raises(openai.PermissionDeniedError) as info:
        c.chat.completions.create(model="big", messages=MSG, max_tokens=2)  # type: ignore[arg-type]
    assert info.value.status_code == 403 and info.value.param == "model"
    r = post_chat(hs_gw, bearer(research), model="big")
    assert_error(r, 403, "permission_error", "model_not_allowed")
    assert_no_leak(r, research)
    # The default claim name `team` means nothing here: no team, no restriction.
    assert sdk_chat(hs_gw, hs(claims(team="research")), "big")


def test_a_team_or_tier_claim_that_is_not_a_string_is_refused_and_an_empty_team_is_none(
    hs_gw: Gateway,
) -> None:
    """A team claim of ``""``, a list or a number was turned into a team name by str(): every
    such principal shared one team (its cache scope, limits, budget)."""
    for bad in (["research"], 7, True, {"a": 1}):
        r = post_chat(hs_gw, bearer(hs(claims(org_id=bad))))
        assert_error(r, 401, "authentication_error")
        assert "org_id" in r.json()["error"]["message"]
    r = post_chat(hs_gw, bearer(hs(claims(tier=["interactive"]))))
    assert_error(r, 401, "authentication_error")
    rid = f"empty-team-{time.time_ns()}"
    r = post_chat(hs_gw, {**bearer(hs(claims(org_id=""))), "x-request-id": rid})
    assert r.status_code == 200, r.text
    assert hs_gw.wait_audit(rid)["team"] is None


def test_a_second_credential_header_is_refused(hs_gw: Gateway) -> None:
    """Two Authorization headers: the first was used, silently; a proxy in front that checks the
    last one would let a caller through as someone else."""
    good = f"Bearer {hs()}"
    for name in ("authorization", "x-api-key"):
        value = good if name == "authorization" else hs()
        r = httpx.post(
            hs_gw.v1 + "/chat/completions",
            json={"model": "tiny", "messages": MSG, "max_tokens": 2},
            headers=[(name, value), (name, value)],
            timeout=30,
        )
        assert_error(r, 401, "authentication_error", "duplicate_credentials")
    # One of each naming different credentials: the Authorization header was used, silently (a
    # proxy in front that authorizes by x-api-key would let one caller in as another).
    token = hs()
    for other in ("anything", hs(claims(sub="someone-else"))):
        r = httpx.post(
            hs_gw.v1 + "/chat/completions",
            json={"model": "tiny", "messages": MSG, "max_tokens": 2},
            headers=[("authorization", f"Bearer {token}"), ("x-api-key", other)],
            timeout=30,
        )
        assert_401(r, token, code="duplicate_credentials", bearer_error="invalid_request", extra=[other])
    r = httpx.post(  # one of each naming the same credential: nothing to disagree about
        hs_gw.v1 + "/chat/completions",
        json={"model": "tiny", "messages": MSG, "max_tokens": 2},
        headers=[("authorization", f"Bearer {token}"), ("x-api-key", token)],
        timeout=30,
    )
    assert r.status_code == 200, r.text


def test_models_claim_restricts_the_caller(hs_gw: Gateway) -> None:
    token = hs(claims(models=["tiny"]))
    assert sdk_chat(hs_gw, token, "tiny")
    with sdk(hs_gw, token) as c, pytest.raises(openai.PermissionDeniedError):
        c.chat.completions.create(model="big", messages=MSG, max_tokens=2)  # type: ignore[arg-type]
    assert sdk_chat(hs_gw, hs(), "big")  # no models claim: anything the team may use


def test_names_no_store_can_keep_are_refused(hs_gw: Gateway) -> None:
    """A `sub` with a NUL was served, but PostgreSQL cannot keep it: its budget's month was never
    seeded (so never enforced) and its ledger rows were set aside; a lone surrogate (JSON
    ``\\ud800``) is not UTF-8 at all and failed the request (500) where a budget applied."""
    for field, value in (
        ("sub", "mallory\x00x"),
        ("sub", "x\ud800"),
        ("sub", "tab\there"),
        ("sub", "s" * 513),
        ("org_id", "research\x00"),
        ("sub", "u\x85x"),
        ("org_id", "ta\x9b"),
        ("sub", "u\u2028x"),
        ("jti", "j\udfff"),
    ):
        r = post_chat(hs_gw, bearer(hs(claims(**{field: value}))))
        assert_401(r, "", code="invalid_token")
        assert field in r.json()["error"]["message"], (field, r.text)
    ok = post_chat(hs_gw, bearer(hs(claims(sub="ålice:%41 ✓", jti="j-1"))))
    assert ok.status_code == 200, ok.text


def test_models_claim_as_string_does_not_fail_open(hs_gw: Gateway) -> None:
    r = post_chat(hs_gw, bearer(hs(claims(models="tiny"))), model="big")
    assert r.status_code == 403, r.text


def test_api_key_models_restrict_the_caller(hs_gw: Gateway) -> None:
    assert sdk_chat(hs_gw, LIMITED_KEY, "tiny")
    with sdk(hs_gw, LIMITED_KEY) as c, pytest.raises(openai.PermissionDeniedError):
        c.chat.completions.create(model="big", messages=MSG, max_tokens=2)  # type: ignore[arg-type]


def test_tier_must_be_configured(hs_gw: Gateway) -> None:
    token = hs(claims(tier="gold"))
    r = post_chat(hs_gw, bearer(token))
    assert_error(r, 403, "permission_error", "unknown_tier")
    with sdk(hs_gw, token) as c, pytest.raises(openai.PermissionDeniedError):
        c.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)  # type: ignore[arg-type]
    assert sdk_chat(hs_gw, hs(claims(tier="premium")))
    assert sdk_chat(hs_gw, hs())  # no tier claim: auth.default_tier


# ---------------------------------------------------------------- upstream, probes


def test_client_token_never_goes_upstream(hs_gw: Gateway, backend: Sim) -> None:
    token = hs()
    for headers in (bearer(token), bearer(API_KEY), {"x-api-key": API_KEY}):
        rid = "auth-hs-" + secrets.token_hex(4)
        r = post_chat(hs_gw, {**headers, "X-Request-Id": rid})
        assert r.status_code == 200, r.text
        entry = sent_upstream(backend, rid)
        assert entry["authorization"] == f"Bearer {BACKEND_KEY}"
    rid = "auth-hs-stream-" + secrets.token_hex(4)
    with sdk(hs_gw, token) as c:
        stream = c.chat.completions.create(
            model="tiny",
            messages=MSG,  # type: ignore[arg-type]
            max_tokens=2,
            stream=True,
            extra_headers={"X-Request-Id": rid},
        )
        assert list(stream)
    assert sent_upstream(backend, rid)["authorization"] == f"Bearer {BACKEND_KEY}"


@pytest.mark.parametrize("path", ["/live", "/ready", "/health", "/metrics"])
def test_probes_open_without_credentials(hs_gw: Gateway, path: str) -> None:
    r = httpx.get(hs_gw.url + path, timeout=5)
    assert r.status_code == 200, r.text
    assert "www-authenticate" not in r.headers


def test_models_listing_requires_credentials(hs_gw: Gateway) -> None:
    assert httpx.get(hs_gw.v1 + "/models", headers=bearer(hs()), timeout=5).status_code == 200
    r = httpx.get(hs_gw.v1 + "/models", timeout=5)
    assert_401(r, "", code="missing_credentials", bearer_error=None)


def test_failed_attempts_are_audited_without_the_credential(hs_gw: Gateway) -> None:
    token = hs(secret="wrong-" + secrets.token_hex(8))
    rid = "auth-audit-" + secrets.token_hex(4)
    assert post_chat(hs_gw, {**bearer(token), "X-Request-Id": rid}).status_code == 401
    rec = hs_gw.wait_audit(rid)
    assert rec["status"] == 401 and rec["error_reason"] == "auth"
    assert [r for r in audit_records(hs_gw) if r.get("request_id") == rid] == [rec]
    out = hs_gw.proc.output()
    assert token not in out and token.split(".")[2] not in out
    assert SECRET not in out and API_KEY not in out


# ---------------------------------------------------------------- secure by default


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [*python_m("gateway"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**clean, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def test_serve_refuses_public_bind_without_auth() -> None:
    port = free_port()
    started = time.monotonic()
    p = run_cli("serve", "--host", "0.0.0.0", "--port", str(port), "--backend", "http://127.0.0.1:9")
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert time.monotonic() - started < 20
    assert "server.host" in p.stderr and "0.0.0.0" in p.stderr and "authentication" in p.stderr
    assert "--allow-unauthenticated" in p.stderr
    assert "Uvicorn running" not in p.stdout + p.stderr


def test_check_config_refuses_public_bind_without_auth(tmp_path: Path) -> None:
    bad = write_config(tmp_path, "public", {"server": {"host": "0.0.0.0"}})
    p = run_cli("check-config", str(bad))
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "server.host" in p.stderr and "no authentication" in p.stderr
    for ok in (
        {"server": {"host": "0.0.0.0", "allow_unauthenticated": True}},
        {"server": {"host": "127.0.0.2"}},  # loopback: fine without auth
        {"server": {"host": "0.0.0.0"}, "auth": {"api_keys": [{"sha256": sha(API_KEY), "subject": "s"}]}},
    ):
        path = write_config(tmp_path, "ok", ok)
        p = run_cli("check-config", str(path))
        assert p.returncode == 0, (ok, p.stdout, p.stderr)


def test_check_config_never_prints_secrets(tmp_path: Path) -> None:
    cfg = {"auth": {"jwt": {"secret": SECRET}, "api_keys": [{"key": API_KEY, "subject": "s"}]}}
    p = run_cli("check-config", str(write_config(tmp_path, "secrets", cfg)))
    assert p.returncode == 0, p.stderr
    assert SECRET not in p.stdout + p.stderr and API_KEY not in p.stdout + p.stderr


# ---------------------------------------------------------------- examples/auth-limits.yaml + `token`


def cli_token(*extra: str, secret: str = EXAMPLE_SECRET) -> str:
    p = run_cli(
        "token",
        "--config",
        "examples/auth-limits.yaml",
        "--sub",
        "alice",
        "--team",
        "search",
        "--tier",
        "interactive",
        *extra,
        env={"GATEWAY_JWT_SECRET": secret},
    )
    assert p.returncode == 0, p.stderr
    token = p.stdout.strip()
    assert token.count(".") == 2 and "\n" not in token
    return token


def test_token_command_mints_a_token_the_example_gateway_accepts(example_gw: Gateway) -> None:
    token = cli_token()
    c = unseg(token, 1)
    assert (c["sub"], c["team"], c["tier"]) == ("alice", "search", "interactive")
    assert c["exp"] > time.time()
    with sdk(example_gw, token) as client:
        r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=3)  # type: ignore[arg-type]
        assert r.choices[0].message.content
        stream = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=3, stream=True)  # type: ignore[arg-type]
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    mine = example_gw.wait_logs(lambda r: r.get("event") == "request" and r.get("subject") == "alice", 2)
    assert all(r["team"] == "search" and r["status"] == 200 for r in mine)
    out = example_gw.proc.output()
    assert token not in out and token.split(".")[2] not in out and EXAMPLE_SECRET not in out


def test_example_gateway_rejects_a_token_signed_with_another_secret(example_gw: Gateway) -> None:
    token = cli_token(secret="another-secret-" + secrets.token_hex(8))
    assert_401(post_chat(example_gw, bearer(token)), token, extra=[EXAMPLE_SECRET])
    now = int(time.time())  # `token` refuses to sign an expired token: sign one here
    claims = {"sub": "alice", "team": "search", "tier": "interactive", "iat": now - 180, "exp": now - 120}
    expired = jose_jwt.encode(claims, EXAMPLE_SECRET, algorithm="HS256")
    assert_401(post_chat(example_gw, bearer(expired)), expired, code="token_expired")


def test_example_api_key(example_gw: Gateway) -> None:
    assert post_chat(example_gw, {"x-api-key": EXAMPLE_API_KEY}).status_code == 200
    r = post_chat(example_gw, bearer(EXAMPLE_API_KEY), model="big")  # team research: only `tiny`
    assert_error(r, 403, "permission_error", "model_not_allowed")
    recs = example_gw.wait_logs(
        lambda r: r.get("event") == "request" and r.get("subject") == "ingest-service", 2
    )
    assert all(r["team"] == "research" for r in recs)
    assert EXAMPLE_API_KEY not in example_gw.proc.output()


def test_models_list_shows_only_what_the_caller_may_use(tmp_path: Path) -> None:
    sim = Sim(None, "--model", "tiny", "--model", "big")
    cfg = tmp_path / "gw.yaml"
    digest = hashlib.sha256(b"sk-only-tiny").hexdigest()
    cfg.write_text(
        f"auth:\n  api_keys:\n    - {{sha256: {digest}, subject: s, team: t}}\n"
        "teams:\n  t: {models: [tiny]}\n"
    )
    gw = Gateway([sim.url], config=cfg)
    try:
        c = openai.OpenAI(base_url=gw.v1, api_key="sk-only-tiny", max_retries=0)
        assert [m.id for m in c.models.list()] == ["tiny"]
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("big")
    finally:
        gw.stop()
        sim.stop()
