"""Anthropic Messages adapter for the external fallback: chat completions ↔ messages.

Request: system/developer messages become ``system``; user/assistant text
becomes ``messages``; ``max_tokens`` is required by Anthropic (the route's
default when the client set none); ``stop`` becomes ``stop_sequences``.
Requests the adapter cannot express faithfully (tools, images, n > 1) are
not sent: ``supports()`` says no and the client gets the local error.

Response: a message becomes a ``chat.completion``; a stream of Anthropic
events (message_start, content_block_delta, message_delta, message_stop,
error) becomes OpenAI chunks ending in ``data: [DONE]``, with the usage
chunk only when the client asked for it (the gateway reads usage either way).
An answer the adapter cannot read (not JSON, the wrong shape, an event that
is not JSON, an ``error`` event, a stream cut short) is the provider's
fault: a 502 before the first byte, the final SSE error event after it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from gateway.asgi import Send
from gateway.config import DEFAULT_MAX_RESPONSE_BYTES
from gateway.errors import (
    Fault,
    GatewayError,
    TotalTimeout,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_body,
    sse_error_event,
)
from gateway.pipeline import backend_errors
from gateway.pipeline.egress import ResponseStream
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.sse import EventTooLarge, SseSplitter

INVALID = "upstream_invalid_response"  # error code: a provider's answer the gateway cannot read
INVALID_EVENT = "upstream_invalid_event"
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}


def _text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                return None  # images, audio, ...: not translated
            parts.append(p["text"])
        return "".join(parts)
    return None


def supports(body: dict[str, Any]) -> bool:
    if body.get("tools") or body.get("functions") or (body.get("n") or 1) > 1:
        return False
    for m in body.get("messages", []):
        if (
            m.get("role") not in ("system", "developer", "user", "assistant")
            or _text(m.get("content")) is None
        ):
            return False
    return True


def to_messages(body: dict[str, Any], model: str, default_max_tokens: int) -> bytes:
    system = [_text(m.get("content")) or "" for m in body["messages"] if m["role"] in ("system", "developer")]
    messages = [
        {"role": m["role"], "content": _text(m.get("content")) or ""}
        for m in body["messages"]
        if m["role"] in ("user", "assistant")
    ]
    out: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens,
        "stream": bool(body.get("stream")),
    }
    if system:
        out["system"] = "\n\n".join(system)
    if body.get("temperature") is not None:
        out["temperature"] = min(1.0, float(body["temperature"]))  # Anthropic's range is 0..1
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    return orjson.dumps(out)


def _chunk(rid: str, model: str, created: int, choices: list[Any], **extra: Any) -> bytes:
    event = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    event.update(extra)
    return b"data: " + orjson.dumps(event) + b"\n\n"


def _invalid(what: str, code: str = INVALID) -> UpstreamError:
    return UpstreamError(f"The external provider sent a malformed answer: {what}.", code=code)


_MAX_TOKENS = 2**40  # a count beyond this is not a real one (and would overflow JSON encoders)


def _id(value: Any, fallback: str) -> str:
    """The provider's message id when it is a plain string, else the gateway's request id."""
    return value if isinstance(value, str) and len(value) <= 256 else fallback


def _tokens(usage: Any, key: str, code: str = INVALID) -> int | None:
    """A token count from Anthropic's ``usage`` (absent: None); wrong types are the provider's fault."""
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise _invalid("`usage` is not an object", code)
    n = usage.get(key)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= _MAX_TOKENS):
        raise _invalid(f"`usage.{key}` is not a token count", code)
    return n


def from_message(raw: bytes, ex: Exchange) -> bytes:
    """A Messages API answer (JSON bytes) → a ``chat.completion``. Raises UpstreamError if malformed."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _invalid("not JSON") from None
    if not isinstance(data, dict):
        raise _invalid("not a JSON object")
    content = data.get("content")
    if not isinstance(content, list):
        raise _invalid("`content` is not a list")
    parts: list[str] = []
    for block in content:
        if not isinstance(block, dict):
            raise _invalid("a content block is not an object")
        if block.get("type") == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise _invalid("a text block has no text")
            parts.append(text)
    usage = data.get("usage")
    ex.prompt_tokens, ex.completion_tokens = _tokens(usage, "input_tokens"), _tokens(usage, "output_tokens")
    p, c = ex.prompt_tokens or 0, ex.completion_tokens or 0
    model = data.get("model")
    return orjson.dumps(
        {
            "id": "chatcmpl-" + _id(data.get("id"), ex.request_id),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model if isinstance(model, str) else None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(parts)},
                    "finish_reason": FINISH.get(str(data.get("stop_reason")), "stop"),
                    "logprobs": None,
                }
            ],
            "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
        }
    )


