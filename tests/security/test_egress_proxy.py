"""The external fallback reaches the internet only through the egress proxy, with TLS intact.

Real processes on 127.0.0.1: the bundled simulator served over TLS (a certificate for
``localhost`` from a CA made here) plays the provider; a small CONNECT proxy in this process
records what it tunnels or forwards; the gateway's local replica is stopped so that only the
fallback can serve. The vLLM replicas themselves never go through the proxy.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.pipeline.egress import bypasses, choose_proxy, redact_proxy
from tests.idp import IdP, SigningKey
from tests.procs import Gateway, Proc, Sim, free_port

MSG = [{"role": "user", "content": "red green blue"}]
SECRET = "s3cret-Proxy-pw"
PRIVATE_NAME = "provider.invalid"  # resolvable only by the proxy, like a provider without local DNS


def proxy_env(**given: str) -> dict[str, str]:
    """``given`` with every other proxy variable set empty, so the runner's own do not decide.

    A set lower-case variable wins over the upper-case one even when empty (urllib's rule), so
    the lower-case twin of a given upper-case name is left alone rather than emptied.
    """
    env = {
        v: ""
        for scheme in ("http", "https", "all", "no")
        for v in (f"{scheme}_proxy", f"{scheme}_PROXY".upper())
    }
    for name in given:
        if name.isupper():
            env.pop(name.lower(), None)
    return env | given


# ----------------------------------------------------------------------------- certificates


@dataclass
class Pki:
    ca: Path  # trusted by the gateway (SSL_CERT_FILE)
    provider: tuple[Path, Path]  # localhost, issued by the trusted CA
    wrong_name: tuple[Path, Path]  # proxy.invalid, issued by the trusted CA
    untrusted: tuple[Path, Path]  # localhost, issued by a CA nobody trusts


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    tmp: Path,
    stem: str,
    host: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *also: str,
) -> tuple[Path, Path]:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(host))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in (host, *also)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    crt, pem = tmp / f"{stem}.crt", tmp / f"{stem}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return crt, pem


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    tmp = tmp_path_factory.mktemp("pki")
    trusted, rogue = _ca("gateway test CA"), _ca("rogue CA")
    ca = tmp / "ca.crt"
    ca.write_bytes(trusted[0].public_bytes(serialization.Encoding.PEM))
    return Pki(
        ca=ca,
        provider=_leaf(tmp, "provider", "localhost", trusted, PRIVATE_NAME),
        wrong_name=_leaf(tmp, "wrong", "proxy.invalid", trusted),
        untrusted=_leaf(tmp, "untrusted", "localhost", rogue),
    )


# ----------------------------------------------------------------------------- the provider over TLS

_TLS_SIM = """
import argparse, sys, uvicorn
from gateway.sim.options import add_sim_arguments, config_from_args
from gateway.sim.server import Simulator
p = argparse.ArgumentParser(); add_sim_arguments(p)
args = p.parse_args(["--itl", "0.002"])
uvicorn.run(Simulator(config_from_args(args)), host="127.0.0.1", port=int(sys.argv[1]),
            ssl_certfile=sys.argv[2], ssl_keyfile=sys.argv[3], log_level="warning")
"""


class TlsSim:
    """The bundled simulator behind uvicorn's TLS, as ``https://localhost:PORT``."""

    def __init__(self, cert: tuple[Path, Path], ca: Path) -> None:
        self.port = free_port()
        self.url = f"https://localhost:{self.port}"
        self.ca = ssl.create_default_context(cafile=str(ca))
        self.proc = Proc([sys.executable, "-c", _TLS_SIM, str(self.port), *map(str, cert)], name="tls-sim")
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(self.url + "/version", verify=self.ca, timeout=2).raise_for_status()
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline or not self.proc.alive():
                    self.proc.kill()
                    raise RuntimeError(
                        f"TLS simulator did not start:\n{self.proc.output()[-2000:]}"
                    ) from None
                time.sleep(0.05)

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.url + "/sim/stats", verify=self.ca, timeout=5).json()
        return data

    def stop(self) -> None:
        self.proc.stop()


@pytest.fixture(scope="module")
def provider(pki: Pki) -> Iterator[TlsSim]:
    s = TlsSim(pki.provider, pki.ca)
    yield s
    s.stop()


# ----------------------------------------------------------------------------- the egress proxy


