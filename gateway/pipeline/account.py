"""Stage 9, account: metrics, the one audit line per request, and the ledger row.

The audit line carries counts and timings only, never prompt or completion
text, and no credentials.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from gateway.errors import Fault
from gateway.metrics import GatewayMetrics
from gateway.pipeline.exchange import Exchange
from gateway.redact import redact

if TYPE_CHECKING:
    from gateway.ledger.budget import BudgetBook
    from gateway.ledger.writer import LedgerWriter


MAX_TOKEN_COUNT: Final = 2**31 - 1  # the ledger's integer columns; no request comes near it


def plausible_usage(ex: Exchange) -> None:
    """Drop usage figures the request could not have used, whoever reported them (vLLM's usage,
    the external provider's, in any form): a prompt count above ``ex.prompt_cap`` (the model's
    context per sequence), a completion count above ``ex.completion_cap`` (max_tokens, or the
    context, per sequence), or either above ``MAX_TOKEN_COUNT``. Both are then None and
    ``usage_implausible`` set: the request is charged the gateway's estimate, as when usage never
    arrives, so one absurd figure cannot fill a token window or a month's budget. Called by the
    pipeline before it settles the limits."""
    p, c = ex.prompt_tokens, ex.completion_tokens
    if (p is not None and p > (ex.prompt_cap or MAX_TOKEN_COUNT)) or (
        c is not None and c > (ex.completion_cap or MAX_TOKEN_COUNT)
    ):
        ex.prompt_tokens = ex.completion_tokens = None
        ex.usage_implausible = True


class Accountant:
    def __init__(
        self,
        metrics: GatewayMetrics,
        log: Any,
        access_log: bool,
        teams: set[str],
        backends: set[str],
        write_line: Callable[[dict[str, Any]], None] | None = None,
        ledger: LedgerWriter | None = None,
        budgets: BudgetBook | None = None,
    ) -> None:
        self._m = metrics
        self._log = log
        self._write_line = write_line  # the audit line without structlog's chain (logs.audit_writer)
        self._access_log = access_log
        self._teams = teams  # label values are bounded to configured names
        self._backends = backends
        self._ledger = ledger  # the usage ledger (gateway/ledger/): one buffered row per request
        self._budgets = budgets

    def record(self, ex: Exchange, known_model: bool) -> None:
        if self._ledger is not None:
            self._ledger.append(ex, known_model)  # O(1): the row is built and written off the path
            if self._budgets is not None:
                self._budgets.charge(ex)  # teams with a budget: one storage call, not awaited
        m = self._m
        stream = "true" if ex.stream else "false"
        model = ex.model if known_model else "unknown"
        status = "499" if ex.disconnected and not ex.response_started else str(ex.status)
        backend = ex.backend if ex.backend in self._backends else "-"
        m.child(m.requests, ex.endpoint, model, ex.route, backend, status, stream).inc()
        duration = ex.finished - ex.started
        m.child(m.duration, ex.endpoint, stream).observe(duration)
        if ex.ttft is not None:
            m.child(m.ttft, ex.endpoint, model).observe(ex.ttft)
        if ex.upstream_first is not None and ex.upstream_sent is not None:
            m.child(m.upstream_ttft, ex.endpoint, stream).observe(ex.upstream_first - ex.upstream_sent)
        if ex.upstream_sent is not None and ex.upstream_done is not None:
            upstream = ex.upstream_done - ex.upstream_sent
            m.child(m.overhead, ex.endpoint, stream).observe(max(0.0, duration - upstream - ex.queue_wait))
        team = ex.principal.team
        team_label = "none" if team is None else team if team in self._teams else "other"
        # Counters only go up: a count that is not positive (never from vLLM) is not recorded.
        # A cache hit's tokens were not processed again: gateway_cache_saved_tokens counts them.
        if ex.cache != "hit":
            if ex.prompt_tokens is not None and ex.prompt_tokens > 0:
                m.child(m.prompt_tokens, model, team_label).inc(ex.prompt_tokens)
            if ex.completion_tokens is not None and ex.completion_tokens > 0:
                m.child(m.completion_tokens, model, team_label).inc(ex.completion_tokens)
        if ex.tokens_charged is not None and ex.tokens_charged > 0:
            m.child(m.tokens_charged, team_label).inc(ex.tokens_charged)
        if ex.limited is not None:
            m.child(m.rate_limited, *ex.limited).inc()
        if ex.queue_wait:
            m.child(m.queue_wait, model, str(ex.priority)).observe(ex.queue_wait)
        reason = "client_disconnect" if ex.disconnected else ex.reason
        if reason is not None:
            m.child(m.errors, ex.endpoint, reason).inc()
        if self._access_log:
            content = {}
            if ex.capture is not None:  # the team turned content logging on: redacted text
                content = {
                    "prompt": redact(ex.prompt_text or ""),
                    "completion": redact("".join(ex.capture)),
                }
            fields = dict(
                endpoint=ex.endpoint,
                subject=ex.principal.subject,
                team=ex.principal.team,
                model=ex.model,
                backend=ex.backend,
                route=ex.route,
                fallback=ex.fallback,
                cache=ex.cache,
                queue_priority=ex.priority,
                status=int(status),
                stream=ex.stream,
                prompt_tokens=ex.prompt_tokens,
                completion_tokens=ex.completion_tokens,
                usage_estimated=ex.usage_estimated,
                tokens_charged=ex.tokens_charged,
                ttft_ms=None if ex.ttft is None else round(ex.ttft * 1000, 2),
                duration_ms=round(duration * 1000, 2),
                queue_wait_ms=round(ex.queue_wait * 1000, 2),
                client_disconnected=ex.disconnected,
                error_reason=reason,
                fault=(Fault.CLIENT if ex.disconnected else ex.fault) if reason is not None else None,
                **content,
            )
            if self._write_line is not None:
                fields["event"] = "request"
                fields["request_id"] = ex.request_id
                self._write_line(fields)
            else:
                self._log.info("request", **fields)
