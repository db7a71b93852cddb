"""Stage 1, receive: read the body within its size limit, parse and validate it.

The result is the client's own JSON object (a dict) plus the few facts the
later stages need. Validation uses the pydantic wire schema; the validated
model is thrown away and the dict is what goes upstream, so unknown vLLM
fields survive untouched.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Final

import orjson
from pydantic import BaseModel, ValidationError

from gateway.api.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from gateway.asgi import Receive
from gateway.config import ValidationSettings
from gateway.errors import GatewayError, InvalidRequest, PayloadTooLarge


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One proxied OpenAI endpoint."""

    name: str  # metric/log label: "chat", "completions", "embeddings"
    path: bytes  # upstream path
    schema: type[BaseModel]
    streams: bool  # whether `stream: true` is allowed
    generates: bool = True  # produces completion tokens (embeddings do not)


CHAT: Final = Endpoint("chat", b"/v1/chat/completions", ChatCompletionRequest, True)
COMPLETIONS: Final = Endpoint("completions", b"/v1/completions", CompletionRequest, True)
EMBEDDINGS: Final = Endpoint("embeddings", b"/v1/embeddings", EmbeddingRequest, False, False)


@dataclass(slots=True)
class ParsedRequest:
    endpoint: Endpoint
    body: dict[str, Any]
    model: str
    stream: bool
    client_wants_usage: bool
    # The completion cap the endpoint honours, validated (1..max_tokens_ceiling): chat
    # `max_completion_tokens` then `max_tokens`, completions `max_tokens` (vLLM's
    # ChatCompletionRequest / CompletionRequest); 0 for embeddings (nothing is generated);
    # None when the client set none.
    max_tokens: int | None = None
    # Sequences generated, which each may take max_tokens: choices (`n`, or completions'
    # `best_of`, validated 1..max_n) times prompts (a completions `prompt` list, 1..max_prompts).
    n: int = 1


class UnsupportedMediaType(GatewayError):
    """415: a request body in a content coding the gateway does not decode (RFC 9110 15.5.16)."""

    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"
    reason = "validation"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"accept-encoding", b"gzip, deflate")]


# Content-Encoding -> zlib's wbits: gzip framing, or zlib framing (HTTP's "deflate", RFC 9110 8.4.1.2).
_DECODERS: Final = {b"gzip": 31, b"x-gzip": 31, b"deflate": 15}


async def read_body(
    receive: Receive, content_length: int | None, limit: int, encoding: bytes | None = None
) -> bytes:
    """The whole request body, at most ``limit`` bytes, decoded from ``encoding``.

    ``encoding`` is the Content-Encoding header: none or `identity` reads the body as is;
    `gzip` / `deflate` are decompressed as they arrive, and ``limit`` applies to the
    decompressed size too (decompression stops as soon as the output passes it, so a
    decompression bomb costs at most ``limit`` bytes). Raises ``PayloadTooLarge`` (413),
    ``UnsupportedMediaType`` (415) for any other coding, ``InvalidRequest`` (400) for a
    corrupt or truncated compressed body, ``ClientGone`` when the client disconnects.
    """
    if content_length is not None and content_length > limit:
        raise PayloadTooLarge(
            f"Request body is {content_length} bytes; the limit is {limit} bytes.", param=None
        )
    if encoding:
        # A list (RFC 9110 8.4: codings in the order applied; repeated headers arrive joined):
        # `identity` is no coding; one real coding is decoded, more are not supported.
        codings = [c for c in (p.strip().lower() for p in encoding.split(b",")) if c and c != b"identity"]
        if codings:
            wbits = _DECODERS.get(codings[0]) if len(codings) == 1 else None
            if wbits is None:
                shown = encoding.decode("latin-1")[:64]
                raise UnsupportedMediaType(
                    f"Content-Encoding `{shown}` is not supported; send one of gzip, deflate or identity."
                )
            return await _read_decoded(receive, limit, wbits)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _read_decoded(receive: Receive, limit: int, wbits: int) -> bytes:
    """Decompress as the body arrives. A gzip body may hold several members, decoded one after
    the other (RFC 1952 §2.2); bytes after the end that are not a member are a corrupt body."""
    d: Any = zlib.decompressobj(wbits)
    out: list[bytes] = []
    size = wire = 0
    too_large = f"Request body exceeds the limit of {limit} bytes once decompressed."
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            data: bytes = message.get("body", b"")
            wire += len(data)
            if wire > limit:
                raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
            while data:
                if d.eof:
                    if wbits != _DECODERS[b"gzip"]:
                        raise zlib.error("data after the end of the stream")
                    d = zlib.decompressobj(wbits)  # the next gzip member
                # Never more than one byte past the limit per step: a bomb stops here.
                piece = d.decompress(data, limit - size + 1)
                size += len(piece)
                if size > limit:
                    raise PayloadTooLarge(too_large)
                out.append(piece)
                data = d.unused_data if d.eof else d.unconsumed_tail
            if not message.get("more_body", False):
                break
        if not d.eof:
            raise zlib.error("truncated")
    except zlib.error:
        raise InvalidRequest(
            "The request body is not valid for its Content-Encoding (corrupt or truncated).",
            code="invalid_encoding",
        ) from None
    return b"".join(out)


