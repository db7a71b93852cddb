"""Request bodies with a Content-Encoding, through a real gateway and simulator.

gzip and deflate are decoded (the body limit applies to the decoded size, and decoding stops
as soon as it passes it); any other coding is a 415 that names it, never ignored.
"""

from __future__ import annotations

import gzip
import zlib

import httpx
import orjson
import pytest

from tests.procs import Gateway

CHAT = orjson.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
LIMIT = 4 * 1024 * 1024  # server.max_body_bytes' default


def post(gateway: Gateway, path: str, content: bytes, encoding: str) -> httpx.Response:
    headers = {"content-type": "application/json", "content-encoding": encoding}
    return httpx.post(gateway.v1 + path, content=content, headers=headers, timeout=30)


def assert_error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    return str(err["message"])


def test_gzip_chat_body_is_served(gateway: Gateway) -> None:
    """The reported input: a gzip-compressed chat body was a 400 `invalid_json`."""
    r = post(gateway, "/chat/completions", gzip.compress(CHAT), "gzip")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]


def test_gzip_stream_is_served(gateway: Gateway) -> None:
    body = orjson.dumps({**orjson.loads(CHAT), "stream": True})
    r = post(gateway, "/chat/completions", gzip.compress(body), "gzip")
    assert r.status_code == 200, r.text
    assert r.text.rstrip().endswith("data: [DONE]")


def test_deflate_completions_and_gzip_embeddings_are_served(gateway: Gateway) -> None:
    completion = orjson.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 3})
    r = post(gateway, "/completions", zlib.compress(completion), "deflate")
    assert r.status_code == 200, r.text
    embedding = orjson.dumps({"model": "embed-small", "input": "hello"})
    r = post(gateway, "/embeddings", gzip.compress(embedding), "gzip")
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["embedding"]


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, br", "made-up"])
def test_other_codings_are_415_naming_the_coding(gateway: Gateway, coding: str) -> None:
    r = post(gateway, "/chat/completions", CHAT, coding)
    message = assert_error(r, 415, "unsupported_media_type")
    assert coding in message
    assert r.headers["accept-encoding"] == "gzip, deflate"


def test_a_decompression_bomb_is_413(gateway: Gateway) -> None:
    bomb = gzip.compress(b" " * (16 * LIMIT))  # 64 MiB of JSON whitespace in ~64 KiB
    assert len(bomb) < LIMIT
    assert_error(post(gateway, "/chat/completions", bomb, "gzip"), 413, "request_too_large")
    r = post(gateway, "/chat/completions", gzip.compress(CHAT), "gzip")
    assert r.status_code == 200  # the gateway is fine afterwards


def test_a_corrupt_gzip_body_is_400(gateway: Gateway) -> None:
    assert_error(
        post(gateway, "/chat/completions", gzip.compress(CHAT)[:-8], "gzip"), 400, "invalid_encoding"
    )
    assert_error(post(gateway, "/chat/completions", CHAT, "gzip"), 400, "invalid_encoding")
