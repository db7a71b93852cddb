"""Backend error bodies → OpenAI's error object, checked against OpenAI's OpenAPI ``ErrorResponse``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from gateway import errors
from gateway.breaker import BreakerOpen
from gateway.pipeline import admit, limit
from gateway.pipeline.backend_errors import OPENAI_TYPES, parse, type_for_status
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.relay import upstream_failure

FIXTURES = Path(__file__).parent.parent / "fixtures"
SCHEMA = json.loads((FIXTURES / "openai-openapi" / "error_response.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def assert_openai_error(body: bytes) -> dict[str, Any]:
    parsed = orjson.loads(body)
    VALIDATOR.validate(parsed)
    err: dict[str, Any] = parsed["error"]
    assert list(err) == ["message", "type", "param", "code"]
    assert err["type"] in OPENAI_TYPES
    return err


def vllm_fixture(name: str) -> tuple[int, bytes]:
    body, status = (FIXTURES / "vllm-0.32.0-cpu" / name).read_bytes().rstrip(b"\n").rsplit(b"\n", 1)
    return int(status), body


def test_the_schema_rejects_vllms_own_bodies() -> None:
    # The reason for all this: vLLM's integer code is not OpenAI's string-or-null.
    _, body = vllm_fixture("err_max_tokens.json")
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate(orjson.loads(body))


@pytest.mark.parametrize(
    ("name", "type_", "param", "code"),
    [
        ("err_max_tokens.json", "invalid_request_error", "max_tokens", None),
        ("err_prompt_too_long.json", "invalid_request_error", "input_tokens", "context_length_exceeded"),
        ("err_stream_options.json", "invalid_request_error", "stream_options", None),
        ("err_bad_json.json", "invalid_request_error", "body.1", None),
        ("err_bad_messages.json", "invalid_request_error", "body.messages", None),
        ("err_unknown_model.json", "not_found_error", "model", "model_not_found"),
    ],
)
def test_recorded_vllm_errors_keep_message_and_param_with_openai_type_and_code(
    name: str, type_: str, param: str, code: str | None
) -> None:
    status, body = vllm_fixture(name)
    ex = Exchange("r", "chat", 0.0)
    got_status, out = upstream_failure(ex, status, body)
    assert got_status == status
    err = assert_openai_error(out)
    assert err["message"] == orjson.loads(body)["error"]["message"]
    assert (err["type"], err["param"], err["code"]) == (type_, param, code)
    assert ex.reason == "upstream_client_error"


@pytest.mark.parametrize(
    ("status", "type_"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (409, "invalid_request_error"),
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "server_error"),
        (503, "server_error"),
    ],
)
def test_type_follows_the_status(status: int, type_: str) -> None:
    assert type_for_status(status) == type_
    err = parse(
        status,
        b'{"error":{"message":"m","type":"SomeException","param":null,"code":' + str(status).encode() + b"}}",
    )
    assert (err.message, err.type, err.code) == ("m", type_, None)


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        (b'{"detail":"Not Found"}', "Not Found", None),  # FastAPI (vLLM's unmounted routes)
        (
            b'{"detail":[{"loc":["body","messages",0],"msg":"Field required","type":"missing"}]}',
            "Field required",
            "messages.0",
        ),
        (b'{"error":"Unauthorized"}', "Unauthorized", None),  # vLLM's --api-key check
        (
            b'{"type":"error","error":{"type":"not_found_error","message":"model: x"}}',
            "model: x",
            None,
        ),  # Anthropic
        (b'{"message":"quota"}', "quota", None),
        (b"<html><body>502 Bad Gateway</body></html>", None, None),
        (b"", None, None),
        (b"[1, 2]", None, None),
    ],
)
def test_every_body_shape_becomes_an_openai_error(
    body: bytes, message: str | None, param: str | None
) -> None:
    err = parse(404, body)
    assert (err.message, err.param, err.type) == (message, param, "not_found_error")
    status, out = upstream_failure(Exchange("r", "chat", 0.0), 404, body)
    assert status == 404
    rendered = assert_openai_error(out)
    assert rendered["message"] == (message or "The backend answered 404.")


def test_an_openai_provider_error_keeps_its_own_type_and_code() -> None:
    body = b'{"error":{"message":"slow down","type":"tokens","param":null,"code":"rate_limit_exceeded"}}'
    err = assert_openai_error(upstream_failure(Exchange("r", "chat", 0.0), 429, body)[1])
    assert (err["type"], err["code"]) == ("tokens", "rate_limit_exceeded")


def test_a_backend_5xx_is_a_502_server_error_with_the_gateways_code() -> None:
    ex = Exchange("r", "chat", 0.0)
    status, out = upstream_failure(
        ex, 500, b'{"error":{"message":"boom","type":"InternalServerError","param":null,"code":500}}'
    )
    assert status == 502
    err = assert_openai_error(out)
    assert (err["type"], err["code"], err["message"]) == (
        "server_error",
        "upstream_error",
        "The backend failed (500): boom",
    )
    assert ex.reason == "upstream_error"


def _all_gateway_errors() -> list[type[errors.GatewayError]]:
    seen: list[type[errors.GatewayError]] = []
    todo: list[type[errors.GatewayError]] = [errors.GatewayError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


def test_every_gateway_error_class_uses_an_openai_type_and_a_string_code() -> None:
    classes = _all_gateway_errors()
    for expected in (BreakerOpen, admit.QueueTimeout, limit.LimitStorageDown, errors.UpstreamTimeout):
        assert expected in classes
    for cls in classes:
        err = assert_openai_error(cls("Something went wrong.").body())
        assert isinstance(err["code"], str), cls
        assert err["type"] == ("server_error" if cls.status >= 500 else err["type"]), cls
        if cls.status < 500:
            assert err["type"] != "server_error", cls


def test_sse_error_event_carries_an_openai_error() -> None:
    event = errors.sse_error_event(errors.UpstreamError("The backend failed.", code="stream_truncated"))
    first, done, rest = event.split(b"\n\n")
    assert first.startswith(b"data: ") and done == b"data: [DONE]" and rest == b""
    assert assert_openai_error(first[6:])["code"] == "stream_truncated"
