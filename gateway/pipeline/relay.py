"""Stage 7, relay: send vLLM's answer to the client.

Streams are cut into SSE events by ``sse.SseSplitter`` (any WHATWG framing, bounded event
size, linear time) and forwarded as the bytes vLLM sent whenever they are already canonical
``data: ...\n\n`` events (vLLM's always are); the gateway parses just two kinds of event: the
final usage chunk (``"choices":[]`` with ``usage``, read for accounting and dropped when the
client did not ask for it, its ``system_fingerprint`` moved back to where vLLM would have put
it) and an upstream ``{"error": ...}`` event (rewritten in OpenAI's shape). Every stream the
client sees ends in ``data: [DONE]``; a failure after the first byte becomes one final SSE
error event, never a silent truncation. Backend error answers reach the client in OpenAI's
shape (``backend_errors.py``).
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
from gateway.pipeline import backend_errors
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.sse import EventTooLarge, SseSplitter
from gateway.pipeline.upstream import UpstreamResponse
from gateway.redact import MAX_LOGGED_CHARS

DONE = b"data: [DONE]\n\n"
HEARTBEAT = b": keep-alive\n\n"
_USAGE_MARK = b'"choices":[]'
# Other OpenAI-compatible servers (the fallback's) may write JSON with spaces, as Python's json does.
_USAGE_MARK_SPACED = b'"choices": []'
_ERROR_MARK = b'data: {"error"'
_FINISH_MARK = b'"finish_reason":"'  # a choice's terminal chunk (a null finish_reason has no quote)
_FINISH_MARK_SPACED = b'"finish_reason": "'
_FINGERPRINT_KEY = b'"system_fingerprint"'
DEFAULT_MAX_EVENT_BYTES = 8 * 1024 * 1024  # config.StreamingSettings.max_event_bytes


def gateway_headers(ex: Exchange) -> list[tuple[bytes, bytes]]:
    """What the gateway did: which route, which backend, whether it fell back (and why), and
    what the response cache did (``x-gateway-cache``; a miss's ``Age`` is 0, a hit's is set by
    gateway/cache/stage.py)."""
    out = [
        (b"x-gateway-route", ex.route.encode()),
        (b"x-gateway-backend", (ex.backend or "-").encode()),
        (b"x-gateway-fallback", ex.fallback.encode() if ex.fallback else b"false"),
    ]
    if ex.cache is not None:
        out.append((b"x-gateway-cache", ex.cache.encode()))
        if ex.cache == "miss":
            out.append((b"age", b"0"))
    return out


def _headers(content_type: bytes, request_id: bytes, ex: Exchange) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", content_type),
        (b"x-request-id", request_id),
        *gateway_headers(ex),
        *ex.reservation.headers,
    ]


def _read_usage(ex: Exchange, usage: Any) -> None:
    """vLLM's token counts; anything but a non-negative integer (a broken backend's) is ignored.
    Whether they are plausible is the account stage's to judge (``account.plausible_usage``)."""
    if isinstance(usage, dict):
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if type(p) is int and p >= 0:
            ex.prompt_tokens = p
        if type(c) is int and c >= 0:
            ex.completion_tokens = c


async def relay_json(
    resp: UpstreamResponse, send: Send, ex: Exchange, request_id: bytes, max_bytes: int
) -> None:
    """A plain (non-streaming) answer: forwarded byte for byte on success.

    A 200's body is read whole up to ``max_bytes`` (``streaming.max_response_bytes``; past it
    UpstreamResponseTooLarge, raised before anything reached the client); any other status's
    only up to a bounded prefix, enough for the backend's message.
    """
    status = resp.status
    if status == 200:
        body = await resp.read(max_bytes)
        try:
            parsed = orjson.loads(body)
            _read_usage(ex, parsed.get("usage"))
            if ex.capture is not None:
                _capture_choices(parsed.get("choices"), ex.capture, MAX_LOGGED_CHARS)
            if ex.cache_tap is not None and len(body) <= ex.cache_room and _finished(parsed):
                ex.cache_tap.append(body)  # kept for the response cache (gateway/cache)
                ex.cache_complete = True
        except (orjson.JSONDecodeError, AttributeError):
            raise UpstreamError("The backend sent a response that is not JSON.") from None
        content_type = b"application/json"
    else:
        status, body = upstream_failure(ex, status, await resp.read_prefix())
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
    """The backend's error message from an error body of any shape (backend_errors.py), if it has one."""
    return backend_errors.parse(0, body).message


