"""Checking a batch input file line by line, and reading its requests back.

Each line of a batch input file is one request, as OpenAI's Batch API defines it::

    {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

:func:`validate_batch_input` reads the whole file once (streamed) and reports every invalid
line with its 1-based number, in OpenAI's batch error shape ``{"code", "message", "param",
"line"}``, so a batch with a bad line fails at ``validating`` and nothing is enqueued.
:func:`iter_batch_requests` then yields the requests of a validated file for enqueueing.

Error codes: ``empty_file``, ``too_many_lines``, ``invalid_json_line``, ``invalid_custom_id``,
``duplicate_custom_id``, ``invalid_method``, ``invalid_url``, ``invalid_body``,
``missing_model``, ``stream_not_supported``, ``model_not_allowed``, ``model_not_found``,
``line_too_large``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson

from gateway.errors import InvalidRequest
from gateway.jobs.files import Files

# A line's model check: ``None`` (allowed), a message (``model_not_allowed``), or (code, message).
ModelCheck = Callable[[str, dict[str, Any]], str | tuple[str, str] | None]

MAX_REPORTED_ERRORS = 1000  # errors listed per batch (the count of invalid lines is not capped)


def _error(code: str, message: str, param: str | None, line: int | None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def _check_line(
    number: int,
    raw: bytes,
    endpoint: str,
    check_model: ModelCheck,
    seen: set[str],
    max_line_bytes: int | None = None,
) -> dict[str, Any] | None:
    """The first thing wrong with one line, or ``None``; adds its ``custom_id`` to ``seen``."""
    if max_line_bytes is not None and len(raw) > max_line_bytes:
        return _error(
            "line_too_large",
            f"This line is larger than a request may be here ({max_line_bytes} bytes).",
            None,
            number,
        )
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _error("invalid_json_line", "This line is not valid JSON.", None, number)
    if not isinstance(item, dict):
        return _error("invalid_json_line", "This line is not a JSON object.", None, number)
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return _error("invalid_custom_id", "`custom_id` must be a non-empty string.", "custom_id", number)
    if custom_id in seen:
        return _error(
            "duplicate_custom_id",
            f"The custom_id `{custom_id[:64]}` appears on an earlier line; each must be unique.",
            "custom_id",
            number,
        )
    seen.add(custom_id)
    if item.get("method") != "POST":
        return _error("invalid_method", "`method` must be `POST`.", "method", number)
    if item.get("url") != endpoint:
        return _error("invalid_url", f"`url` must be the batch's endpoint, `{endpoint}`.", "url", number)
    body = item.get("body")
    if not isinstance(body, dict):
        return _error("invalid_body", "`body` must be a JSON object (the request).", "body", number)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return _error("missing_model", "`body.model` must be a non-empty string.", "body.model", number)
    if body.get("stream") is True:
        return _error(
            "stream_not_supported", "Batch requests cannot stream: drop `stream`.", "body.stream", number
        )
    refusal = check_model(model, body)
    if isinstance(refusal, tuple):
        return _error(refusal[0], refusal[1], "body.model", number)
    if refusal is not None:
        return _error("model_not_allowed", refusal, "body.model", number)
    return None


async def validate_batch_input(
    files: Files,
    file_id: str,
    endpoint: str,
    check_model: ModelCheck,
    max_lines: int,
    max_line_bytes: int | None = None,
    heartbeat: Callable[[], Awaitable[None]] | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """Check every line of ``file_id`` as a request to ``endpoint`` (``/v1/chat/completions``...).

    ``check_model(model, body)`` returns why the submitter may not have the line run (a
    message, or ``(code, message)``), or ``None``; it is called once per line, with the
    line's ``body`` so that the model its task route and aliases resolve to is the one
    checked. Returns ``(request lines, errors)``: the number of non-blank lines and OpenAI
    batch errors ``{"code", "message", "param", "line"}`` (one per invalid line, the first
    problem found; the first :data:`MAX_REPORTED_ERRORS`, then one ``too_many_errors`` counting
    the rest; ``line`` is ``None`` for that one and for
    ``empty_file``). The batch is valid iff ``errors`` is empty. More than ``max_lines``
    request lines: one ``too_many_lines`` error and the count stops there. A line longer
    than ``max_line_bytes`` (the largest request body, ``server.max_body_bytes``) is
    ``line_too_large``. ``heartbeat`` is awaited every 1,000 lines (the caller tells other
    replicas it is still validating).

    Memory: the file streams, at most ``max_line_bytes`` (+ 1) of a line held; the
    ``custom_id`` set holds at most ``max_lines`` strings (50,000 ids of ~40 bytes are about
    5 MB with set overhead). Ownership of ``file_id`` is
    the caller's to check (:meth:`Files.get`). Raises ``FileNotFoundError`` when the file's
    bytes are gone.
    """
    seen: set[str] = set()
    errors: list[dict[str, Any]] = []
    unlisted = 0  # invalid lines past MAX_REPORTED_ERRORS
    count = 0
    async for number, raw in files.lines(file_id, max_line_bytes):
        count += 1
        if count > max_lines:
            errors.append(
                _error("too_many_lines", f"A batch may have at most {max_lines} requests.", None, number)
            )
            count -= 1
            break
        if heartbeat is not None and count % 1000 == 0:
            await heartbeat()
        error = _check_line(number, raw, endpoint, check_model, seen, max_line_bytes)
        if error is not None:
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(error)
            else:
                unlisted += 1
    if unlisted:  # said, so that a client fixing the listed lines knows it is not done
        errors.append(
            _error(
                "too_many_errors",
                f"{unlisted} more lines have errors; only the first {MAX_REPORTED_ERRORS} are listed.",
                None,
                None,
            )
        )
    if count == 0 and not errors:
        errors.append(_error("empty_file", "The input file has no requests.", None, None))
    return count, errors


async def iter_batch_requests(files: Files, file_id: str) -> AsyncIterator[tuple[int, str, dict[str, Any]]]:
    """``(line number, custom_id, body)`` of each request of a file :func:`validate_batch_input`
    accepted, in file order, streamed. Raises ``InvalidRequest`` on a line that is not a
    request (the file was not validated) and ``FileNotFoundError`` when its bytes are gone."""
    async for number, raw in files.lines(file_id):
        try:
            item = orjson.loads(raw)
        except orjson.JSONDecodeError:
            item = None
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("custom_id"), str)
            or not isinstance(item.get("body"), dict)
        ):
            raise InvalidRequest(
                f"Line {number} of `{file_id}` is not a batch request.", param="input_file_id"
            )
        yield number, item["custom_id"], item["body"]
