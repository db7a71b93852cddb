"""The external fallback: an OpenAI-compatible provider used when the local pool cannot serve.

Opt-in per route (``fallback: true``) and per team: a team with
``data_residency: strict`` is never sent off-premises, whatever happens, and
principals without a team are not either unless ``external.allow_teamless``.
A circuit breaker guards the provider like any replica. The provider speaks
OpenAI's API (``kind: openai``) or Anthropic's Messages API (``kind:
anthropic``, chat only, translated by gateway/pipeline/anthropic.py).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import orjson

from gateway.asgi import Send
from gateway.auth.principal import Principal
from gateway.backends import Backend
from gateway.config import BackendSettings, ResilienceSettings, Settings
from gateway.config_routing import ExternalSettings
from gateway.errors import GatewayError, NoBackendAvailable, UpstreamTimeout
from gateway.pipeline import anthropic
from gateway.pipeline.admit import QueueFull, QueueTimeout
from gateway.pipeline.attempt import Deadlines, attempt, on_backend
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.receive import ParsedRequest
from gateway.pipeline.relay import gateway_headers
from gateway.pipeline.route import RoutePlan
from gateway.pipeline.upstream import UpstreamClient


class ExternalFallback:
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
        upstream: UpstreamClient,
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
            await attempt(upstream, self.backend, req, body, upstream_id, send, ex, deadlines, settings, itl)
            return
        body = anthropic.to_messages(req.body, model, self._external.default_max_tokens)
        b = self.backend
        with on_backend(b, ex):
            try:
                async with asyncio.timeout_at(deadlines.first_byte):
                    resp = await upstream.post(b, b"/v1/messages", body, upstream_id, self._headers)
            except TimeoutError:
                raise UpstreamTimeout("The external provider did not answer in time.") from None
            ex.upstream_first = time.perf_counter()
            try:
                await anthropic.relay_anthropic(
                    resp,
                    send,
                    ex,
                    ex.request_id.encode(),
                    gateway_headers(ex),
                    stream=req.stream,
                    include_usage=req.client_wants_usage,
                    total_deadline=deadlines.total,
                )
            finally:
                ex.upstream_done = time.perf_counter()
                resp.close()
