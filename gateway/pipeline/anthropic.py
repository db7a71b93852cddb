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
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from gateway.asgi import Send
from gateway.errors import Fault, GatewayError, TotalTimeout, UpstreamError, error_body, sse_error_event
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.upstream import UpstreamResponse

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


def from_message(data: dict[str, Any], ex: Exchange) -> bytes:
    text = "".join(b.get("text", "") for b in data.get("content", []) if b.get("type") == "text")
    usage = data.get("usage") or {}
    ex.prompt_tokens, ex.completion_tokens = usage.get("input_tokens"), usage.get("output_tokens")
    p, c = ex.prompt_tokens or 0, ex.completion_tokens or 0
    return orjson.dumps(
        {
            "id": "chatcmpl-" + str(data.get("id", "")),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": data.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": FINISH.get(str(data.get("stop_reason")), "stop"),
                    "logprobs": None,
                }
            ],
            "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
        }
    )


def anthropic_error(status: int, body: bytes, ex: Exchange) -> tuple[int, bytes]:
    try:
        message = str(orjson.loads(body)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = f"The external provider answered {status}."
    ex.reason = "upstream_client_error" if status < 500 else "upstream_error"
    ex.fault = Fault.CLIENT if status < 500 else Fault.BACKEND
    ex.error = f"external provider answered {status}: {message}"
    if status < 500:
        return status, error_body(message, "invalid_request_error", None, status)
    return 502, error_body(
        f"The external provider failed ({status}): {message}", "upstream_error", None, status
    )


async def relay_anthropic(
    resp: UpstreamResponse,
    send: Send,
    ex: Exchange,
    request_id: bytes,
    headers: list[tuple[bytes, bytes]],
    *,
    stream: bool,
    include_usage: bool,
    total_deadline: float,
) -> None:
    async with asyncio.timeout_at(total_deadline):
        if not stream or resp.status != 200:
            raw = await resp.read()
            if resp.status == 200:
                status, body = 200, from_message(orjson.loads(raw), ex)
            else:
                status, body = anthropic_error(resp.status, raw, ex)
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
            done = await _translate(resp, send, ex, include_usage)
        except UpstreamError as exc:
            failure = exc
        except TimeoutError:
            failure = TotalTimeout("The external provider took too long.")
        if failure is None and not done:
            failure = UpstreamError("The external provider ended the stream early.", code="stream_truncated")
        ex.completing = True
        if failure is not None:
            ex.reason, ex.error, ex.fault = failure.reason, failure.message, failure.fault
            await send({"type": "http.response.body", "body": sse_error_event(failure), "more_body": False})
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _translate(resp: UpstreamResponse, send: Send, ex: Exchange, include_usage: bool) -> bool:
    """Anthropic SSE events in, OpenAI chunks out; True once message_stop was seen."""
    rid, model, created = "chatcmpl-" + ex.request_id, "", int(time.time())
    finish: str | None = None
    buf = b""
    while True:
        data = await resp.read_chunk()
        if not data:
            return False
        buf += data
        *events, buf = buf.split(b"\n\n")
        out: list[bytes] = []
        for event in events:
            payload = next(
                (line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")), None
            )
            if not payload:
                continue
            msg = orjson.loads(payload)
            kind = msg.get("type")
            if kind == "message_start":
                m = msg.get("message", {})
                rid, model = "chatcmpl-" + str(m.get("id", ex.request_id)), str(m.get("model", ""))
                ex.prompt_tokens = (m.get("usage") or {}).get("input_tokens")
                delta = {"role": "assistant", "content": ""}
                out.append(_chunk(rid, model, created, [{"index": 0, "delta": delta, "finish_reason": None}]))
            elif kind == "content_block_delta" and msg.get("delta", {}).get("type") == "text_delta":
                delta = {"content": msg["delta"].get("text", "")}
                out.append(_chunk(rid, model, created, [{"index": 0, "delta": delta, "finish_reason": None}]))
            elif kind == "message_delta":
                finish = FINISH.get(str(msg.get("delta", {}).get("stop_reason")), "stop")
                ex.completion_tokens = (msg.get("usage") or {}).get("output_tokens")
                out.append(_chunk(rid, model, created, [{"index": 0, "delta": {}, "finish_reason": finish}]))
            elif kind == "message_stop":
                if include_usage:
                    p, c = ex.prompt_tokens or 0, ex.completion_tokens or 0
                    usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
                    out.append(_chunk(rid, model, created, [], usage=usage))
                out.append(b"data: [DONE]\n\n")
                await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
                return True
            elif kind == "error":
                err = msg.get("error") or {}
                raise UpstreamError(
                    f"The external provider failed mid-stream: {err.get('message', 'unknown')}"
                )
        if out:
            if ex.ttft is None:
                ex.ttft = time.perf_counter() - ex.started
            ex.events += len(out)
            await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
