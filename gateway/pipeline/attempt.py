"""Stages 6 and 7 for one replica: call upstream and relay, under the replica's circuit breaker.

Raises a *retryable* error only while nothing has reached the client:
connection failures, vLLM 503s and first-byte timeouts. Failures after the
first byte end the stream with an SSE error event (relay.py); those the backend
caused still count against its breaker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from gateway.asgi import Send
from gateway.backends import Backend
from gateway.config import Settings
from gateway.errors import GatewayError, TotalTimeout, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.receive import ParsedRequest
from gateway.pipeline.relay import relay_json, relay_sse, upstream_message
from gateway.pipeline.upstream import UpstreamClient, UpstreamResponse


@dataclass(slots=True)
class Deadlines:
    """One attempt's deadlines, in loop time (``loop.time()`` seconds).

    ``first_byte``: this attempt's first byte must have come (Envoy's per-try timeout): its
    own, never what an earlier attempt left over, and never later than ``total``, when the
    whole request must be done.
    """

    first_byte: float
    total: float

    @classmethod
    def for_attempt(cls, now: float, first_byte_seconds: float, total: float) -> Deadlines:
        """Deadlines of an attempt starting at ``now`` (after admission: queueing does not eat them)."""
        return cls(min(now + first_byte_seconds, total), total)

    def headers(self, stream: bool) -> float:
        """When the response headers must have come.

        vLLM sends a stream's headers at once, but a plain response's only when generation has
        ended: that wait is the generation itself, bounded by the total deadline alone.
        """
        return self.first_byte if stream else self.total

    def is_total(self, deadline: float) -> bool:
        """Whether ``deadline`` (one of ours) is the total one: the request's budget is spent."""
        return deadline >= self.total


async def attempt(
    upstream: UpstreamClient,
    backend: Backend,
    req: ParsedRequest,
    raw: bytes,
    upstream_id: str,
    send: Send,
    ex: Exchange,
    deadlines: Deadlines,
    settings: Settings,
    itl: Any = None,
) -> None:
    """One exchange with ``backend``. Raises GatewayError; retryable only before the first byte.

    The upstream connection goes back to the pool only after a clean, complete response;
    every failure, timeout or cancellation closes it (vLLM aborts the generation).
    """
    t = settings.timeouts
    with on_backend(backend, ex):
        resp: UpstreamResponse | None = None
        clean = False
        wait = deadlines.headers(req.stream)
        try:
            # One timer for the exchange: the headers' deadline until vLLM's headers arrive, then
            # the total one (streams keep their own idle/write/total watchdog in relay_sse).
            async with asyncio.timeout_at(wait) as timer:
                resp = await upstream.post(backend, req.endpoint.path, raw, upstream_id)
                ex.upstream_first = now = time.perf_counter()
                ex.upstream_ttfb = now - ex.started
                stream = req.stream and resp.status == 200
                if stream:
                    timer.reschedule(None)
                elif wait != deadlines.total:
                    timer.reschedule(deadlines.total)
                if resp.status >= 500:
                    # Only a bounded prefix: the message is at its start, and an endless error
                    # page must not be read (the connection is closed, not pooled, after it).
                    await _server_error(resp.status, await resp.read_prefix(), backend)
                if resp.status in _REFUSALS:
                    await _refused(resp.status, await resp.read_prefix(), backend)
                rid = ex.request_id.encode()
                if stream:
                    clean = await relay_sse(
                        resp,
                        send,
                        ex,
                        rid,
                        strip_usage=not req.client_wants_usage,
                        first_byte_deadline=deadlines.first_byte,
                        idle=t.idle,
                        total_deadline=deadlines.total,
                        heartbeat=settings.streaming.heartbeat_interval,
                        write_timeout=t.client_write,
                        itl=itl,
                        max_event_bytes=settings.streaming.max_event_bytes,
                    )
                else:
                    await relay_json(resp, send, ex, rid, settings.streaming.max_response_bytes)
                    clean = True
        except TimeoutError:
            if resp is None and not deadlines.is_total(wait):
                err = UpstreamTimeout(
                    f"Backend {backend.label} sent nothing within the first-byte timeout "
                    f"({t.first_byte:g}s).",
                    code="first_byte_timeout",
                )
                err.retryable = True
                raise err from None
            raise TotalTimeout(
                f"The request took longer than the gateway's total timeout ({t.total:g}s)."
            ) from None
        finally:
            if resp is not None:
                ex.upstream_done = time.perf_counter()
                if clean and not ex.disconnected:
                    resp.release()
                else:
                    resp.close()


@contextmanager
def on_backend(backend: Backend, ex: Exchange) -> Iterator[None]:
    """One exchange with one backend: its in-flight count and its circuit breaker.

    The breaker is told the outcome from its typed blame: a raised GatewayError's ``fault``,
    or the one the relay recorded (``ex.fault``) for a failure after the first byte, which
    raises nothing. A cancellation (the client went away) or a bug tells it nothing.
    Raises BreakerOpen when the breaker refuses the exchange.
    """
    breaker = backend.breaker
    assert breaker is not None
    trial = breaker.enter()
    backend.outstanding += 1
    failure: BaseException | None = None
    try:
        ex.upstream_sent = time.perf_counter()
        yield
    except BaseException as exc:
        failure = exc
        raise
    finally:
        backend.outstanding -= 1
        if failure is None:
            breaker.leave(trial, ex.fault, ex.fault is not None, ex.reason or "")
        elif isinstance(failure, GatewayError):
            breaker.leave(trial, failure.fault, True, failure.code)
        else:
            breaker.leave(trial, None, True)


# A backend's 401, 403 and 407 refuse the gateway's own credentials (its `api_key` for that
# backend, or a proxy's), and 429 its capacity: never the client's fault, never relayed as if
# the client's key were wrong.
_REFUSALS = frozenset({401, 403, 407, 429})


async def _refused(status: int, body: bytes, backend: Backend) -> None:
    message = upstream_message(body) or "no details"
    if status == 429:
        # Overloaded: like vLLM's 503, another replica may serve it.
        raise UpstreamUnavailable(f"Backend {backend.label} is overloaded (429): {message}", retry_after=1)
    raise UpstreamError(
        f"Backend {backend.label} refused the gateway's credentials ({status}): {message}. "
        "The operator should check that backend's `api_key`.",
        code="upstream_auth_error",
    )


async def _server_error(status: int, body: bytes, backend: Backend) -> None:
    message = upstream_message(body) or "no details"
    if status == 503:
        # vLLM overloaded or still starting: another replica may serve it.
        raise UpstreamUnavailable(f"Backend {backend.label} is unavailable (503): {message}", retry_after=1)
    raise UpstreamError(f"The backend failed ({status}): {message}")
