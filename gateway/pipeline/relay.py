"""Stage 7, relay: send vLLM's answer to the client.

Streams are forwarded as the bytes vLLM sent, cut only at SSE event
boundaries (``\\n\\n``); the gateway parses just two kinds of event: the
final usage chunk (``"choices":[]``, read for accounting and dropped when the
client did not ask for it) and an upstream ``{"error": ...}`` event. Every
stream the client sees ends in ``data: [DONE]``; a failure after the first
byte becomes one final SSE error event, never a silent truncation.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from gateway.asgi import Send
from gateway.errors import (
    ClientTooSlow,
    Fault,
    GatewayError,
    TotalTimeout,
    UpstreamError,
    UpstreamTimeout,
    error_body,
    sse_error_event,
)
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.upstream import UpstreamResponse

DONE = b"data: [DONE]\n\n"
HEARTBEAT = b": keep-alive\n\n"
_USAGE_MARK = b'"choices":[]'
_ERROR_MARK = b'data: {"error"'


def gateway_headers(ex: Exchange) -> list[tuple[bytes, bytes]]:
    """What the gateway did: which route, which backend, whether it fell back (and why)."""
    return [
        (b"x-gateway-route", ex.route.encode()),
        (b"x-gateway-backend", (ex.backend or "-").encode()),
        (b"x-gateway-fallback", ex.fallback.encode() if ex.fallback else b"false"),
    ]


def _headers(content_type: bytes, request_id: bytes, ex: Exchange) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", content_type),
        (b"x-request-id", request_id),
        *gateway_headers(ex),
        *ex.reservation.headers,
    ]


def _read_usage(ex: Exchange, usage: Any) -> None:
    if isinstance(usage, dict):
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        ex.prompt_tokens = p if isinstance(p, int) else ex.prompt_tokens
        ex.completion_tokens = c if isinstance(c, int) else ex.completion_tokens


async def relay_json(resp: UpstreamResponse, send: Send, ex: Exchange, request_id: bytes) -> None:
    """A plain (non-streaming) answer: forwarded byte for byte on success."""
    body = await resp.read()
    status = resp.status
    if status == 200:
        try:
            parsed = orjson.loads(body)
            _read_usage(ex, parsed.get("usage"))
            if ex.capture is not None:
                _capture_choices(parsed.get("choices"), ex.capture)
        except (orjson.JSONDecodeError, AttributeError):
            raise UpstreamError("The backend sent a response that is not JSON.") from None
        content_type = b"application/json"
    else:
        status, body = upstream_failure(ex, status, body)
        content_type = b"application/json"
    ex.status = status
    ex.response_started = ex.completing = True
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                *_headers(content_type, request_id, ex),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def upstream_message(body: bytes) -> str | None:
    """vLLM's error message from an error body, if it has one."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    err = parsed.get("error")
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return err["message"]  # type: ignore[no-any-return]
    detail = parsed.get("detail")
    return detail if isinstance(detail, str) else None


def upstream_failure(ex: Exchange, status: int, body: bytes) -> tuple[int, bytes]:
    """Map a non-200 upstream answer to what the client gets.

    4xx with an OpenAI-shaped body pass through untouched (vLLM's messages are
    precise: "max_tokens=... cannot be greater than max_model_len=..."). Other
    4xx are wrapped; 5xx become 502 with vLLM's message kept.
    """
    message = upstream_message(body)
    ex.reason = "upstream_client_error" if status < 500 else "upstream_error"
    ex.error = f"backend answered {status}: {message or body[:200]!r}"
    if 400 <= status < 500:
        if message is not None and b'"error"' in body:
            return status, body
        type_ = "not_found_error" if status == 404 else "invalid_request_error"
        return status, error_body(message or f"The backend answered {status}.", type_, None, status)
    return 502, error_body(
        f"The backend failed ({status}): {message or 'no details'}", "upstream_error", None, "upstream_error"
    )


async def _first_chunk(resp: UpstreamResponse, send: Send, deadline: float, heartbeat: float) -> bytes:
    """Wait for vLLM's first bytes, sending SSE comment heartbeats meanwhile.

    The read is awaited directly under a timer, not in a task of its own: cancelling a
    pending ``read_chunk()`` loses nothing (bytes that arrive stay buffered for the next one).
    """
    loop = asyncio.get_running_loop()
    if heartbeat <= 0:
        async with asyncio.timeout_at(deadline):
            return await resp.read_chunk()
    while True:
        now = loop.time()
        if now >= deadline:
            raise TimeoutError
        try:
            async with asyncio.timeout_at(min(now + heartbeat, deadline)):
                return await resp.read_chunk()
        except TimeoutError:
            if loop.time() >= deadline:
                raise
        await send({"type": "http.response.body", "body": HEARTBEAT, "more_body": True})