@dataclass
class ConnectProxy:
    """An HTTP proxy on 127.0.0.1 in a thread of its own: CONNECT tunnels and absolute-form requests.

    Records the CONNECT targets (``host:port``), the absolute-form URLs and the
    Proxy-Authorization each request carried. With ``require`` (``user:password``) it answers
    407 without it; with ``mitm`` (a certificate and key) it answers CONNECT with 200 and then
    terminates TLS itself, as an intercepting proxy would.
    """

    require: str | None = None
    mitm: tuple[Path, Path] | None = None
    connects: list[str] = field(default_factory=list)
    forwarded: list[str] = field(default_factory=list)
    auth_seen: list[str | None] = field(default_factory=list)
    hosts: dict[str, str] = field(default_factory=lambda: {PRIVATE_NAME: "127.0.0.1"})
    port: int = 0

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        assert started.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        started.set()
        self._loop.run_forever()
        server.close()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _ = line.split(" ", 2)
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)
            }
            auth = headers.get("proxy-authorization")
            self.auth_seen.append(auth)
            if self.require is not None:
                want = "Basic " + base64.b64encode(self.require.encode()).decode()
                if auth != want:
                    writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
                    return
            if method == "CONNECT":
                self.connects.append(target)
                if self.mitm is not None:
                    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    await writer.drain()
                    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                    ctx.load_cert_chain(*self.mitm)
                    try:
                        await writer.start_tls(ctx)
                        await reader.read(1)  # the client gives up on the handshake or sends nothing
                    except (ssl.SSLError, OSError):
                        pass
                    return
                host, _, port = target.rpartition(":")
                # The proxy resolves the name (the gateway's network may have no public DNS).
                up_r, up_w = await asyncio.open_connection(self.hosts.get(host, host), int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
                await self._pipe(reader, writer, up_r, up_w, b"")
                return
            # A plain-http request in absolute form: sent on in origin form, without the proxy's header.
            self.forwarded.append(target)
            u = urlsplit(target)
            up_r, up_w = await asyncio.open_connection(u.hostname, u.port or 80)
            kept = [h for h in header_lines if h and not h.lower().startswith("proxy-")]
            origin = f"{method} {u.path or '/'}{'?' + u.query if u.query else ''} HTTP/1.1"
            first = "\r\n".join([origin, *kept, "Connection: close", "", ""]).encode("latin-1")
            await self._pipe(reader, writer, up_r, up_w, first)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_r: asyncio.StreamReader,
        up_w: asyncio.StreamWriter,
        first: bytes,
    ) -> None:
        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        if first:
            up_w.write(first)
        await asyncio.gather(copy(reader, up_w), copy(up_r, writer))


@pytest.fixture
def proxy() -> Iterator[ConnectProxy]:
    p = ConnectProxy()
    yield p
    p.stop()


# ----------------------------------------------------------------------------- the gateway


def fallback_gateway(
    tmp: Path,
    provider_url: str,
    env: dict[str, str],
    external: dict[str, Any] | None = None,
    fail_max: int = 1000,
) -> Gateway:
    """A gateway whose only replica is stopped: the provider (model ``tiny``) serves everything."""
    local = Sim(None)
    cfg = {
        "backends": [{"url": local.url}],
        "routing": {"default_route": {"fallback": True}},
        "resilience": {"breaker_fail_max": fail_max, "breaker_reset_seconds": 600},
        "external": {
            "base_url": provider_url + "/v1",
            "models": {"tiny": "tiny"},
            "allow_teamless": True,
            **(external or {}),
        },
    }
    path = tmp / f"gw-{free_port()}.yaml"
    path.write_text(orjson.dumps(cfg).decode())
    try:
        gw = Gateway([], config=path, env=proxy_env(**env))
    finally:
        local.proc.kill()
    return gw


def chat(gw: Gateway, stream: bool = False) -> httpx.Response:
    body: dict[str, Any] = {"model": "tiny", "messages": MSG, "max_tokens": 3, "stream": stream}
    return httpx.post(gw.v1 + "/chat/completions", json=body, timeout=30)


def assert_served(gw: Gateway) -> None:
    """A plain and a streamed chat completion, both served by the provider."""
    r = chat(gw)
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-backend"] == "external"
    assert r.json()["choices"][0]["message"]["content"] == " red green blue"
    s = chat(gw, stream=True)
    assert s.status_code == 200, s.text
    assert s.headers["x-gateway-backend"] == "external"
    assert s.text.endswith("data: [DONE]\n\n")
    assert '"error"' not in s.text
    text = "".join(
        orjson.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in s.text.splitlines()
        if line.startswith("data: {") and '"choices":[{' in line
    )
    assert text == " red green blue"


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


# ----------------------------------------------------------------------------- https through CONNECT