def anthropic_error(status: int, body: bytes, ex: Exchange) -> tuple[int, bytes]:
    """A provider's 4xx → (status, OpenAI-shaped body); 5xx raise (UpstreamUnavailable for 503/529,
    Anthropic's "overloaded", else UpstreamError: 502), which counts against the provider's breaker.
    """
    err = backend_errors.parse(status, body)  # Anthropic's {"type": "error", "error": {...}}
    said = err.message or f"The external provider answered {status}."
    if status >= 500:
        if status in (503, 529):
            raise UpstreamUnavailable(
                f"The external provider is unavailable ({status}): {said}", retry_after=1
            )
        raise UpstreamError(f"The external provider failed ({status}): {said}")
    ex.reason = "upstream_client_error"  # the request's fault, not the provider's: no breaker count
    ex.fault = Fault.CLIENT
    ex.error = f"external provider answered {status}: {said}"
    return status, error_body(said, err.type, err.param, err.code)


async def relay_anthropic(
    resp: ResponseStream,
    send: Send,
    ex: Exchange,
    request_id: bytes,
    headers: list[tuple[bytes, bytes]],
    *,
    stream: bool,
    include_usage: bool,
    idle: float,
    total_deadline: float,
    max_event_bytes: int = 8 * 1024 * 1024,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
) -> None:
    """Relay an Anthropic answer as OpenAI's. Raises (before anything was sent) UpstreamError for a
    malformed or 5xx answer, UpstreamResponseTooLarge for a message longer than
    ``max_response_bytes``; after a stream started, failures end it with one SSE error event.
    An error answer is read only up to a bounded prefix (its message is at the start).
    """
    async with asyncio.timeout_at(total_deadline):
        if not stream or resp.status != 200:
            if resp.status == 200:
                status, body = 200, from_message(await resp.read(max_response_bytes), ex)
            else:
                status, body = anthropic_error(resp.status, await resp.read_prefix(), ex)
            ex.status, ex.response_started, ex.completing = status, True, True
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"x-request-id", request_id),
                        *headers,
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
    ex.status, ex.response_started = 200, True
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"x-request-id", request_id),
                (b"cache-control", b"no-cache"),
                *headers,
            ],
        }
    )
    failure: GatewayError | None = None
    done = False
    try:
        done = await _translate(resp, send, ex, include_usage, idle, total_deadline, max_event_bytes)
    except UpstreamError as exc:
        failure = exc
    except TimeoutError:
        if asyncio.get_running_loop().time() >= total_deadline:
            failure = TotalTimeout("The external provider took too long.")
        else:
            failure = UpstreamTimeout(
                f"The external provider sent nothing for {idle:g}s in the middle of the stream.",
                code="idle_timeout",
            )
    if failure is None and not done:
        failure = UpstreamError("The external provider ended the stream early.", code="stream_truncated")
    ex.completing = True
    if failure is not None:
        ex.reason, ex.error, ex.fault = failure.reason, failure.message, failure.fault
        await send({"type": "http.response.body", "body": sse_error_event(failure), "more_body": False})
    else:
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _event(payload: bytes) -> dict[str, Any]:
    try:
        msg = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise UpstreamError(
            "The external provider sent an event that is not JSON.", code=INVALID_EVENT
        ) from None
    if not isinstance(msg, dict):
        raise UpstreamError("The external provider sent an event that is not an object.", code=INVALID_EVENT)
    return msg


def _obj(msg: dict[str, Any], key: str) -> dict[str, Any]:
    value = msg.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UpstreamError(
            f"The external provider sent an event whose `{key}` is malformed.", code=INVALID_EVENT
        )
    return value


