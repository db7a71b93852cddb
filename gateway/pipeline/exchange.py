"""One request's record as it moves through the pipeline; the account stage reads it."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.auth.principal import ANONYMOUS, Principal
from gateway.errors import Fault
from gateway.pipeline.limit import NO_LIMITS, Reservation


@dataclass(slots=True)
class Exchange:
    request_id: str
    endpoint: str
    started: float  # time.perf_counter() at arrival (uvloop's loop.time() has 1 ms resolution)
    principal: Principal = ANONYMOUS
    model: str = "-"
    requested_model: str | None = None  # the model the client named, before task routes and aliases
    stream: bool = False
    backend: str | None = None
    route: str = "-"
    fallback: str | None = None  # why the external provider served it (None: it did not)
    status: int = 0
    reason: str | None = None  # low-cardinality failure reason; None on success
    fault: Fault | None = None  # who caused the failure; only Fault.BACKEND counts against a breaker
    error: str | None = None  # failure message for the log (never request content)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft: float | None = None  # seconds from arrival to the first event sent (streams)
    upstream_ttfb: float | None = None
    queue_wait: float = 0.0  # seconds waited for pool capacity
    upstream_sent: float | None = None  # perf_counter when the last attempt was sent upstream
    upstream_first: float | None = None  # ... when its first event (plain: its headers) arrived
    upstream_done: float | None = None  # ... when relaying it ended
    capture: list[str] | None = None  # completion text, only for teams with log_content
    captured: int = 0  # characters in capture (kept up to MAX_LOGGED_CHARS)
    prompt_text: str | None = None
    messages: list[object] | None = None  # the request's messages, only for teams with capture
    limited: tuple[str, str] | None = None  # (kind, scope) of the limit that refused it
    priority: int = 0  # seconds from arrival to upstream response headers
    finished: float = 0.0
    response_started: bool = False
    completing: bool = False  # the last body message is being sent
    reservation: Reservation = field(default_factory=lambda: NO_LIMITS)
    body_bytes: int = 0
    completion_budget: int = 0  # max_tokens x n as validated (the limiter's completion estimate)
    # Most tokens the backend's usage may report for this request (0: no bound known): the
    # model's context per sequence, the completion cap times sequences. Past them the figures
    # are a broken backend's, not charged (relay._read_usage).
    prompt_cap: int = 0
    completion_cap: int = 0
    usage_implausible: bool = False  # the backend reported more than the caps: estimated instead
    usage_estimated: bool = False  # vLLM's usage never arrived: tokens are proxy._estimate_usage's
    tokens_charged: int | None = None  # charged against token budgets (None: no token limit)
    events: int = 0  # SSE data events relayed: the token count if usage never arrives
    disconnected: bool = False
    job: bool = False  # a job line run by a worker (gateway/jobs), not a client's request
    cache: str | None = None  # hit, miss or bypass (gateway/cache); None: not cacheable / cache off
    cache_look: object = None  # the cache stage's decision (gateway/cache/stage.Lookup)
    cache_tap: list[bytes] | None = None  # the answer as vLLM sent it, kept for a cache fill
    cache_room: int = 0  # bytes the tap may still take (over it: the tap is dropped)
    cache_complete: bool = False  # the relay saw a complete answer (stream: [DONE], no failure)
