"""The external provider's HTTP client: aiohttp, through the enterprise's egress proxy.

The vLLM replicas keep the lean client of gateway/pipeline/upstream.py (they
are on the private network, and that client's per-request cost matters on the
hot path). Calls to the internet go through this one instead, because they
must honour an egress proxy: HTTP CONNECT tunnels for https (the proxy sees
the tunnel only; the provider's certificate is verified against the
provider's host name, exactly as without a proxy), absolute-form requests for
plain http, ``Proxy-Authorization`` from the proxy URL's credentials. aiohttp
does all of that and is well kept. It costs ~90 µs more CPU per request than
the lean client (measured over loopback, uvloop, a small JSON answer: ~115 µs vs
~29 µs, server included), nothing next to a provider's latency, and the
external path carries only the overflow.

Which proxy, decided once at start-up for the one provider URL:
``external.proxy`` when set (a URL; ``""`` or ``none``: direct), otherwise the
standard environment variables as urllib and httpx read them
(``https_proxy``/``HTTPS_PROXY`` for https, ``http_proxy``/``HTTP_PROXY`` for
http, ``all_proxy`` as the fallback, the lower-case name first;
``no_proxy``/``NO_PROXY`` host suffixes, ``*`` for all).

``EgressClient.post()`` and ``EgressResponse`` have the interface of
``UpstreamClient.post()`` and ``UpstreamResponse``, so the request stage
(attempt.py) relays a provider's answer exactly as a replica's.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from gateway.backends import Backend
from gateway.config import DEFAULT_MAX_RESPONSE_BYTES
from gateway.errors import (
    Fault,
    GatewayError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.pipeline.upstream import MAX_ERROR_BODY_BYTES, UpstreamResponse, read_bounded, read_head

DIRECT_WORDS = ("", "none")  # external.proxy values that mean "no proxy, whatever the environment says"


class EgressProxyError(UpstreamError):
    """The egress proxy refused the tunnel (407: wrong credentials, 403: destination not allowed).

    The network's fault, not the provider's: it does not count against the provider's breaker.
    """

    code = "egress_proxy_error"
    fault = Fault.GATEWAY  # the egress path, not the provider: no breaker count


class EgressProxyUnavailable(UpstreamUnavailable):
    """The egress proxy could not be reached; not the provider's fault either."""

    code = "egress_proxy_unavailable"
    fault = Fault.GATEWAY  # the egress path, not the provider: no breaker count


