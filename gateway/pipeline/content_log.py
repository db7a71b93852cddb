"""The request's text for content logging (teams with ``log_content: true``).

Any body the receive stage lets through must give a string here, never an exception: the
validator (gateway/api/protocol.py) checks only the fields the gateway needs, so a content part
may carry ``"text": 5`` or no text at all, and extra fields are free-form JSON. The text is built
only up to ``MAX_LOGGED_CHARS`` (the rest is cut and said so), so a 4 MiB prompt costs the event
loop no more than a short one; gateway/redact.py then works on that bounded text.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.redact import MAX_LOGGED_CHARS


def prompt_text(body: dict[str, Any], limit: int = MAX_LOGGED_CHARS) -> str:
    """``role: text`` lines of ``messages``, else ``prompt`` or ``input``; at most ``limit`` chars.

    Text content parts give their text; other parts (images, audio, a part whose ``text`` is not
    a string) give ``[<type>]``. Token-id prompts and lists are logged as their JSON.
    """
    out = _Bounded(limit)
    messages = body.get("messages")
    if isinstance(messages, list):
        for i, m in enumerate(messages):
            if out.full:
                break
            if i:
                out.add("\n")
            if not isinstance(m, dict):
                out.add(_json(m, limit))
                continue
            role = m.get("role")
            out.add(f"{role if isinstance(role, str) else '?'}: ")
            _content(m.get("content"), out, limit)
        return out.text()
    p = body.get("prompt", body.get("input", ""))
    out.add(p if isinstance(p, str) else _json(p, limit))
    return out.text()


def _content(c: Any, out: _Bounded, limit: int) -> None:
    if c is None:
        return
    if isinstance(c, str):
        out.add(c)
        return
    if not isinstance(c, list):
        out.add(_json(c, limit))
        return
    for j, part in enumerate(c):
        if out.full:
            return
        if j:
            out.add(" ")
        if isinstance(part, dict):
            text = part.get("text")
            if isinstance(text, str):
                out.add(text)
            else:
                kind = part.get("type")
                out.add(f"[{kind[:40] if isinstance(kind, str) else 'part'}]")
        else:
            out.add(_json(part, limit))


def _json(value: Any, limit: int) -> str:
    try:
        text = orjson.dumps(value).decode()
    except TypeError:  # e.g. an integer beyond 64 bits (orjson refuses it)
        text = repr(type(value).__name__)
    return text[: limit + 1]


class _Bounded:
    """Pieces of text up to a character limit; what goes past it is counted, not kept."""

    __slots__ = ("cut", "full", "limit", "parts", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0
        self.cut = False
        self.full = False

    def add(self, text: str) -> None:
        if self.full:
            self.cut = self.cut or bool(text)
            return
        room = self.limit - self.size
        if len(text) > room:
            text = text[:room]
            self.cut = self.full = True
        self.parts.append(text)
        self.size += len(text)

    def text(self) -> str:
        joined = "".join(self.parts)
        return joined + " [truncated]" if self.cut else joined
