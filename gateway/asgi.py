"""ASGI type aliases shared by the pure-ASGI parts of the gateway."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def header(scope: Scope, name: bytes) -> bytes | None:
    """First value of a request header (names in ASGI scopes are lower-case)."""
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


def header_list(scope: Scope, name: bytes) -> bytes | None:
    """Every value of a request header joined with ``, ``, as RFC 9110 §5.3 combines repeated
    field lines (a proxy in front reads them so): for list-valued fields such as
    Content-Encoding, where one copy alone would let the gateway and that proxy disagree."""
    found = [value for key, value in scope["headers"] if key == name]
    if not found:
        return None
    return found[0] if len(found) == 1 else b", ".join(found)
