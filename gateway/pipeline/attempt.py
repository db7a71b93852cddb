"""Stages 6 and 7 for one replica: call upstream and relay, under the replica's circuit breaker.

Raises a *retryable* error only while nothing has reached the client:
connection failures, vLLM 503s and first-byte timeouts. Failures after the
first byte end the stream with an SSE error event (relay.py) and still count
against the breaker.
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
from gateway.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.receive import ParsedRequest
from gateway.pipeline.relay import relay_json, relay_sse, upstream_message
from gateway.pipeline.upstream import UpstreamClient, UpstreamResponse


class _CountedFailure(Exception):
    """Tells the breaker that a relayed exchange failed after its first byte."""


@dataclass(slots=True)
class Deadlines:
    first_byte: float  # loop time
    total: float


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
    t = settings.timeouts
    with on_backend(backend, ex):
        resp: UpstreamResponse | None = None
        finished = False  # the exchange ran to its end: only then may the connection be pooled
        try:
            # One timer for the exchange: the first-byte deadline until vLLM's headers arrive, then
            # the total one (streams keep their own idle/total watchdog in relay_sse).
            async with asyncio.timeout_at(deadlines.first_byte) as timer:
                resp = await upstream.post(backend, req.endpoint.path, raw, upstream_id)
                ex.upstream_first = now = time.perf_counter()
                ex.upstream_ttfb = now - ex.started
                stream = req.stream and resp.status == 200
                timer.reschedule(None if stream else deadlines.total)
                if resp.status >= 500:
                    await _server_error(resp.status, await resp.read(), backend)
                rid = ex.request_id.encode()
                if stream:
                    await relay_sse(
                        resp,
                        send,
                        ex,
                        rid,
                        strip_usage=not req.client_wants_usage,
                        first_byte_deadline=deadlines.first_byte,
                        idle=t.idle,
                        total_deadline=deadlines.total,
                        heartbeat=settings.streaming.heartbeat_interval,
                        itl=itl,
                        max_event_bytes=settings.streaming.max_event_bytes,
                    )
                else:
                    await relay_json(resp, send, ex, rid)
                finished = True
        except TimeoutError:
            if resp is None:
                err = UpstreamTimeout(
                    f"Backend {backend.label} did not answer within {t.first_byte:g}s.",
                    code="first_byte_timeout",
                )
                err.retryable = True
                raise err from None
            raise UpstreamTimeout(
                f"The request took longer than {t.total:g}s.", code="total_timeout"
            ) from None
        finally:
            if resp is not None:
                ex.upstream_done = time.perf_counter()
                if not finished or ex.disconnected or ex.reason or resp.status >= 500:
                    resp.close()
                else:
                    resp.release()


@contextmanager
def on_backend(backend: Backend, ex: Exchange) -> Iterator[None]:
    """One exchange with one backend: its in-flight count and its circuit breaker.

    Failures raised inside count against the breaker (unless excluded, see breaker.py); so do
    failures the relay turned into an SSE error event after the first byte (ex.reason), which
    raise nothing.
    """
    assert backend.breaker is not None
    backend.outstanding += 1
    try:
        with backend.breaker.guard():
            ex.upstream_sent = time.perf_counter()
            yield
            if ex.reason in ("upstream_error", "timeout"):
                raise _CountedFailure
    except _CountedFailure:
        pass
    finally:
        backend.outstanding -= 1


async def _server_error(status: int, body: bytes, backend: Backend) -> None:
    message = upstream_message(body) or "no details"
    if status == 503:
        # vLLM overloaded or still starting: another replica may serve it.
        raise UpstreamUnavailable(f"Backend {backend.label} is unavailable (503): {message}", retry_after=1)
    raise UpstreamError(f"The backend failed ({status}): {message}")
