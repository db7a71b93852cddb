"""A JWKS cache: fetched with httpx, refreshed on schedule and on an unknown `kid`.

Refetches triggered by unknown `kid`s are rate-limited (one per
``jwks_min_refresh_seconds``) and coalesced into one request, so a flood of
forged `kid`s cannot hammer the identity provider. When the IdP is down the
last good key set stays in use.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import structlog
from jose import jwk
from jose.backends.base import Key
from jose.exceptions import JOSEError

from gateway.config_auth import JwtSettings

MAX_JWKS_BYTES = 1 << 20  # bytes of a JWKS document read at most (real ones are a few KB)


class JwksUnavailable(Exception):
    """No key set could ever be fetched."""


class JwksCache:
    def __init__(self, settings: JwtSettings, on_change: Callable[[], None]) -> None:
        assert settings.jwks_url is not None
        self._url = settings.jwks_url
        self._settings = settings
        self._on_change = on_change
        self._keys: dict[str | None, dict[str, Any]] = {}
        self._built: dict[tuple[str | None, str], Key] = {}
        self._fetched_at = 0.0  # monotonic time of the last attempt
        self._loaded = False
        self._inflight: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._log = structlog.get_logger("gateway.auth.jwks")

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=5.0)
        await self.refresh()

    async def stop(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()
        if self._client is not None:
            await self._client.aclose()

    async def refresh(self) -> None:
        """Fetch now, sharing one request among concurrent callers."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.create_task(self._fetch())
        await asyncio.shield(self._inflight)

    async def _fetch(self) -> None:
        assert self._client is not None
        self._fetched_at = time.monotonic()
        try:
            async with self._client.stream("GET", self._url) as r:
                r.raise_for_status()
                body = bytearray()
                async for chunk in r.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:  # a key set is a few KB; an endless one is not one
                        raise ValueError("the JWKS document is too large")
            data = orjson.loads(body)
            keys = {k.get("kid"): k for k in data.get("keys", []) if isinstance(k, dict)}
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            self._log.warning("jwks fetch failed; keeping the last key set", error=type(exc).__name__)
            return
        if keys != self._keys:
            self._keys = keys
            self._built.clear()
            self._on_change()  # e.g. drop cached verdicts: a removed key must stop working
            self._log.info("jwks loaded", kids=sorted(str(k) for k in keys))
        self._loaded = True

    def stale(self) -> bool:
        return time.monotonic() - self._fetched_at >= self._settings.jwks_cache_seconds

    async def key_for(self, kid: str | None, alg: str) -> Key | None:
        age = time.monotonic() - self._fetched_at
        stale = age >= self._settings.jwks_cache_seconds
        if stale or (kid not in self._keys and age >= self._settings.jwks_min_refresh_seconds):
            await self.refresh()
        if not self._loaded:
            raise JwksUnavailable
        data = self._keys.get(kid)
        if data is None and kid is None and len(self._keys) == 1:
            data = next(iter(self._keys.values()))
        if data is None:
            return None
        if data.get("alg") not in (None, alg) or data.get("kty") != _KTY.get(alg[:2]):
            return None  # e.g. a header claiming ES256 with the kid of an RSA key
        built = self._built.get((kid, alg))
        if built is None:
            try:
                built = self._built[(kid, alg)] = jwk.construct(data, alg)
            except JOSEError:
                return None
        return built


_KTY = {"RS": "RSA", "ES": "EC", "HS": "oct", "PS": "RSA"}