async def relay_sse(
    resp: UpstreamResponse,
    send: Send,
    ex: Exchange,
    request_id: bytes,
    *,
    strip_usage: bool,
    first_byte_deadline: float,
    idle: float,
    total_deadline: float,
    heartbeat: float,
    write_timeout: float,
    itl: Any = None,
) -> bool:
    """Relay an SSE stream; True when it ended cleanly (vLLM's [DONE] relayed, nothing failed).

    Deadlines are loop times, ``idle`` and ``write_timeout`` seconds. Backend silence is
    measured only while waiting on vLLM (``idle``); a client that does not take the bytes
    (a write blocked longer than ``write_timeout``, or still blocked at the total deadline)
    is the client's fault: the connection is closed and nothing more is sent (reason
    ``client_slow``). `itl` is the inter-token-latency histogram child to observe (None: not
    measured).
    """
    loop = asyncio.get_running_loop()
    ex.status = 200
    ex.response_started = True
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                *_headers(b"text/event-stream; charset=utf-8", request_id, ex),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),  # nginx: do not buffer this response
            ],
        }
    )
    saw_done = False
    failure: GatewayError | None = None
    dog: _Watchdog | None = None
    last_event = 0.0
    try:
        data = await _first_chunk(resp, send, first_byte_deadline, heartbeat)
        dog = _Watchdog(loop, resp, ex, idle, write_timeout, total_deadline)
        buf = b""
        while data:
            buf = buf + data if buf else data
            end = buf.rfind(b"\n\n")
            if end >= 0:
                end += 2
                if end == len(buf):
                    out, buf = buf, b""
                else:
                    out, buf = buf[:end], buf[end:]
                if _USAGE_MARK in out:
                    out = _take_usage(out, ex, strip_usage)
                if _ERROR_MARK in out:
                    _note_error_event(out, ex)
                if out.endswith(DONE):
                    saw_done = True
                if out:
                    ex.events += out.count(b"data: ")
                    if ex.capture is not None:
                        _capture_events(out, ex.capture)
                    now = time.perf_counter()
                    if ex.ttft is None:
                        ex.ttft = now - ex.started
                        if ex.upstream_sent is not None:
                            ex.upstream_first = now  # vLLM's first event, not its headers
                    elif itl is not None:
                        itl.observe(now - last_event)
                    last_event = now
                    dog.writing = loop.time()  # from here the client, not vLLM, is awaited
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                    dog.writing = 0.0
                if saw_done:
                    break
            dog.last = loop.time()
            data = await resp.read_chunk()
    except TimeoutError:  # only _first_chunk raises it
        failure = (
            _total_timeout()
            if first_byte_deadline >= total_deadline
            else UpstreamTimeout(
                "The backend sent no token within the first-byte timeout.", code="first_byte_timeout"
            )
        )
    except UpstreamError as exc:
        failure = exc
    except asyncio.CancelledError:
        if dog is not None:
            dog.handle.cancel()
        if _cancelled_by_watchdog(ex, dog):
            return False
        raise
    if dog is not None and dog.fired is not None:
        # The watchdog closed the upstream response: say why, not "the backend broke off".
        failure = (
            _total_timeout()
            if dog.fired == "total"
            else UpstreamTimeout(
                f"The backend sent nothing for {idle:g}s in the middle of the stream.",
                code="idle_timeout",
            )
        )
    if failure is None and not saw_done:
        failure = UpstreamError(
            "The backend ended the stream without finishing it (no [DONE]).", code="stream_truncated"
        )
        # A body that ended cleanly but without [DONE] is a protocol quirk, not a broken replica.
        failure.fault = Fault.GATEWAY
    try:
        if failure is not None:
            ex.reason, ex.error, ex.fault = failure.reason, failure.message, failure.fault
            await _bounded_send(send, dog, loop, sse_error_event(failure), True)
        ex.completing = True
        await _bounded_send(send, dog, loop, b"", False)
    except asyncio.CancelledError:
        if _cancelled_by_watchdog(ex, dog):
            return False
        raise
    finally:
        if dog is not None:
            dog.handle.cancel()
    return failure is None


def _cancelled_by_watchdog(ex: Exchange, dog: _Watchdog | None) -> bool:
    """The watchdog cancelled a write the client did not take: end quietly, nothing more is sent."""
    task = asyncio.current_task()
    if ex.disconnected or dog is None or not dog.cancelled or task is None:
        return False  # the client went away (proxy.py handles it), or a real cancellation
    task.uncancel()
    return True


