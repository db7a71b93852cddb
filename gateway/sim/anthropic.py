"""Anthropic's Messages API, simulated: the external provider in fallback tests.

``POST /v1/messages``, plain and streamed (message_start, content_block_*,
message_delta, message_stop events), with the same deterministic text as the
vLLM simulator (the words of the last user message, repeated).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from gateway.asgi import Send
from gateway.sim import engine


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"


async def messages(send: Send, body: dict[str, Any], itl: float) -> None:
    msgs = body.get("messages") or []
    last = next((m.get("content") for m in reversed(msgs) if m.get("role") == "user"), "")
    words = str(last).split()
    prompt = sum(len(str(m.get("content", "")).split()) + 4 for m in msgs) + len(
        str(body.get("system", "")).split()
    )
    max_tokens = int(body.get("max_tokens") or 16)
    n = min(max_tokens, 16)
    tokens = engine.tokens_for(words, n)
    stop = "max_tokens" if n == max_tokens else "end_turn"
    mid, model = engine.new_id("msg_"), body.get("model", "claude")
    if not body.get("stream"):
        out = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": "".join(tokens)}],
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": prompt, "output_tokens": n},
        }
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": orjson.dumps(out)})
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    )
    start = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "usage": {"input_tokens": prompt, "output_tokens": 1},
    }
    head = _event("message_start", {"message": start}) + _event(
        "content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}
    )
    await send({"type": "http.response.body", "body": head + _event("ping", {}), "more_body": True})
    for t in tokens:
        await asyncio.sleep(itl)
        delta = _event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": t}})
        await send({"type": "http.response.body", "body": delta, "more_body": True})
    tail = (
        _event("content_block_stop", {"index": 0})
        + _event(
            "message_delta",
            {"delta": {"stop_reason": stop, "stop_sequence": None}, "usage": {"output_tokens": n}},
        )
        + _event("message_stop", {})
    )
    await send({"type": "http.response.body", "body": tail, "more_body": False})