async def _translate(
    resp: ResponseStream,
    send: Send,
    ex: Exchange,
    include_usage: bool,
    idle: float,
    total: float,
    max_event_bytes: int,
) -> bool:
    """Anthropic SSE events in, OpenAI chunks out; True once message_stop was seen.

    Raises UpstreamError for an event that is not JSON, malformed, or an ``error`` event (the
    chunks translated before it are sent first); TimeoutError when nothing arrived for
    ``idle`` seconds (or past ``total``, loop time). Events are cut by the WHATWG splitter
    (any line ending, linear time, at most ``max_event_bytes`` held).
    """
    loop = asyncio.get_running_loop()
    t = _Translator(ex, include_usage)
    split = SseSplitter(max_event_bytes)
    while True:
        async with asyncio.timeout_at(min(loop.time() + idle, total)):
            data = await resp.read_chunk()
        if not data:
            return False
        try:
            events = split.feed(data)
        except EventTooLarge:
            raise UpstreamError(
                f"The external provider sent an SSE event longer than {max_event_bytes} bytes.",
                code="upstream_event_too_large",
            ) from None
        if not events:
            continue
        out: list[bytes] = []
        failure: UpstreamError | None = None
        for event in events[:-2].split(b"\n\n"):  # canonical: "data: <payload>\n\n" each
            payload = next(
                (line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")), None
            )
            try:
                chunk = t.translate(payload) if payload else None
            except UpstreamError as exc:
                failure = exc  # what came before the broken event still reaches the client
                break
            if chunk is not None:
                out.append(chunk)
            if t.stopped:
                break
        if out:
            if ex.ttft is None:
                ex.ttft = time.perf_counter() - ex.started
            ex.events += len(out)
            await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
        if failure is not None:
            raise failure
        if t.stopped:
            return True


class _Translator:
    """One Anthropic stream's state: its message id and model, for the OpenAI chunks."""

    __slots__ = ("created", "ex", "include_usage", "model", "rid", "stopped")

    def __init__(self, ex: Exchange, include_usage: bool) -> None:
        self.ex, self.include_usage = ex, include_usage
        self.rid, self.model, self.created = "chatcmpl-" + ex.request_id, "", int(time.time())
        self.stopped = False

    def _delta(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _chunk(
            self.rid, self.model, self.created, [{"index": 0, "delta": delta, "finish_reason": finish}]
        )

    def translate(self, payload: bytes) -> bytes | None:
        """One event's ``data`` → the OpenAI chunk(s) to send, or None. Raises UpstreamError."""
        msg = _event(payload)
        kind = msg.get("type")
        ex = self.ex
        if kind == "message_start":
            m = _obj(msg, "message")
            model = m.get("model")
            self.rid = "chatcmpl-" + _id(m.get("id"), ex.request_id)
            self.model = model if isinstance(model, str) else ""
            ex.prompt_tokens = _tokens(m.get("usage"), "input_tokens", INVALID_EVENT)
            return self._delta({"role": "assistant", "content": ""})
        if kind == "content_block_delta":
            d = _obj(msg, "delta")
            if d.get("type") != "text_delta":
                return None
            text = d.get("text")
            if not isinstance(text, str):
                raise UpstreamError(
                    "The external provider sent a text delta without text.", code=INVALID_EVENT
                )
            return self._delta({"content": text})
        if kind == "message_delta":
            finish = FINISH.get(str(_obj(msg, "delta").get("stop_reason")), "stop")
            ex.completion_tokens = _tokens(msg.get("usage"), "output_tokens", INVALID_EVENT)
            return self._delta({}, finish)
        if kind == "message_stop":
            self.stopped = True
            if not self.include_usage:
                return b"data: [DONE]\n\n"
            p, c = ex.prompt_tokens or 0, ex.completion_tokens or 0
            usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
            return _chunk(self.rid, self.model, self.created, [], usage=usage) + b"data: [DONE]\n\n"
        if kind == "error":
            err = msg.get("error")
            said = err.get("message") if isinstance(err, dict) else None
            raise UpstreamError(
                f"The external provider failed mid-stream: {said if isinstance(said, str) else 'unknown'}"
            )
        return None  # ping, content_block_start/stop, and event types added later