def test_https_provider_is_reached_through_the_proxy_from_the_environment(
    tmp_path: Path, pki: Pki, provider: TlsSim, proxy: ConnectProxy
) -> None:
    gw = fallback_gateway(tmp_path, provider.url, {"HTTPS_PROXY": proxy.url, "SSL_CERT_FILE": str(pki.ca)})
    try:
        before = provider.stats()["received"]
        assert_served(gw)
        assert proxy.connects and set(proxy.connects) == {f"localhost:{provider.port}"}
        assert provider.stats()["received"] == before + 2
    finally:
        gw.stop()


def test_provider_name_is_resolved_by_the_proxy_only(
    tmp_path: Path, pki: Pki, provider: TlsSim, proxy: ConnectProxy
) -> None:
    """The gateway sends the provider's name in the CONNECT and verifies the certificate for it;
    it never resolves the name itself (a name only the proxy knows is served)."""
    url = f"https://{PRIVATE_NAME}:{provider.port}"
    gw = fallback_gateway(tmp_path, url, {"HTTPS_PROXY": proxy.url, "SSL_CERT_FILE": str(pki.ca)})
    try:
        assert_served(gw)
        assert set(proxy.connects) == {f"{PRIVATE_NAME}:{provider.port}"}
    finally:
        gw.stop()


def test_lower_case_variable_and_ca_file_setting(
    tmp_path: Path, pki: Pki, provider: TlsSim, proxy: ConnectProxy
) -> None:
    """``https_proxy`` as curl spells it; the CA trusted through ``external.ca_file``."""
    gw = fallback_gateway(tmp_path, provider.url, {"https_proxy": proxy.url}, {"ca_file": str(pki.ca)})
    try:
        assert_served(gw)
        assert set(proxy.connects) == {f"localhost:{provider.port}"}
    finally:
        gw.stop()


def test_no_proxy_match_goes_direct(tmp_path: Path, pki: Pki, provider: TlsSim, proxy: ConnectProxy) -> None:
    env = {"HTTPS_PROXY": proxy.url, "NO_PROXY": "example.com, LOCALHOST", "SSL_CERT_FILE": str(pki.ca)}
    gw = fallback_gateway(tmp_path, provider.url, env)
    try:
        before = provider.stats()["received"]
        assert_served(gw)
        assert provider.stats()["received"] == before + 2
        assert proxy.connects == [] and proxy.auth_seen == []
    finally:
        gw.stop()


def test_configured_proxy_wins_sends_credentials_and_never_logs_them(
    tmp_path: Path, pki: Pki, provider: TlsSim
) -> None:
    authed = ConnectProxy(require=f"egress:{SECRET}")
    decoy = ConnectProxy()  # what the environment names: must not be used
    configured = f"http://egress:{SECRET}@127.0.0.1:{authed.port}"
    env = {"HTTPS_PROXY": decoy.url, "SSL_CERT_FILE": str(pki.ca)}
    gw = fallback_gateway(tmp_path, provider.url, env, {"proxy": configured})
    try:
        assert_served(gw)
        assert set(authed.connects) == {f"localhost:{provider.port}"}
        want = "Basic " + base64.b64encode(f"egress:{SECRET}".encode()).decode()
        assert set(authed.auth_seen) == {want}
        assert decoy.auth_seen == []
        log = gw.proc.output()
        assert f"http://***@127.0.0.1:{authed.port}" in log  # the start-up line says where, masked
        gw.stop()
        log = gw.proc.output()
        assert SECRET not in log and base64.b64encode(f"egress:{SECRET}".encode()).decode() not in log
    finally:
        gw.stop()
        authed.stop()
        decoy.stop()


def test_wrong_proxy_credentials_are_a_502_that_names_no_secret(
    tmp_path: Path, pki: Pki, provider: TlsSim
) -> None:
    """The proxy's refusal is the network's fault, not the provider's: its breaker stays closed."""
    authed = ConnectProxy(require=f"egress:{SECRET}")
    configured = f"http://egress:wrong-{SECRET}@127.0.0.1:{authed.port}"
    env = {"SSL_CERT_FILE": str(pki.ca)}
    gw = fallback_gateway(tmp_path, provider.url, env, {"proxy": configured}, fail_max=2)
    try:
        before = provider.stats()["received"]
        for stream in (False, True, False, True):
            r = chat(gw, stream)
            assert r.status_code == 502, r.text
            assert r.json()["error"]["code"] == "egress_proxy_error"
            assert SECRET not in r.text
        assert provider.stats()["received"] == before
        gw.stop()
        assert SECRET not in gw.proc.output()
    finally:
        gw.stop()
        authed.stop()