def upstream_failure(ex: Exchange, status: int, body: bytes) -> tuple[int, bytes]:
    """Map a non-200 upstream answer to what the client gets, in OpenAI's shape.

    4xx keep their status, the backend's message and param (vLLM's messages are precise:
    "max_tokens=... cannot be greater than max_model_len=..."), with OpenAI's ``type`` for the
    status and a string or null ``code`` (backend_errors.py). 5xx become 502 ``server_error``
    ``upstream_error`` with the backend's message kept.
    """
    err = backend_errors.parse(status, body)
    client_error = 400 <= status < 500  # the request's fault; anything else (3xx, 5xx) the backend's
    ex.reason = "upstream_client_error" if client_error else "upstream_error"
    ex.fault = Fault.CLIENT if client_error else Fault.BACKEND
    ex.error = f"backend answered {status}: {err.message or body[:200]!r}"
    if client_error:
        return status, error_body(
            err.message or f"The backend answered {status}.", err.type, err.param, err.code
        )
    return 502, error_body(
        f"The backend failed ({status}): {err.message or 'no details'}",
        "server_error",
        None,
        "upstream_error",
    )


async def _first_chunk(
    resp: UpstreamResponse, send: Send, deadline: float, heartbeat: float, request_id: bytes, ex: Exchange
) -> bytes:
    """Wait for vLLM's first bytes; the client's response starts only when they come, or when
    the first heartbeat is due (then SSE comment heartbeats keep the connection alive).

    Until the response has started nothing is committed: a first-byte timeout may still go to
    another replica (vLLM sends a stream's headers at once, so its first token is the real
    first byte). The read is awaited directly under a timer, not in a task of its own:
    cancelling a pending ``read_chunk()`` loses nothing (bytes that arrive stay buffered).
    Raises TimeoutError at ``deadline`` (loop time).
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
        if not ex.response_started:
            await _start_stream(send, request_id, ex)
        await send({"type": "http.response.body", "body": HEARTBEAT, "more_body": True})


async def _start_stream(send: Send, request_id: bytes, ex: Exchange) -> None:
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
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
) -> bool:
    """Relay an SSE stream; True when it ended cleanly (vLLM's [DONE] relayed, nothing failed).

    Deadlines are loop times, ``idle`` and ``write_timeout`` seconds. Backend silence is
    measured only while waiting on vLLM (``idle``); a client that does not take the bytes
    (a write blocked longer than ``write_timeout``, or still blocked at the total deadline)
    is the client's fault: the connection is closed and nothing more is sent (reason
    ``client_slow``). `itl` is the inter-token-latency histogram child to observe (None: not
    measured). `max_event_bytes`: the longest unfinished SSE event held before the stream is
    ended with an ``upstream_event_too_large`` error event (a backend fault).
    """
    loop = asyncio.get_running_loop()
    saw_done = False
    failure: GatewayError | None = None
    dog: _Watchdog | None = None
    last_event = 0.0
    data = b""
    try:
        data = await _first_chunk(resp, send, first_byte_deadline, heartbeat, request_id, ex)
    except TimeoutError:
        if first_byte_deadline >= total_deadline:
            failure = _total_timeout()
        else:
            failure = UpstreamTimeout(
                "The backend sent no token within the first-byte timeout.", code="first_byte_timeout"
            )
            # Nothing reached the client yet: another replica may serve it.
            failure.retryable = not ex.response_started
    except UpstreamError as exc:
        failure = exc
    if not ex.response_started:
        if failure is not None:
            raise failure  # answered as JSON: no stream was promised
        await _start_stream(send, request_id, ex)
    try:
        if failure is not None:
            raise failure
        dog = _Watchdog(loop, resp, ex, idle, write_timeout, total_deadline)
        split = SseSplitter(max_event_bytes)
        # Terminal chunks held back until the next read: the usage chunk the gateway asked for
        # (strip_usage) carries the system_fingerprint vLLM would otherwise have put on them.
        held = b""
        tap, room = ex.cache_tap, ex.cache_room  # the response cache's copy (gateway/cache), bounded
        while True:
            try:
                out = split.feed(data)
            except EventTooLarge:
                raise UpstreamError(
                    f"The backend sent an SSE event longer than {max_event_bytes} bytes.",
                    code="upstream_event_too_large",
                ) from None
            if out and tap is not None:  # vLLM's events as sent (usage chunk included)
                room -= len(out)
                if room < 0:
                    tap = ex.cache_tap = None  # beyond cache_room: the answer is not kept
                else:
                    tap.append(out)
            if out:
                new_from = 0
                if held:
                    new_from, out, held = len(held), held + out, b""
                if _USAGE_MARK in out or _USAGE_MARK_SPACED in out:
                    out = take_usage(out, ex, strip_usage)
                elif strip_usage and _find_finish(out, new_from) >= 0 and not out.endswith(DONE):
                    out, held = _hold_terminal(out, new_from)
                if _ERROR_MARK in out:
                    out = _error_event(out, ex)
                if out.endswith(DONE):
                    saw_done = True
                if out:
                    ex.events += out.count(b"\n") >> 1  # canonical events: a line and a blank one
                    if ex.capture is not None and ex.captured < MAX_LOGGED_CHARS:
                        ex.captured += _capture_events(out, ex.capture, MAX_LOGGED_CHARS - ex.captured)
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
                    resp.body_consumed()  # the connection may be pooled once its last chunk arrives
                    break
            dog.last = loop.time()
            try:
                data = await resp.read_chunk()
            except UpstreamError:
                if held:  # the stream broke right after a terminal chunk: still the client's
                    await _flush(held, send, ex, dog, loop)
                raise
            if not data:
                if held:
                    await _flush(held, send, ex, dog, loop)
                break
    except GatewayError as exc:  # a failure of the first read (re-raised above) or of the relay
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
    ex.cache_complete = failure is None
    return failure is None


# Finish reasons of a complete answer (the response cache keeps only those; gateway/cache/stage.py).
FINISHED = frozenset({"stop", "length", "tool_calls"})


def _finished(answer: Any) -> bool:
    """A plain answer the cache may keep: every choice finished (stop, length or tool calls),
    or an embeddings list."""
    choices = answer.get("choices")
    if choices is None:
        return isinstance(answer.get("data"), list)
    return (
        isinstance(choices, list)
        and bool(choices)
        and all(isinstance(c, dict) and c.get("finish_reason") in FINISHED for c in choices)
    )


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


def _capture_choices(choices: Any, into: list[str], room: int) -> int:
    """Completion text of the first choice (message, delta or text), for content logging: at most
    ``room`` characters are kept (what is logged is cut to MAX_LOGGED_CHARS anyway, and a long
    stream must not grow the gateway's memory). Returns the characters kept."""
    if room <= 0 or not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return 0
    c = choices[0]
    if "text" in c:
        part = c["text"]
    else:
        holder = c.get("message") or c.get("delta")
        part = holder.get("content") if isinstance(holder, dict) else None
    if not isinstance(part, str):
        return 0
    part = part[:room]
    into.append(part)
    return len(part)


def _capture_events(out: bytes, into: list[str], room: int) -> int:
    kept = 0
    for event in out.split(b"\n\n"):
        if kept >= room:
            break
        if event.startswith(b"data: {"):
            try:
                kept += _capture_choices(orjson.loads(event[6:]).get("choices"), into, room - kept)
            except (orjson.JSONDecodeError, AttributeError):
                continue
    return kept


def _event_at(out: bytes, at: int) -> tuple[int, int]:
    """(start, end) of the canonical event around offset ``at``; ``end`` is past its blank line."""
    prev = out.rfind(b"\n\n", 0, at)
    end = out.find(b"\n\n", at)
    return (0 if prev < 0 else prev + 2), (len(out) if end < 0 else end + 2)


def take_usage(out: bytes, ex: Exchange, strip: bool) -> bytes:
    """Read vLLM's usage chunk; when the gateway asked for it (``strip``), drop it.

    Dropping it must leave what vLLM sends without ``include_usage``: there the terminal chunk of
    each choice carries ``system_fingerprint``, which vLLM moves onto the usage chunk when one
    follows (recorded: chat_stream.sse vs chat_stream_continuous_usage.sse). So the fingerprint is
    stamped back onto the terminal chunks before it (``_hold_terminal`` keeps them for this).
    An empty-choices chunk without ``usage`` (Azure's prompt_filter_results) is not ours to drop.
    """
    start, end = _event_at(out, max(out.rfind(_USAGE_MARK), out.rfind(_USAGE_MARK_SPACED)))
    try:
        chunk = orjson.loads(out[start + 6 : end - 2])
        usage = chunk.get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return out
    if not isinstance(usage, dict):
        return out
    _read_usage(ex, usage)
    if not strip:
        return out
    head = out[:start]
    fingerprint = chunk.get("system_fingerprint")
    if head and isinstance(fingerprint, str):
        head = _stamp(head, fingerprint)
    return head + out[end:]


def _stamp(events: bytes, fingerprint: str) -> bytes:
    """Add ``system_fingerprint`` to the terminal chunks among ``events`` that lack it.

    Appended as the last key before the closing brace, where vLLM serialises it: the chunk is
    not re-serialised.
    """
    tail = b',"system_fingerprint":' + orjson.dumps(fingerprint) + b"}"
    parts = events.split(b"\n\n")
    for i, event in enumerate(parts):
        if _find_finish(event, 0) >= 0 and _FINGERPRINT_KEY not in event and event.endswith(b"}"):
            parts[i] = event[:-1] + tail
    return b"\n\n".join(parts)


def _hold_terminal(out: bytes, new_from: int) -> tuple[bytes, bytes]:
    """Split ``out`` before its first new terminal chunk: (send now, hold until the next read).

    Held for one read only (vLLM sends the usage chunk right after the last terminal chunk), so
    with ``n > 1`` a choice that finishes steps before the last one goes out without the
    fingerprint rather than delaying the other choices' tokens.
    """
    start, _ = _event_at(out, _find_finish(out, new_from))
    return out[:start], out[start:]


def _find_finish(out: bytes, start: int) -> int:
    """Offset of the first terminal-chunk mark at or after ``start``, or -1."""
    at = out.find(_FINISH_MARK, start)
    spaced = out.find(_FINISH_MARK_SPACED, start)
    return spaced if at < 0 or 0 <= spaced < at else at


async def _flush(
    held: bytes, send: Send, ex: Exchange, dog: _Watchdog, loop: asyncio.AbstractEventLoop
) -> None:
    if _ERROR_MARK in held:
        held = _error_event(held, ex)
    ex.events += held.count(b"\n") >> 1
    await _bounded_send(send, dog, loop, held, True)


def _error_event(out: bytes, ex: Exchange) -> bytes:
    """Rewrite the backend's mid-stream ``{"error": ...}`` event in OpenAI's shape and note it.

    vLLM's (a GenerationError) is ``{"error": {"message", "type": "InternalServerError", "param",
    "code": 500}}``: the type becomes OpenAI's for the status its integer code names, and a
    server-side failure gets the gateway's ``upstream_error`` code, as a 5xx answer does.
    """
    start, end = _event_at(out, out.find(_ERROR_MARK))
    try:
        parsed: Any = orjson.loads(out[start + 6 : end - 2])
    except orjson.JSONDecodeError:
        parsed = None
    err = backend_errors.from_object(0, parsed)
    ex.reason = "upstream_error"
    ex.fault = Fault.BACKEND  # vLLM reports an engine failure in-band
    ex.error = f"backend error event: {err.message}"
    code = err.code if err.code is not None or err.type != "server_error" else "upstream_error"
    message = err.message or "The backend failed in the middle of the stream."
    event = b"data: " + error_body(message, err.type, err.param, code) + b"\n\n"
    return out[:start] + event + out[end:]