def _best_of(best_of: int | None, n: int | None, limits: ValidationSettings) -> int:
    if best_of is None:
        return 1
    if best_of > limits.max_n:
        raise InvalidRequest(
            f"`best_of` is {best_of}; this gateway allows at most {limits.max_n}.",
            param="best_of",
            code="invalid_value",
        )
    if n is not None and best_of < n:
        raise InvalidRequest("`best_of` must be at least `n`.", param="best_of", code="invalid_value")
    return best_of


def _prompts(prompt: Any, limits: ValidationSettings) -> int:
    """How many prompts a completions request carries: a list of strings or of token-id lists
    is one prompt per entry (vLLM generates for each); a string or one token-id list is one."""
    if not isinstance(prompt, list) or not prompt or isinstance(prompt[0], int):
        return 1
    if len(prompt) > limits.max_prompts:
        raise InvalidRequest(
            f"`prompt` has {len(prompt)} prompts; this gateway allows at most {limits.max_prompts}.",
            param="prompt",
            code="invalid_value",
        )
    return len(prompt)


class ClientGone(Exception):
    """The client disconnected before its request was fully read."""


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "StrictStr"})


def _first_error(exc: ValidationError) -> InvalidRequest:
    errors = exc.errors(include_url=False)
    err = errors[0]
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "json-or-python"))]
    # pydantic puts the union member name in the loc ("str", "list[...]"): drop it.
    loc = [p for p in loc if not (p.startswith(("list[", "dict[")) or p in _UNION_TAGS)]
    param = ".".join(loc) or (err.get("ctx") or {}).get("param")
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err["type"] in ("model_type", "model_attributes_type", "dataclass_type"):
        msg = "Input should be a JSON object"  # pydantic's text names the schema's Python class
    where = f"`{param}`: " if param else ""
    more = f" ({len(errors) - 1} more problem(s) in the request)" if len(errors) > 1 else ""
    return InvalidRequest(f"Invalid request: {where}{msg}{more}", param=param, code=err["type"])


def parse(endpoint: Endpoint, raw: bytes, limits: ValidationSettings) -> ParsedRequest:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    try:
        req = endpoint.schema.model_validate(body)
    except ValidationError as exc:
        raise _first_error(exc) from None
    declared = type(req).model_fields  # extras (extra="allow") hold the client's raw JSON values

    def field(name: str) -> Any:
        return getattr(req, name) if name in declared else None

    stream = bool(getattr(req, "stream", False))
    if stream and not endpoint.streams:
        raise InvalidRequest("This endpoint does not stream.", param="stream", code="invalid_value")
    for name in ("max_tokens", "max_completion_tokens"):
        value = field(name)
        if value is not None and value > limits.max_tokens_ceiling:
            raise InvalidRequest(
                f"`{name}` is {value}; this gateway allows at most {limits.max_tokens_ceiling}.",
                param=name,
                code="invalid_value",
            )
    n = field("n")
    if n is not None and n > limits.max_n:
        raise InvalidRequest(
            f"`n` is {n}; this gateway allows at most {limits.max_n}.",
            param="n",
            code="invalid_value",
        )
    stop = field("stop")
    if isinstance(stop, list) and len(stop) > limits.max_stop_sequences:
        raise InvalidRequest(
            f"`stop` has {len(stop)} entries; at most {limits.max_stop_sequences} are allowed.",
            param="stop",
            code="invalid_value",
        )
    wants_usage = False
    if stream:
        opts = body.get("stream_options")
        wants_usage = bool(opts.get("include_usage")) if isinstance(opts, dict) else False
    model: str = body["model"]
    if endpoint.generates:
        max_tokens = field("max_completion_tokens") or field("max_tokens")
        sequences = max(n or 1, _best_of(field("best_of"), n, limits)) * _prompts(field("prompt"), limits)
        return ParsedRequest(endpoint, body, model, stream, wants_usage, max_tokens, sequences)
    return ParsedRequest(endpoint, body, model, stream, wants_usage, 0, 1)