def test_plain_http_proxy_refusal_is_the_proxys_not_the_providers(tmp_path: Path) -> None:
    """Through a proxy, plain http's 407 is the proxy's answer: a 502, never a 407 for the client."""
    authed = ConnectProxy(require=f"egress:{SECRET}")
    ext = Sim(None)
    configured = f"http://egress:wrong@127.0.0.1:{authed.port}"
    gw = fallback_gateway(tmp_path, ext.url, {}, {"proxy": configured}, fail_max=2)
    try:
        for stream in (False, True, False, True):
            r = chat(gw, stream)
            assert r.status_code == 502, r.text
            assert r.json()["error"]["code"] == "egress_proxy_error"
        assert ext.stats()["received"] == 0
    finally:
        gw.stop()
        ext.stop()
        authed.stop()


def test_proxy_none_disables_the_environment_proxy(
    tmp_path: Path, pki: Pki, provider: TlsSim, proxy: ConnectProxy
) -> None:
    env = {"HTTPS_PROXY": proxy.url, "SSL_CERT_FILE": str(pki.ca)}
    gw = fallback_gateway(tmp_path, provider.url, env, {"proxy": "none"})
    try:
        assert_served(gw)
        assert proxy.auth_seen == []
    finally:
        gw.stop()


@pytest.mark.parametrize("cert", ["wrong_name", "untrusted"])
def test_intercepting_proxy_is_refused(tmp_path: Path, pki: Pki, provider: TlsSim, cert: str) -> None:
    """A proxy that terminates TLS itself: a certificate of the trusted CA for another name, or
    one for the provider's name from a CA the gateway does not trust. Nothing is served."""
    mitm = ConnectProxy(mitm=getattr(pki, cert))
    gw = fallback_gateway(tmp_path, provider.url, {"HTTPS_PROXY": mitm.url, "SSL_CERT_FILE": str(pki.ca)})
    try:
        before = provider.stats()["received"]
        for stream in (False, True):
            r = chat(gw, stream)
            assert r.status_code == 502, r.text
            assert r.json()["error"]["code"] == "upstream_tls_error"
            assert "choices" not in r.text
        assert set(mitm.connects) == {f"localhost:{provider.port}"}
        assert provider.stats()["received"] == before
    finally:
        gw.stop()
        mitm.stop()


# ----------------------------------------------------------------------------- plain http and local replicas


def test_plain_http_provider_goes_through_the_proxy_in_absolute_form(
    tmp_path: Path, proxy: ConnectProxy
) -> None:
    ext = Sim(None, "--itl", "0.002")
    gw = fallback_gateway(tmp_path, ext.url, {"HTTP_PROXY": proxy.url, "HTTPS_PROXY": "http://127.0.0.1:9"})
    try:
        assert_served(gw)
        assert proxy.connects == []
        assert set(proxy.forwarded) == {f"{ext.url}/v1/chat/completions"}
        assert ext.stats()["received"] == 2
    finally:
        gw.stop()
        ext.stop()


def test_local_replicas_never_use_the_proxy(proxy: ConnectProxy) -> None:
    """vLLM replicas are on the private network: served directly whatever the proxy variables say."""
    local = Sim(None)
    env = {"HTTP_PROXY": proxy.url, "HTTPS_PROXY": proxy.url, "ALL_PROXY": proxy.url, "NO_PROXY": ""}
    gw = Gateway([local.url], env=proxy_env(**env))
    try:
        r = chat(gw)
        assert r.status_code == 200, r.text
        assert r.headers["x-gateway-backend"] == local.url.split("://")[1]
        s = chat(gw, stream=True)
        assert s.text.endswith("data: [DONE]\n\n")
        assert proxy.auth_seen == []
    finally:
        gw.stop()
        local.stop()


@pytest.mark.parametrize("no_proxy", ["", "127.0.0.1"])
def test_jwks_fetch_follows_the_proxy_variables(tmp_path: Path, proxy: ConnectProxy, no_proxy: str) -> None:
    """The other call that may leave the premises, the IdP's key set (httpx), obeys the same variables."""
    idp = IdP()
    idp.publish(SigningKey("ES256", "k1"))
    cfg = {
        "backends": [{"url": "http://127.0.0.1:9"}],
        "auth": {"jwt": {"algorithms": ["ES256"], "jwks_url": idp.url}},
    }
    path = tmp_path / "jwks.yaml"
    path.write_text(orjson.dumps(cfg).decode())
    gw = Gateway(
        [],
        config=path,
        env=proxy_env(HTTP_PROXY=proxy.url, NO_PROXY=no_proxy),
        wait_ready=False,
    )
    try:
        wait_for(lambda: idp.count > 0, "the gateway fetched the key set")
        assert proxy.forwarded == ([] if no_proxy else [idp.url])
    finally:
        gw.stop()
        idp.stop()


