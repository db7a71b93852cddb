"""Stage 6, call upstream: the only module that knows which HTTP client talks to vLLM.

aiohttp, not httpx, on the hot path: httpx's pure-Python stack (h11,
httpcore, anyio) costs about twice the CPU per relayed SSE chunk (see
docs/benchmarks.md). Swapping the client means rewriting this module only:
the rest of the gateway sees ``UpstreamClient`` and ``UpstreamResponse``.
"""

from __future__ import annotations

import aiohttp

from gateway.backends import Backend
from gateway.config import TimeoutSettings
from gateway.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable


class ProbeFailed(Exception):
    """A poller GET that got no HTTP answer."""


class UpstreamResponse:
    """A started upstream response: status and content type known, body not yet read."""

    __slots__ = ("_resp", "content_type", "status")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.content_type = resp.headers.get("Content-Type", "application/json")

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"The backend broke off its response: {_describe(exc)}") from None

    async def read_chunk(self) -> bytes:
        """Whatever bytes have arrived (at least one); b"" at end of stream."""
        try:
            return await self._resp.content.readany()
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"The backend broke off the stream: {_describe(exc)}") from None

    def close(self) -> None:
        # Closing (not releasing) an unfinished response drops the connection,
        # which is how vLLM learns to abort the generation.
        self._resp.close()

    def release(self) -> None:
        self._resp.release()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class UpstreamClient:
    def __init__(self, timeouts: TimeoutSettings) -> None:
        self._timeouts = timeouts
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self._timeouts.connect, sock_connect=self._timeouts.connect
            ),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            # The gateway never parses upstream JSON with aiohttp's helpers.
            raise_for_status=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def get(self, backend: Backend, path: str, timeout: float) -> tuple[int, bytes]:
        """A small GET for the background poller (health, models, metrics).

        On the same aiohttp session as the proxied calls: an httpx request costs several
        times more CPU, and the poller runs forever (docs/benchmarks.md, idle burn).
        Raises ProbeFailed with a short cause.
        """
        assert self._session is not None
        headers = {"Authorization": backend.auth_header} if backend.auth_header else None
        try:
            async with self._session.get(
                backend.url + path, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                return resp.status, await resp.read()
        except TimeoutError:
            raise ProbeFailed(f"timed out after {timeout:g}s") from None
        except aiohttp.ClientConnectorError as exc:
            raise ProbeFailed(_describe(exc.os_error)) from None
        except aiohttp.ClientError as exc:
            raise ProbeFailed(_describe(exc)) from None

    async def post(
        self,
        backend: Backend,
        path: bytes,
        body: bytes,
        request_id: str,
        extra_headers: dict[str, str] | None = None,
    ) -> UpstreamResponse:
        """Send the request; return once the response headers have arrived."""
        assert self._session is not None
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        if backend.auth_header is not None:
            headers["Authorization"] = backend.auth_header
        if extra_headers:
            headers.update(extra_headers)
        try:
            resp = await self._session.post(backend.url + path.decode(), data=body, headers=headers)
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnavailable(
                f"Could not connect to backend {backend.label}: {_describe(exc.os_error)}",
                retry_after=1,
            ) from None
        except TimeoutError:  # aiohttp's connect timeout; before ClientError, its base
            raise UpstreamTimeout(
                f"Connecting to backend {backend.label} took longer than {self._timeouts.connect:g}s.",
                code="upstream_connect_timeout",
            ) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise UpstreamUnavailable(
                f"Backend {backend.label} closed the connection before answering: {_describe(exc)}",
                retry_after=1,
            ) from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"Backend {backend.label} sent an invalid response: {_describe(exc)}"
            ) from None
        return UpstreamResponse(resp)
