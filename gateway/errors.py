"""The one place where failures become OpenAI-shaped error responses.

Every stage raises a ``GatewayError`` (or a subclass); the proxy endpoint and
the FastAPI exception handlers render it with :func:`error_body`. The body is
``{"error": {"message", "type", "param", "code"}}`` so the OpenAI SDK raises
the matching exception class (``BadRequestError``, ``NotFoundError``, ...).

``type`` is one of OpenAI's error types (``invalid_request_error``, ``authentication_error``,
``permission_error``, ``rate_limit_error``, ``server_error``, ...): every failure of the gateway
or its backends (5xx) is a ``server_error``, as OpenAI's own 500/503 answers are; ``code`` is the
gateway's own string (documented), never a number.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from gateway.asgi import Send


class Fault(StrEnum):
    """Who caused a failure: what breakers, retries and connection reuse decide from.

    Only ``BACKEND`` failures (5xx, connection errors, a backend that stays silent) count
    against a replica's circuit breaker, like Envoy's outlier detection counts only upstream
    errors. ``DEADLINE`` is the request's own total deadline: a long generation is legitimate.
    """

    CLIENT = "client"  # the request, or the client's connection (too slow, gone)
    BACKEND = "backend"
    GATEWAY = "gateway"  # the gateway's own limits, capacity or bugs
    DEADLINE = "deadline"


class GatewayError(Exception):
    """A failure with a status, an OpenAI error type and a machine-readable code.

    ``reason`` is the low-cardinality label used in metrics and the audit log.
    """

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"
    reason: str = "internal"
    fault: Fault = Fault.GATEWAY  # who caused it; only Fault.BACKEND counts against a breaker
    retryable: bool = False  # safe to send to another replica (nothing reached the client)

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.retry_after = retry_after

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.retry_after is None:
            return []
        return [(b"retry-after", str(self.retry_after).encode())]


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"
    reason = "validation"
    fault = Fault.CLIENT


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"
    reason = "validation"
    fault = Fault.CLIENT


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"
    reason = "validation"
    fault = Fault.CLIENT


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"
    reason = "validation"
    fault = Fault.CLIENT


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"
    reason = "validation"
    fault = Fault.CLIENT


class Unauthenticated(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_token"
    reason = "auth"
    fault = Fault.CLIENT

    def headers(self) -> list[tuple[bytes, bytes]]:
        # RFC 6750: say it is a bearer problem, never echo the credential; a request without a
        # bearer credential gets no error code (3.1), only the scheme to use.
        error = _BEARER_ERRORS.get(self.code or "", "invalid_token")
        if error is None:
            return [(b"www-authenticate", b"Bearer")]
        return [(b"www-authenticate", f'Bearer error="{error}"'.encode())]


_BEARER_ERRORS: dict[str, str | None] = {
    "missing_credentials": None,
    "duplicate_credentials": "invalid_request",  # RFC 6750 3.1: more than one method or copy
    "invalid_token": "invalid_token",
    "token_expired": "invalid_token",
    "invalid_api_key": "invalid_token",
    "revoked_api_key": "invalid_token",
}


class AuthUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "auth_unavailable"
    reason = "auth"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"
    reason = "auth"
    fault = Fault.CLIENT


class NoBackendAvailable(GatewayError):
    status = 503
    type = "server_error"
    code = "no_backend_available"
    reason = "upstream_unavailable"


class ShuttingDown(GatewayError):
    status = 503
    type = "server_error"
    code = "shutting_down"
    reason = "shed"


class UpstreamUnavailable(GatewayError):
    """The backend could not be reached (connection refused, reset before a response)."""

    status = 503
    type = "server_error"
    code = "upstream_unavailable"
    reason = "upstream_error"
    fault = Fault.BACKEND
    retryable = True


class UpstreamError(GatewayError):
    """The backend answered with a server error or broke the protocol."""

    status = 502
    type = "server_error"
    code = "upstream_error"
    reason = "upstream_error"
    fault = Fault.BACKEND


class UpstreamResponseTooLarge(UpstreamError):
    """A non-streamed answer longer than ``streaming.max_response_bytes``: 502, the backend's fault.

    The gateway stopped reading and closed the connection (never pooled: the rest of the body is
    still on it). Not retryable: the backend did the work, and another replica would only repeat it.
    """

    code = "upstream_response_too_large"


class UpstreamTimeout(GatewayError):
    """The backend stayed silent: no connection, no first byte, or a gap mid-stream."""

    status = 504
    type = "server_error"
    code = "upstream_timeout"
    reason = "timeout"
    fault = Fault.BACKEND


class TotalTimeout(UpstreamTimeout):
    """The request's total deadline passed: its own budget, not a sign the backend is broken."""

    code = "total_timeout"
    fault = Fault.DEADLINE


class ClientTooSlow(GatewayError):
    """The client stopped accepting the response (a stream it does not read).

    Nothing can be sent to such a client any more: the gateway closes the connection, and
    the status is only for the audit log (nginx logs the same case as 408 after send_timeout).
    """

    status = 408
    type = "invalid_request_error"
    code = "client_slow"
    reason = "client_slow"
    fault = Fault.CLIENT


def error_body(message: str, type_: str, param: str | None, code: str | None) -> bytes:
    """OpenAI's error response (OpenAPI ``ErrorResponse``): ``code`` is a string or null."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def sse_error_event(exc: GatewayError) -> bytes:
    """The final SSE event sent when a stream fails after it has started."""
    return b"data: " + exc.body() + b"\n\ndata: [DONE]\n\n"


async def send_error(send: Send, exc: GatewayError) -> None:
    """Answer ``exc`` as a whole ASGI response: its status, OpenAI-shaped JSON body and headers
    (``Retry-After`` when it has one), for paths that answer before any pipeline stage did."""
    body = exc.body()
    await send(
        {
            "type": "http.response.start",
            "status": exc.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *exc.headers(),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
