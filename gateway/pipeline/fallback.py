"""The external fallback: an OpenAI-compatible provider used when the local pool cannot serve.

Opt-in per route (``fallback: true``) and per team: a team with
``data_residency: strict`` is never sent off-premises, whatever happens, and
principals without a team are not either unless ``external.allow_teamless``.
A circuit breaker guards the provider like any replica. The provider speaks
OpenAI's API (``kind: openai``) or Anthropic's Messages API (``kind:
anthropic``, chat only, translated by gateway/pipeline/anthropic.py).

The provider is reached through its own client (gateway/pipeline/egress.py:
aiohttp, through the egress proxy), never the replicas' one. Its answers are
checked before they are relayed: a malformed one is the provider's fault (502,
or the final SSE error event once a stream has started) and counts against its
breaker; its 4xx are the request's and do not.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, cast

import orjson
import structlog

from gateway.asgi import Send
from gateway.auth.principal import Principal
from gateway.backends import Backend
from gateway.config import (
    DEFAULT_MAX_RESPONSE_BYTES,
    BackendSettings,
    ConfigError,
    ResilienceSettings,
    Settings,
)
from gateway.config_routing import ExternalSettings
from gateway.errors import (
    GatewayError,
    NoBackendAvailable,
    TotalTimeout,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.pipeline import anthropic
from gateway.pipeline.admit import QueueFull, QueueTimeout
from gateway.pipeline.attempt import Deadlines, attempt, on_backend
from gateway.pipeline.egress import EgressClient, ResponseStream, choose_proxy, tls_context
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.receive import ParsedRequest
from gateway.pipeline.relay import gateway_headers
from gateway.pipeline.route import RoutePlan
from gateway.pipeline.sse import EventTooLarge, SseSplitter
from gateway.pipeline.upstream import MAX_ERROR_BODY_BYTES, UpstreamClient


class ExternalFallback:
    """The provider, its client and its breaker; built at start-up. Raises ConfigError when the
    egress proxy (``external.proxy`` or the environment's) is not a usable http:// URL.
    """

    def __init__(self, external: ExternalSettings, settings: Settings) -> None:
        key = os.environ.get(external.api_key_env) if external.api_key_env else None
        self.kind = external.kind
        self._headers: dict[str, str] = {}
        if external.kind == "anthropic":
            # Anthropic takes its key in x-api-key, not as a bearer token.
            self._headers = {"anthropic-version": external.anthropic_version}
            if key:
                self._headers["x-api-key"] = key
            key = None
        backend_settings = BackendSettings.model_validate(
            {"url": external.base_url, "name": external.name, "api_key": key, "max_in_flight": 100_000}
        )
        r: ResilienceSettings = settings.resilience
        self.backend = Backend.from_settings(backend_settings, r)
        self._external = external
        self._strict = {name for name, t in settings.teams.items() if t.data_residency == "strict"}
        self._known_teams = set(settings.teams)
        configured = external.proxy.get_secret_value() if external.proxy is not None else None
        try:
            route = choose_proxy(external.base_url, configured, os.environ)
            tls = tls_context(external.ca_file)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"external: {exc}") from exc
        self.client = EgressClient(route, tls, settings.timeouts.connect)
        self._checked = _CheckedProvider(self.client, settings.streaming.max_event_bytes)
        structlog.get_logger("gateway.fallback").info(
            "external provider", provider=self.backend.label, proxy=route.shown, proxy_from=route.source
        )

    async def close(self) -> None:
        await self.client.close()

    def allowed(self, principal: Principal, plan: RoutePlan, req: ParsedRequest) -> bool:
        if not plan.fallback or plan.model not in self._external.models:
            return False
        if self.kind == "anthropic" and (req.endpoint.name != "chat" or not anthropic.supports(req.body)):
            return False
        team = principal.team
        if team is None or team not in self._known_teams:
            # No team, or one the config does not know (a typo in a claim, say): its data policy is
            # unknown, so it stays on-premises unless the operator said otherwise.
            return self._external.allow_teamless
        return team not in self._strict

    @staticmethod
    def worth_it(exc: GatewayError) -> bool:
        """Failures of the local pool that the provider may cover (nothing sent to the client yet)."""
        return exc.retryable or isinstance(exc, (NoBackendAvailable, QueueTimeout, QueueFull))

    async def forward(
        self,
        upstream: UpstreamClient,  # the replicas' client: not used, the provider has its own
        req: ParsedRequest,
        plan: RoutePlan,
        upstream_id: str,
        send: Send,
        ex: Exchange,
        deadlines: Deadlines,
        settings: Settings,
        itl: Any,
    ) -> None:
        model = self._external.models[plan.model]
        if self.kind == "openai":
            body = orjson.dumps({**req.body, "model": model})
            # The checked client has UpstreamClient's interface (post() → a response with
            # status, content_type, read(), read_chunk(), close(), release()); egress.py's
            # ResponseStream protocol is that interface, checked by mypy on both sides.
            client = cast(UpstreamClient, self._checked)
            await attempt(client, self.backend, req, body, upstream_id, send, ex, deadlines, settings, itl)
            return
        body = anthropic.to_messages(req.body, model, self._external.default_max_tokens)
        b = self.backend
        with on_backend(b, ex):
            try:
                # Like vLLM, the provider sends a plain answer's headers only once it is generated.
                wait = deadlines.headers(req.stream)
                async with asyncio.timeout_at(wait):
                    resp = await self.client.post(b, b"/v1/messages", body, upstream_id, self._headers)
            except TimeoutError:
                if deadlines.is_total(wait):
                    raise TotalTimeout("The external provider took too long.") from None
                raise UpstreamTimeout(
                    "The external provider did not answer in time.", code="first_byte_timeout"
                ) from None
            ex.upstream_first = now = time.perf_counter()
            ex.upstream_ttfb = now - ex.started
            finished = False
            try:
                await anthropic.relay_anthropic(
                    resp,
                    send,
                    ex,
                    ex.request_id.encode(),
                    [*gateway_headers(ex), *ex.reservation.headers],
                    stream=req.stream,
                    include_usage=req.client_wants_usage,
                    idle=settings.timeouts.idle,
                    total_deadline=deadlines.total,
                    max_event_bytes=settings.streaming.max_event_bytes,
                    max_response_bytes=settings.streaming.max_response_bytes,
                )
                finished = ex.reason in (None, "upstream_client_error")
            except TimeoutError:
                raise TotalTimeout("The external provider took too long.") from None
            finally:
                ex.upstream_done = time.perf_counter()
                # A connection is kept (its tunnel and TLS session too) only after a complete answer.
                if finished and not ex.disconnected:
                    resp.release()
                else:
                    resp.close()


class _CheckedProvider:
    """EgressClient whose answers are checked as an OpenAI-compatible provider's."""

    __slots__ = ("_client", "_max_event_bytes")

    def __init__(self, client: EgressClient, max_event_bytes: int) -> None:
        self._client = client
        self._max_event_bytes = max_event_bytes

    async def post(
        self,
        backend: Backend,
        path: bytes,
        body: bytes,
        request_id: str,
        extra_headers: dict[str, str] | None = None,
    ) -> _CheckedAnswer:
        resp = await self._client.post(backend, path, body, request_id, extra_headers)
        list_key = b"data" if path.endswith(b"/embeddings") else b"choices"
        return _CheckedAnswer(resp, list_key, self._max_event_bytes)


INVALID = anthropic.INVALID
INVALID_EVENT = anthropic.INVALID_EVENT


class _CheckedAnswer:
    """An OpenAI-compatible provider's answer, checked before the relay forwards it.

    ``read()`` (plain answers): a 200 must be a JSON object with a list under ``choices``
    (``data`` for embeddings) and, if any, a ``usage`` object of integer counts.
    ``read_chunk()`` (streams): only whole SSE events are passed on, cut by the WHATWG
    splitter (any line ending, canonical form out), each ``data:`` line JSON (or ``[DONE]``).
    Anything else raises UpstreamError: the relay turns it into a 502 or, once the stream has
    started, the final SSE error event.
    """

    __slots__ = ("_error", "_list_key", "_resp", "_split", "content_type", "status")

    def __init__(self, resp: ResponseStream, list_key: bytes, max_event_bytes: int) -> None:
        self._resp = resp
        self._list_key = list_key.decode()
        self._split = SseSplitter(max_event_bytes)
        self._error: UpstreamError | None = None
        self.status = resp.status
        self.content_type = resp.content_type

    async def read(self, limit: int = DEFAULT_MAX_RESPONSE_BYTES) -> bytes:
        raw = await self._resp.read(limit)  # UpstreamResponseTooLarge past ``limit``
        if self.status == 200:
            _check_plain(raw, self._list_key)
        # Any other answer is put in OpenAI's shape by the relay (relay.upstream_failure).
        return raw

    async def read_prefix(self, limit: int = MAX_ERROR_BODY_BYTES) -> bytes:
        """The start of an error body (the relay reads a non-200 answer only so far)."""
        return await self._resp.read_prefix(limit)

    async def read_chunk(self) -> bytes:
        if self._error is not None:
            raise self._error
        while True:
            data = await self._resp.read_chunk()
            if not data:
                return b""  # a partial last event is dropped: the relay reports the stream cut short
            try:
                out = self._split.feed(data)
            except EventTooLarge:
                raise UpstreamError(
                    "The external provider sent an SSE event longer than the gateway's limit.",
                    code="upstream_event_too_large",
                ) from None
            if not out:
                continue
            good = _good_events(out)
            if good == len(out):
                return out
            self._error = UpstreamError(
                "The external provider sent a stream event that is not a JSON object.", code=INVALID_EVENT
            )
            if good:
                return out[:good]
            raise self._error

    def close(self) -> None:
        self._resp.close()

    def release(self) -> None:
        self._resp.release()

    def body_consumed(self) -> None:
        self._resp.body_consumed()


def _good_events(out: bytes) -> int:
    """Length of the prefix of ``out`` (whole SSE events) whose data lines are JSON objects."""
    at = 0
    for event in out[:-2].split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    continue
                try:
                    ok = isinstance(orjson.loads(payload), dict)
                except orjson.JSONDecodeError:
                    ok = False
                if not ok:
                    return at
        at += len(event) + 2
    return len(out)


def _check_plain(raw: bytes, list_key: str) -> None:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamError("The external provider sent an answer that is not JSON.", code=INVALID) from None
    if not isinstance(data, dict):
        raise UpstreamError("The external provider sent an answer that is not a JSON object.", code=INVALID)
    if not isinstance(data.get(list_key), list):
        raise UpstreamError(
            f"The external provider sent an answer without a `{list_key}` list.", code=INVALID
        )
    usage = data.get("usage")
    if usage is None:
        return
    if not isinstance(usage, dict) or not all(
        isinstance(n, int) and not isinstance(n, bool) for k, n in usage.items() if k.endswith("_tokens")
    ):
        raise UpstreamError("The external provider sent an answer with malformed `usage`.", code=INVALID)


def _conforms(r: _CheckedAnswer) -> ResponseStream:
    return r  # mypy checks here that the relay's interface is kept
