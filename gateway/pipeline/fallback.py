"""The external fallback: an OpenAI-compatible provider used when the local pool cannot serve.

Opt-in per route (``fallback: true``) and per team: a team with
``data_residency: strict`` is never sent off-premises, whatever happens, and
principals without a team are not either unless ``external.allow_teamless``.
A circuit breaker guards the provider like any replica. Anthropic's Messages
API is not adapted yet: the provider must speak OpenAI's chat/completions.
"""

from __future__ import annotations

import os

import orjson

from gateway.auth.principal import Principal
from gateway.backends import Backend
from gateway.config import BackendSettings, ResilienceSettings, Settings
from gateway.config_routing import ExternalSettings
from gateway.errors import GatewayError, NoBackendAvailable
from gateway.pipeline.admit import QueueFull, QueueTimeout
from gateway.pipeline.receive import ParsedRequest
from gateway.pipeline.route import RoutePlan


class ExternalFallback:
    def __init__(self, external: ExternalSettings, settings: Settings) -> None:
        key = os.environ.get(external.api_key_env) if external.api_key_env else None
        backend_settings = BackendSettings.model_validate(
            {"url": external.base_url, "name": external.name, "api_key": key, "max_in_flight": 100_000}
        )
        r: ResilienceSettings = settings.resilience
        self.backend = Backend.from_settings(backend_settings, r)
        self._external = external
        self._strict = {name for name, t in settings.teams.items() if t.data_residency == "strict"}
        self._known_teams = set(settings.teams)

    def allowed(self, principal: Principal, plan: RoutePlan) -> bool:
        if not plan.fallback or plan.model not in self._external.models:
            return False
        team = principal.team
        if team is None:
            return self._external.allow_teamless
        return team not in self._strict

    @staticmethod
    def worth_it(exc: GatewayError) -> bool:
        """Failures of the local pool that the provider may cover (nothing sent to the client yet)."""
        return exc.retryable or isinstance(exc, (NoBackendAvailable, QueueTimeout, QueueFull))

    def request_body(self, req: ParsedRequest, plan: RoutePlan) -> bytes:
        body = dict(req.body)
        body["model"] = self._external.models[plan.model]
        return orjson.dumps(body)