async def _bounded_send(
    send: Send, dog: _Watchdog | None, loop: asyncio.AbstractEventLoop, body: bytes, more: bool
) -> None:
    """A write to the client under the watchdog's write timeout (when the stream got that far)."""
    if dog is not None:
        dog.writing = loop.time()
    await send({"type": "http.response.body", "body": body, "more_body": more})
    if dog is not None:
        dog.writing = 0.0


def _total_timeout() -> UpstreamTimeout:
    return TotalTimeout("The request took longer than the gateway's total timeout.")


class _Watchdog:
    """Idle, write and total timeouts of a stream for the price of a few float stores per chunk.

    asyncio.Timeout.reschedule() on every chunk re-creates a timer handle (3.6 µs under uvloop,
    ~5 % of a chunk's CPU); here one timer re-arms itself from the times the relay stores:
    ``last``, when it began waiting on vLLM, and ``writing``, when it began a write to the
    client (0.0 when not writing). Backend idleness counts only the first kind of wait. On
    vLLM's silence (idle) or the total deadline it closes the upstream response, which ends
    the relay loop's read; on a write the client does not take within ``write`` seconds (or
    still blocked at the total deadline) it also cancels the relay's task, the only way to
    abandon a blocked ASGI send, and blames the client (ex.fault = Fault.CLIENT).
    """

    __slots__ = (
        "cancelled",
        "ex",
        "fired",
        "handle",
        "idle",
        "last",
        "loop",
        "resp",
        "step",
        "task",
        "total",
        "write",
        "writing",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        resp: UpstreamResponse,
        ex: Exchange,
        idle: float,
        write: float,
        total: float,
    ) -> None:
        self.loop, self.resp, self.ex, self.idle, self.write, self.total = loop, resp, ex, idle, write, total
        self.task = asyncio.current_task()
        self.step = min(idle, write)  # a change of wait is noticed within this
        self.last = loop.time()
        self.writing = 0.0
        self.fired: str | None = None
        self.cancelled = False
        self.handle = loop.call_at(min(self.last + self.step, total), self._check)

    def _check(self) -> None:
        now = self.loop.time()
        w = self.writing
        if w:
            due = w + self.write if self.fired is not None else min(w + self.write, self.total)
            if now >= due:
                if self.fired is None:  # else the failure that came first stays the recorded one
                    self.fired = "client_slow"
                    failure = ClientTooSlow(
                        f"The client did not accept the stream's data for {now - w:.3g}s; connection closed."
                    )
                    ex = self.ex
                    ex.reason, ex.error, ex.fault = failure.reason, failure.message, failure.fault
                self.cancelled = True
                self.resp.close()
                if self.task is not None:
                    self.task.cancel()
                return
        elif self.fired is None:
            due = min(self.last + self.idle, self.total)
            if now >= due:
                self.fired = "total" if now >= self.total else "idle"
                self.resp.close()
                due = now + self.write  # the relay writes the error event next: keep bounding it
        else:
            due = now + self.write
        self.handle = self.loop.call_at(min(due, now + self.step), self._check)


def _capture_choices(choices: Any, into: list[str]) -> None:
    """Completion text of the first choice (message, delta or text), for content logging."""
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return
    c = choices[0]
    part = (c.get("message") or c.get("delta") or {}).get("content") if "text" not in c else c["text"]
    if isinstance(part, str):
        into.append(part)


def _capture_events(out: bytes, into: list[str]) -> None:
    for event in out.split(b"\n\n"):
        if event.startswith(b"data: {"):
            try:
                _capture_choices(orjson.loads(event[6:]).get("choices"), into)
            except (orjson.JSONDecodeError, AttributeError):
                continue


def _take_usage(out: bytes, ex: Exchange, strip: bool) -> bytes:
    at = out.rfind(_USAGE_MARK)
    start = out.rfind(b"data: ", 0, at)
    end = out.find(b"\n\n", at)
    if start < 0 or end < 0:
        return out
    try:
        _read_usage(ex, orjson.loads(out[start + 6 : end]).get("usage"))
    except (orjson.JSONDecodeError, AttributeError):
        return out
    return out[:start] + out[end + 2 :] if strip else out


def _note_error_event(out: bytes, ex: Exchange) -> None:
    at = out.find(_ERROR_MARK)
    end = out.find(b"\n\n", at)
    ex.reason = "upstream_error"
    ex.fault = Fault.BACKEND  # vLLM reports an engine failure in-band
    try:
        err = orjson.loads(out[at + 6 : end])["error"]
        ex.error = f"backend error event: {err.get('message')}"
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        ex.error = "backend error event"
