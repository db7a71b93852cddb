"""Backend error bodies in OpenAI's shape, whoever wrote them.

OpenAI's error object (OpenAPI ``Error``) is ``{"message": str, "type": str, "param": str|null,
"code": str|null}``. The backends behind the gateway do not all agree: vLLM sends its Python
exception name as ``type`` (``"BadRequestError"``, ``"NotFoundError"``, even ``"Bad Request"``)
and the HTTP status as an *integer* ``code``; FastAPI answers ``{"detail": ...}``; vLLM's API-key
check answers ``{"error": "Unauthorized"}``; proxies in between answer HTML. The client gets the
backend's message and param, an OpenAI ``type`` chosen by status (unless the backend already sent
one of OpenAI's own), and ``code`` a string or null.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

# The error types OpenAI's API sends (its API reference and the openai-python SDK's tests);
# a backend sending one of these is kept as it is.
OPENAI_TYPES = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "not_found_error",
        "rate_limit_error",
        "insufficient_quota",
        "tokens",
        "requests",
        "server_error",
    }
)


def type_for_status(status: int) -> str:
    """OpenAI's error type for an HTTP status (the classes its SDK raises follow the status too)."""
    if status >= 500:
        return "server_error"
    return {
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
    }.get(status, "invalid_request_error")


@dataclass(frozen=True, slots=True)
class BackendError:
    """What a backend said, in OpenAI's vocabulary. ``message`` is None when it said nothing usable."""

    message: str | None
    type: str
    param: str | None
    code: str | None


def parse(status: int, body: bytes) -> BackendError:
    """Read a backend's error body (any of the shapes above; never raises)."""
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return BackendError(None, type_for_status(status), None, None)
    return from_object(status, parsed)


def from_object(status: int, parsed: Any) -> BackendError:
    """Like :func:`parse`, for an already decoded body (an SSE error event's JSON)."""
    message: str | None = None
    type_: Any = None
    param: Any = None
    code: Any = None
    if isinstance(parsed, dict):
        err = parsed.get("error")
        if isinstance(err, dict):
            message, type_, param, code = (
                err.get("message"),
                err.get("type"),
                err.get("param"),
                err.get("code"),
            )
        elif isinstance(err, str):
            message = err
        else:
            detail = parsed.get("detail")
            if isinstance(detail, str):
                message = detail
            elif isinstance(detail, list) and detail and isinstance(detail[0], dict):
                # FastAPI's request validation: [{"loc": ["body", "field"], "msg": ..., ...}]
                message = detail[0].get("msg")
                loc = detail[0].get("loc")
                if isinstance(loc, list) and len(loc) > 1:
                    param = ".".join(str(p) for p in loc[1:])
            else:
                message = parsed.get("message")
    if isinstance(code, int) and not isinstance(code, bool) and status == 0:
        status = code  # an SSE error event has no HTTP status of its own: vLLM's integer code is one
    param = param if isinstance(param, str) else None
    return BackendError(
        message if isinstance(message, str) and message else None,
        type_ if type_ in OPENAI_TYPES else type_for_status(status or 500),
        param,
        code if isinstance(code, str) else _known_code(status, param),
    )


def _known_code(status: int, param: str | None) -> str | None:
    """OpenAI's code where vLLM's structured answer says which one it is, else null.

    vLLM names the offending parameter: ``input_tokens`` for a prompt longer than the context
    (OpenAI: ``context_length_exceeded``), ``model`` on a 404 for an unknown model (OpenAI, and the
    gateway's own check: ``model_not_found``).
    """
    if param == "input_tokens" and status == 400:
        return "context_length_exceeded"
    if param == "model" and status == 404:
        return "model_not_found"
    return None
