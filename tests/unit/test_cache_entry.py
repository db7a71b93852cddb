"""Folding a stored stream into one answer (gateway/cache/entry.py) on vLLM's delta shapes."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.cache.entry import plain_from_stream, stream_from_plain


def sse(*chunks: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def test_reasoning_in_both_fields_is_kept_once_in_each() -> None:
    """vLLM's DeltaMessage carries `reasoning` and its alias `reasoning_content` with the same text."""
    body = sse(
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning": "think ", "reasoning_content": "think "}),
        chunk({"reasoning": "hard", "reasoning_content": "hard"}),
        chunk({"content": "42"}, "stop"),
    )
    folded = plain_from_stream(body, "chat")
    assert folded is not None
    message = orjson.loads(folded)["choices"][0]["message"]
    assert message["reasoning"] == message["reasoning_content"] == "think hard"
    assert message["content"] == "42"


def test_tool_calls_without_text_have_null_content() -> None:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a"'}}
    body = sse(
        chunk({"role": "assistant", "content": ""}),
        chunk({"tool_calls": [call]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}, "tool_calls"),
    )
    folded = plain_from_stream(body, "chat")
    assert folded is not None
    message = orjson.loads(folded)["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]
    # and back: the plain answer cut into chunks folds to the same message
    again = plain_from_stream(stream_from_plain(folded, "chat", True) or b"", "chat")
    assert again is not None
    assert (
        orjson.loads(again)["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'
    )


def test_logprobs_are_not_folded() -> None:
    c = chunk({"content": "x"}, "stop")
    c["choices"][0]["logprobs"] = {
        "content": [{"token": "x", "logprob": -0.1, "bytes": [120], "top_logprobs": []}]
    }
    assert plain_from_stream(sse(c), "chat") is None


def test_complete_stream_on_vllms_own_bytes() -> None:
    """The check a streamed answer passes before it is stored (gateway/cache/stage.py), on real
    vLLM 0.32.0 streams: complete ones pass; cut, aborted or unfinished ones do not."""
    from pathlib import Path

    from gateway.cache.stage import complete_stream

    fixtures = Path(__file__).parents[1] / "fixtures" / "vllm-0.32.0-cpu"
    for name in ("chat_stream.sse", "completions_stream.sse"):
        raw = (fixtures / name).read_bytes()
        assert complete_stream(raw), name
        cut = raw[: raw.find(b'"finish_reason":"')]  # the connection broke before the last chunk
        assert not complete_stream(cut), name
        assert not complete_stream(raw.replace(b'"finish_reason":"length"', b'"finish_reason":"abort"'))
        spaced = raw.replace(b'"finish_reason":"', b'"finish_reason": "')  # another server's spacing
        assert complete_stream(spaced), name
    assert not complete_stream(b'data: {"choices":[{"finish_reason":"sto')  # unterminated