class ResponseStream(Protocol):
    """What the relay needs from an upstream response (UpstreamResponse has the same shape)."""

    status: int
    content_type: str

    async def read(self, limit: int = ...) -> bytes: ...
    async def read_prefix(self, limit: int = ...) -> bytes: ...
    async def read_chunk(self) -> bytes: ...
    def close(self) -> None: ...
    def release(self) -> None: ...
    def body_consumed(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ProxyRoute:
    """How the provider is reached: ``url`` is the proxy (credentials included), None for direct.

    ``source`` says why: ``external.proxy``, the environment variable used, ``no_proxy`` or
    ``direct``. ``shown`` is the URL with its credentials masked, for logs and errors.
    """

    url: str | None
    source: str

    @property
    def shown(self) -> str:
        return redact_proxy(self.url) if self.url else "direct"


def redact_proxy(url: str) -> str:
    """``http://user:secret@proxy:3128`` → ``http://***@proxy:3128`` (nothing to mask: unchanged)."""
    u = urlsplit(url)
    if u.username is None and u.password is None:
        return url
    host = u.netloc.rsplit("@", 1)[1]
    return u._replace(netloc="***@" + host).geturl()


def check_proxy_url(url: str, where: str) -> str:
    """A proxy URL the client can use: ``http://[user:pass@]host[:port]``. Raises ValueError."""
    u = urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        raise ValueError(
            f"{where} must be an http:// proxy URL (http://[user:pass@]host:port), not {redact_proxy(url)!r}"
        )
    return url


def choose_proxy(target: str, configured: str | None, environ: Mapping[str, str]) -> ProxyRoute:
    """The proxy for requests to ``target`` (the provider's base URL). Raises ValueError.

    ``configured`` is ``external.proxy`` (None: not set, use the environment). The
    environment's rules are urllib's (which httpx, and so the JWKS fetch, uses): a set
    lower-case variable wins over the upper-case one, even when empty; ``no_proxy`` lists host
    names matched as suffixes (``example.com`` covers ``api.example.com``), optionally with a
    port, or ``*`` (see ``bypasses()``).
    """
    if configured is not None:
        if configured.strip().lower() in DIRECT_WORDS:
            return ProxyRoute(None, "external.proxy")
        return ProxyRoute(check_proxy_url(configured, "external.proxy"), "external.proxy")
    u = urlsplit(target)
    host = u.hostname or ""
    for scheme in (u.scheme, "all"):
        name, value = _env(environ, f"{scheme}_proxy")
        if value:
            port = u.port or (443 if u.scheme == "https" else 80)
            if bypasses(_env(environ, "no_proxy")[1], host, port):
                return ProxyRoute(None, "no_proxy")
            return ProxyRoute(check_proxy_url(value, name), name)
    return ProxyRoute(None, "direct")


def _env(environ: Mapping[str, str], name: str) -> tuple[str, str]:
    """(the variable used, its value): the lower-case one whenever it is set, even empty (which
    turns the upper-case one off), as urllib's getproxies() (and so httpx) reads them."""
    if name in environ:
        return name, environ[name]
    upper = name.upper()
    return upper, environ.get(upper, "")


def bypasses(no_proxy: str, host: str, port: int) -> bool:
    """Whether ``no_proxy`` (comma-separated) exempts ``host:port`` from the proxy.

    curl's rules (urllib's, plus ports and CIDR blocks): ``*`` matches every host; a name
    matches itself and its subdomains (a leading ``.`` or ``*.`` is ignored); ``name:port``
    only that port; an IP address itself, a ``10.0.0.0/8`` block the addresses in it.
    Names compare case-insensitively.
    """
    host = host.lower().strip("[]").rstrip(".")
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        want_port: int | None = None
        if entry.count(":") == 1 or (entry.startswith("[") and "]:" in entry):
            name, _, p = entry.rpartition(":")
            if p.isascii() and p.isdigit() and len(p) <= 5:
                entry, want_port = name, int(p)
        if want_port is not None and want_port != port:
            continue
        entry = entry.strip("[]")
        if "/" in entry:
            try:
                if ip is not None and ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        entry = entry.removeprefix("*").lstrip(".").rstrip(".")
        if host == entry or host.endswith("." + entry):
            return True
    return False


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The system's trusted roots (``SSL_CERT_FILE`` honoured) plus ``ca_file`` when given."""
    ctx = ssl.create_default_context()
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    return ctx


class EgressResponse:
    """A provider's started response: status and content type known, body not yet read."""

    __slots__ = ("_client", "_resp", "content_type", "status")

    def __init__(self, resp: aiohttp.ClientResponse, client: EgressClient) -> None:
        self._resp = resp
        self._client = client
        self.status = resp.status
        self.content_type = resp.headers.get("Content-Type", "application/json")

    async def read(self, limit: int = DEFAULT_MAX_RESPONSE_BYTES) -> bytes:
        """The whole body, at most ``limit`` bytes (``streaming.max_response_bytes``).

        Raises UpstreamResponseTooLarge past it (the connection is closed, the rest never read)
        or UpstreamError when the connection breaks first.
        """
        return await read_bounded(self, limit, "The external provider")

    async def read_prefix(self, limit: int = MAX_ERROR_BODY_BYTES) -> bytes:
        """At most the first ``limit`` bytes of the body (an error body's message); a longer
        body is not read further and its connection is closed. Raises UpstreamError as read()."""
        return await read_head(self, limit)

    async def read_chunk(self) -> bytes:
        """Whatever bytes have arrived (at least one); b"" at the end of the body.

        Raises UpstreamError when the connection breaks before the body's end.
        """
        try:
            return await self._resp.content.readany()
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(
                f"The external provider broke off its response: {self._client.describe(exc)}"
            ) from None

    def close(self) -> None:
        """Drop the connection (an unfinished answer: the provider stops generating)."""
        self._resp.close()

    def release(self) -> None:
        """Back to the pool if the body was read to its end, else the connection is closed."""
        self._resp.release()

    def body_consumed(self) -> None:
        """The relay saw the stream's ``[DONE]``; aiohttp pools the connection itself on release()."""


class EgressClient:
    """aiohttp session for one external provider; created on first use, closed by the lifespan.

    ``post()`` raises UpstreamUnavailable (the provider unreachable), EgressProxyUnavailable,
    EgressProxyError (the proxy refused the tunnel), UpstreamTimeout (connecting, tunnel and
    TLS handshake included, took longer than ``connect`` seconds) or UpstreamError (the
    provider's certificate failed verification: code ``upstream_tls_error``).
    """

    def __init__(self, route: ProxyRoute, tls: ssl.SSLContext, connect_timeout: float) -> None:
        self.route = route
        self._tls = tls
        self._connect = connect_timeout
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[tuple[str, bytes], URL] = {}
        self._secret = urlsplit(route.url).password if route.url else None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(ssl=self._tls, limit=0, limit_per_host=0)
        self._session = aiohttp.ClientSession(
            connector=connector,
            # Only the connection is timed here (pool wait, proxy tunnel and TLS included): the
            # request stage owns the first-byte, idle and total deadlines.
            timeout=aiohttp.ClientTimeout(total=None, connect=self._connect),
            trust_env=False,  # the proxy was chosen once (choose_proxy); no netrc credentials
            cookie_jar=aiohttp.DummyCookieJar(),  # a provider's cookies must not follow other users
            # Bodies relayed as they arrive: no compression, so an SSE event is never held
            # back in a decompressor.
            skip_auto_headers=("Accept-Encoding",),
            auto_decompress=False,
        )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def describe(self, exc: BaseException) -> str:
        """An exception as text for errors and logs, with the proxy's password masked."""
        text = str(exc)
        out = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        return out.replace(self._secret, "***") if self._secret else out

    def _url(self, backend: Backend, path: bytes) -> URL:
        key = (backend.url, path)
        url = self._urls.get(key)
        if url is None:
            url = self._urls[key] = URL(backend.url + path.decode(), encoded=True)
        return url

    async def post(
        self,
        backend: Backend,
        path: bytes,
        body: bytes,
        request_id: str,
        extra_headers: dict[str, str] | None = None,
    ) -> EgressResponse:
        """Send the request; return once the response headers have arrived."""
        session = self._session or self._open()
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        if backend.auth_header is not None:
            headers["Authorization"] = backend.auth_header
        if extra_headers:
            headers.update(extra_headers)
        try:
            resp = await session.post(
                self._url(backend, path),
                data=body,
                headers=headers,
                proxy=self.route.url,
                allow_redirects=False,
            )
        except aiohttp.ServerTimeoutError:
            raise UpstreamTimeout(
                f"Connecting to the external provider {backend.label} took longer than {self._connect:g}s.",
                code="upstream_connect_timeout",
            ) from None
        except aiohttp.ClientError as exc:
            raise self._failure(exc, backend) from None
        except OSError as exc:
            raise UpstreamUnavailable(
                f"Could not reach the external provider {backend.label}: {self.describe(exc)}",
                retry_after=1,
            ) from None
        if resp.status == 407 and self.route.url is not None:
            # Plain http goes to the proxy in absolute form, so its refusal arrives as the answer:
            # the proxy's, never the provider's to pass on to the client.
            resp.close()
            raise self._refused(backend, 407)
        return EgressResponse(resp, self)

    def _refused(self, backend: Backend, status: int) -> EgressProxyError:
        return EgressProxyError(
            f"The egress proxy {self.route.shown} refused the request to {backend.label} ({status})."
        )

    def _failure(self, exc: aiohttp.ClientError, backend: Backend) -> GatewayError:
        what = self.describe(exc)
        if isinstance(exc, aiohttp.ClientSSLError):
            # Not the provider proven by its certificate (a man in the middle, a wrong CA bundle):
            # nothing is sent, and retrying does not help.
            return UpstreamError(
                f"TLS verification of the external provider {backend.label} failed: {what}",
                code="upstream_tls_error",
            )
        if isinstance(exc, aiohttp.ClientHttpProxyError):
            # The proxy answered the CONNECT with an error (407: wrong credentials, 403: not allowed).
            return self._refused(backend, exc.status)
        if isinstance(exc, aiohttp.ClientProxyConnectionError):
            return EgressProxyUnavailable(
                f"Could not reach the egress proxy {self.route.shown}: {what}", retry_after=1
            )
        return UpstreamUnavailable(
            f"Could not reach the external provider {backend.label}: {what}", retry_after=1
        )


def _conforms(r: EgressResponse) -> ResponseStream:
    return r  # mypy checks here that the relay's interface is kept


def _conforms_local(r: UpstreamResponse) -> ResponseStream:
    return r
