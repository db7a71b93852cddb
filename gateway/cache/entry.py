"""Cache entries: what is stored for one answer, and how it is served in either form.

An entry is one Redis string: a JSON header line, ``\\n``, then the answer as the backend sent
it: the JSON body of a plain answer (kind ``j``), or a stream's canonical SSE events including
vLLM's usage chunk and ``data: [DONE]`` (kind ``s``). The same form is replayed byte for byte;
the other form is derived: a stream's chunks folded into one ``chat.completion`` /
``text_completion`` body, or a plain body cut into the chunks vLLM would send (a role chunk, one
content chunk carrying the finish reason, the usage chunk when asked, ``[DONE]``). Answers with
logprobs are served only in the form they were stored in (folding logprobs is not worth the
risk of serving them wrong).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

PLAIN = b"j"
STREAM = b"s"
DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored answer. ``created``: Unix seconds when it was stored; tokens from vLLM's usage."""

    kind: bytes  # PLAIN or STREAM
    created: float
    prompt_tokens: int
    completion_tokens: int
    body: bytes

    def encode(self) -> bytes:
        head = orjson.dumps(
            {"k": self.kind.decode(), "t": self.created, "p": self.prompt_tokens, "c": self.completion_tokens}
        )
        return head + b"\n" + self.body

    @staticmethod
    def decode(raw: bytes) -> Entry | None:
        """The entry stored as ``raw``, or None when it is not one (a foreign or damaged value)."""
        head, sep, body = raw.partition(b"\n")
        if not sep:
            return None
        try:
            h = orjson.loads(head)
            kind = h["k"].encode()
            created, p, c = float(h["t"]), int(h["p"]), int(h["c"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return None
        if kind not in (PLAIN, STREAM):
            return None
        return Entry(kind, created, max(0, p), max(0, c), body)


def _events(body: bytes) -> list[dict[str, Any]] | None:
    out: list[dict[str, Any]] = []
    for event in body.split(b"\n\n"):
        if not event or event == b"data: [DONE]":
            continue
        if not event.startswith(b"data: "):
            return None
        try:
            chunk = orjson.loads(event[6:])
        except orjson.JSONDecodeError:
            return None
        if not isinstance(chunk, dict):
            return None
        out.append(chunk)
    return out


def plain_from_stream(body: bytes, endpoint: str) -> bytes | None:
    """One JSON answer folded from a stored stream of ``endpoint`` ("chat" or "completions").

    None when it cannot be folded faithfully (logprobs, a chunk that is not JSON).
    """
    chunks = _events(body)
    if not chunks:
        return None
    first = chunks[0]
    usage: Any = None
    fingerprint: Any = None
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        if chunk.get("system_fingerprint") is not None:
            fingerprint = chunk["system_fingerprint"]
        if chunk.get("usage") is not None:
            usage = chunk["usage"]
        for c in chunk.get("choices") or ():
            if not isinstance(c, dict) or not isinstance(c.get("index"), int):
                return None
            if c.get("logprobs") is not None:
                return None
            acc = choices.setdefault(c["index"], {"text": [], "reasoning": {}, "tools": {}, "role": None})
            if c.get("finish_reason") is not None:
                acc["finish_reason"] = c["finish_reason"]
                acc["stop_reason"] = c.get("stop_reason")
            if endpoint == "completions":
                if isinstance(c.get("text"), str):
                    acc["text"].append(c["text"])
                continue
            delta = c.get("delta")
            if not isinstance(delta, dict):
                continue
            if delta.get("role"):
                acc["role"] = delta["role"]
            if isinstance(delta.get("content"), str):
                acc["text"].append(delta["content"])
            for key in ("reasoning_content", "reasoning"):  # vLLM may send both, the same text
                if isinstance(delta.get(key), str):
                    acc["reasoning"].setdefault(key, []).append(delta[key])
            for call in delta.get("tool_calls") or ():
                if not isinstance(call, dict):
                    return None
                slot = acc["tools"].setdefault(call.get("index", 0), {"function": {"arguments": ""}})
                for key in ("id", "type"):
                    if call.get(key) is not None:
                        slot[key] = call[key]
                fn = call.get("function")
                if isinstance(fn, dict):
                    if fn.get("name") is not None:
                        slot["function"]["name"] = fn["name"]
                    if isinstance(fn.get("arguments"), str):
                        slot["function"]["arguments"] += fn["arguments"]
    out_choices = []
    for index in sorted(choices):
        acc = choices[index]
        finish = {"finish_reason": acc.get("finish_reason"), "stop_reason": acc.get("stop_reason")}
        if endpoint == "completions":
            out_choices.append({"index": index, "text": "".join(acc["text"]), "logprobs": None, **finish})
            continue
        message: dict[str, Any] = {
            "role": acc["role"] or "assistant",
            "content": "".join(acc["text"]),
            "refusal": None,  # required (nullable) by OpenAI's schema; vLLM sends it too
        }
        for key, parts in acc["reasoning"].items():
            message[key] = "".join(parts)
        if acc["tools"]:
            message["tool_calls"] = [acc["tools"][k] for k in sorted(acc["tools"])]
            if not message["content"]:
                message["content"] = None  # as vLLM's plain answer with tool calls
        out_choices.append({"index": index, "message": message, "logprobs": None, **finish})
    answer: dict[str, Any] = {
        "id": first.get("id"),
        "object": "text_completion" if endpoint == "completions" else "chat.completion",
        "created": first.get("created"),
        "model": first.get("model"),
        "choices": out_choices,
    }
    if fingerprint is not None:
        answer["system_fingerprint"] = fingerprint
    answer["usage"] = usage
    return orjson.dumps(answer)


def stream_from_plain(body: bytes, endpoint: str, include_usage: bool) -> bytes | None:
    """The SSE events vLLM would send for a stored plain answer of ``endpoint``, ending in [DONE].

    Per choice: chat gets a role chunk then one chunk with the whole content (and tool calls)
    and the finish reason; completions one chunk with the text and the finish reason. The usage
    chunk follows when ``include_usage`` (then it, not the terminal chunks, carries
    ``system_fingerprint``, as vLLM does). None when the answer cannot be cut faithfully.
    """
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
        return None
    chat = endpoint == "chat"
    base = {
        "id": answer.get("id"),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": answer.get("created"),
        "model": answer.get("model"),
    }
    fingerprint = answer.get("system_fingerprint")
    parts: list[bytes] = []

    def emit(chunk: dict[str, Any]) -> None:
        parts.append(b"data: " + orjson.dumps(chunk) + b"\n\n")

    for c in answer["choices"]:
        if not isinstance(c, dict) or c.get("logprobs") is not None:
            return None
        index = c.get("index", 0)
        finish = {"finish_reason": c.get("finish_reason"), "stop_reason": c.get("stop_reason")}
        tail = {} if include_usage or fingerprint is None else {"system_fingerprint": fingerprint}
        if not chat:
            emit(
                {
                    **base,
                    "choices": [{"index": index, "text": c.get("text", ""), "logprobs": None, **finish}],
                    **tail,
                }
            )
            continue
        message = c.get("message")
        if not isinstance(message, dict):
            return None
        role = message.get("role") or "assistant"
        emit(
            {
                **base,
                "choices": [
                    {
                        "index": index,
                        "delta": {"role": role, "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
        )
        delta: dict[str, Any] = {}
        if message.get("content") is not None:
            delta["content"] = message["content"]
        for key in ("reasoning_content", "reasoning"):
            if message.get(key) is not None:
                delta[key] = message[key]
        calls = message.get("tool_calls")
        if calls:
            delta["tool_calls"] = [
                {"index": i, **call} for i, call in enumerate(calls) if isinstance(call, dict)
            ]
        emit({**base, "choices": [{"index": index, "delta": delta, "logprobs": None, **finish}], **tail})
    if include_usage and answer.get("usage") is not None:
        usage_chunk = {**base, "choices": [], "usage": answer["usage"]}
        if fingerprint is not None:
            usage_chunk["system_fingerprint"] = fingerprint
        emit(usage_chunk)
    parts.append(DONE)
    return b"".join(parts)