# ----------------------------------------------------------------------------- the choice, in process


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({}, (None, "direct")),
        ({"HTTPS_PROXY": "http://p:3128"}, ("http://p:3128", "HTTPS_PROXY")),
        ({"https_proxy": "http://low:1", "HTTPS_PROXY": "http://up:1"}, ("http://low:1", "https_proxy")),
        ({"https_proxy": "", "HTTPS_PROXY": "http://up:1"}, (None, "direct")),  # empty lower-case: off
        ({"HTTPS_PROXY": "http://p:1", "no_proxy": "", "NO_PROXY": "*"}, ("http://p:1", "HTTPS_PROXY")),
        ({"HTTP_PROXY": "http://p:3128"}, (None, "direct")),  # http's proxy is not https's
        ({"ALL_PROXY": "http://all:1"}, ("http://all:1", "ALL_PROXY")),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "*"}, (None, "no_proxy")),
        ({"HTTPS_PROXY": "http://p:1", "no_proxy": ".Example.com"}, (None, "no_proxy")),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "ample.com"}, ("http://p:1", "HTTPS_PROXY")),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "api.example.com:8443"}, ("http://p:1", "HTTPS_PROXY")),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "api.example.com:443"}, (None, "no_proxy")),
    ],
)
def test_proxy_choice_from_the_environment(env: dict[str, str], want: tuple[str | None, str]) -> None:
    route = choose_proxy("https://api.example.com/v1", None, env)
    assert (route.url, route.source) == want


@pytest.mark.parametrize("lower", [None, "", "http://low:1"])
@pytest.mark.parametrize("upper", [None, "", "http://up:1"])
def test_variable_case_rules_match_urllib(
    monkeypatch: pytest.MonkeyPatch, lower: str | None, upper: str | None
) -> None:
    """Differential: which of https_proxy/HTTPS_PROXY counts agrees with urllib's getproxies()."""
    import os
    import urllib.request

    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    env = {k: v for k, v in (("https_proxy", lower), ("HTTPS_PROXY", upper)) if v is not None}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    reference = urllib.request.getproxies_environment().get("https")
    assert choose_proxy("https://api.example.com/v1", None, env).url == reference


def test_configured_proxy_choice() -> None:
    env = {"HTTPS_PROXY": "http://env:1"}
    assert choose_proxy("https://a.example/v1", "http://u:p@cfg:3128", env).url == "http://u:p@cfg:3128"
    for direct in ("", "none", "NONE"):
        assert choose_proxy("https://a.example/v1", direct, env).url is None
    with pytest.raises(ValueError, match="http:// proxy URL"):
        choose_proxy("https://a.example/v1", None, {"HTTPS_PROXY": "socks5://u:secret@p:1080"})
    with pytest.raises(ValueError) as info:
        choose_proxy("https://a.example/v1", "ftp://u:secret@p:1", {})
    assert "secret" not in str(info.value)
    assert redact_proxy("http://u:secret@p:3128") == "http://***@p:3128"


@pytest.mark.parametrize(
    "host",
    [
        "api.example.com",
        "example.com",
        "notexample.com",
        "localhost",
        "LOCALHOST",
        "a.b.internal",
        "10.1.2.3",
    ],
)
@pytest.mark.parametrize(
    "no_proxy", ["example.com", ".example.com", "localhost,internal", "b.internal", "*", "10.1.2.3", " , x"]
)
def test_no_proxy_matches_urllib(host: str, no_proxy: str) -> None:
    """Differential: host-name rules agree with the standard library's proxy_bypass_environment."""
    import urllib.request

    reference: Any = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    assert bypasses(no_proxy, host, 443) == bool(reference(host, {"no": no_proxy}))


def test_no_proxy_ports_and_blocks() -> None:
    assert bypasses("10.0.0.0/8", "10.9.8.7", 443)
    assert not bypasses("10.0.0.0/8", "11.0.0.1", 443)
    assert bypasses("[::1]:8443", "::1", 8443) and not bypasses("[::1]:8443", "::1", 443)
    assert bypasses("::1", "::1", 443)
    assert bypasses("*.example.com", "api.example.com", 443)
