"""Faults a fourth adversarial review found in the request path, each through a real gateway:

* repeated Content-Encoding headers: the gateway read the first copy while a proxy in front
  combines them (RFC 9110 §5.3), so the two disagreed about the body;
* two Content-Type headers in local mode: the last copy passed the JSON-only check;
* a 405's `Allow` named the methods of one route of the path, not every method it serves.
"""

from __future__ import annotations

import gzip
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from tests.jobs_helpers import ALICE, jobs_config
from tests.procs import Gateway, Sim, free_port

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    s = Sim(None, "--ttft", "0.005", "--itl", "0.001")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gw(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    path, _ = jobs_config(tmp_path_factory.mktemp("r4"))
    g = Gateway([sim.url], config=path)
    yield g
    g.stop()


def raw(port: int, head: bytes, body: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def test_repeated_content_encoding_headers_are_read_as_one_list(gw: Gateway) -> None:
    packed = gzip.compress(orjson.dumps(BODY))
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"authorization: Bearer " + ALICE.encode() + b"\r\ncontent-type: application/json\r\n"
    )
    # identity, then gzip: the body is gzip (a proxy combining the lines decodes it so)
    status, body = raw(gw.port, head + b"content-encoding: identity\r\ncontent-encoding: gzip\r\n", packed)
    assert status == 200, body
    assert orjson.loads(body)["object"] == "chat.completion"
    # two real codings are not supported: 415, not a guess at one of them
    twice = gzip.compress(packed)
    status, body = raw(gw.port, head + b"content-encoding: gzip\r\ncontent-encoding: gzip\r\n", twice)
    assert status == 415, body
    assert orjson.loads(body)["error"]["type"] == "invalid_request_error"


def test_a_405_allows_every_method_the_path_serves(gw: Gateway) -> None:
    auth = {"authorization": f"Bearer {ALICE}"}
    for path, allowed in (
        ("/v1/files", {"GET", "HEAD", "POST"}),
        ("/v1/files/file-x", {"GET", "HEAD", "DELETE"}),
        ("/v1/batches", {"GET", "HEAD", "POST"}),
        ("/v1/jobs/job_x", {"GET", "HEAD", "DELETE"}),
    ):
        r = httpx.request("PUT", gw.url + path, headers=auth, timeout=10)
        assert r.status_code == 405, (path, r.text)
        assert set(r.headers["allow"].replace(" ", "").split(",")) == allowed, (path, r.headers["allow"])
        assert r.json()["error"]["code"] == "method_not_allowed"


def test_two_content_types_are_refused_in_local_mode(sim: Sim, tmp_path: Path) -> None:
    g = Gateway([sim.url])  # no auth, loopback: local mode
    try:
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            b"content-type: text/plain\r\ncontent-type: application/json\r\n"
        )
        status, body = raw(g.port, head, orjson.dumps(BODY))
        assert status == 400, body
        assert orjson.loads(body)["error"]["type"] == "invalid_request_error"
    finally:
        g.stop()


def test_head_is_served_wherever_get_is(gw: Gateway) -> None:
    """RFC 9110 §9.1: HEAD /v1/models was a 405 (a load balancer's HEAD probe of /ready too)."""
    auth = {"authorization": f"Bearer {ALICE}"}
    for path in (
        "/live",
        "/ready",
        "/health",
        "/metrics",
        "/v1/models",
        "/v1/models/tiny",
        "/v1/files",
        "/v1/batches",
    ):
        got, head = (
            httpx.get(gw.url + path, headers=auth, timeout=10),
            httpx.head(gw.url + path, headers=auth, timeout=10),
        )
        assert (head.status_code, got.status_code) == (200, 200), path
        assert head.content == b"", path
        assert head.headers["content-type"] == got.headers["content-type"], path


def test_repeated_content_encoding_headers_on_the_jobs_endpoints(gw: Gateway) -> None:
    """The upload and the batch creation read the first Content-Encoding too: `identity` then
    `gzip` passed an upload as plain (a proxy in front would call it gzip)."""
    head = b"POST /v1/files HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer " + ALICE.encode() + b"\r\n"
    form = (
        b'--b\r\ncontent-disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--b\r\ncontent-disposition: form-data; name="file"; filename="in.jsonl"\r\n\r\n{}\n\r\n--b--\r\n'
    )
    head += b"content-type: multipart/form-data; boundary=b\r\n"
    head += b"content-encoding: identity\r\ncontent-encoding: gzip\r\n"
    status, body = raw(gw.port, head, form)
    assert status == 415, body


SMALL_KEY = "sk-small-" + "s" * 24  # tier `small`


def small_tier_gateway(sim: Sim, tmp_path: Path, small: dict[str, int], **extra: Any) -> Gateway:
    """A gateway whose one API key (SMALL_KEY) has tier `small` with the ``small`` limits."""
    cfg = {
        "backends": [{"url": sim.url}],
        "auth": {"api_keys": [{"key": SMALL_KEY, "subject": "small", "tier": "small"}]},
        "tiers": {"small": small},
        **extra,
    }
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Gateway([], config=path)


def chat(g: Gateway, max_tokens: int = 2) -> httpx.Response:
    auth = {"authorization": f"Bearer {SMALL_KEY}"}
    return httpx.post(
        g.v1 + "/chat/completions", json={**BODY, "max_tokens": max_tokens}, headers=auth, timeout=30
    )


def assert_final_refusal(r: httpx.Response) -> None:
    """429 tokens_exceed_limit that no client retries: no Retry-After, x-should-retry false."""
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "tokens_exceed_limit"
    assert r.headers["x-should-retry"] == "false" and "retry-after" not in r.headers


def test_a_request_larger_than_the_budget_is_refused_with_the_storage_down(sim: Sim, tmp_path: Path) -> None:
    """With the limit storage unreachable and `on_storage_error: open`, a request that no wait
    could ever let through was served: the configuration alone refuses it."""
    storage = {"storage": f"redis://127.0.0.1:{free_port()}/0", "storage_timeout": 0.2}
    g = small_tier_gateway(sim, tmp_path, {"tokens_per_minute": 100}, rate_limits=storage)
    try:
        small = chat(g)
        assert small.status_code == 200, small.text  # served, unchecked: the storage is down
        assert_final_refusal(chat(g, max_tokens=500))
    finally:
        g.stop()


def test_a_request_that_never_fits_is_final_even_behind_a_full_request_counter(
    sim: Sim, tmp_path: Path
) -> None:
    """With the requests-per-minute counter full, a request larger than the whole token budget
    got the ordinary 429 with `Retry-After: 60`, after which it could only meet the final one."""
    g = small_tier_gateway(sim, tmp_path, {"requests_per_minute": 2, "tokens_per_minute": 100})
    try:
        for _ in range(2):
            assert chat(g).status_code == 200
        full = chat(g)
        assert full.status_code == 429 and full.json()["error"]["code"] == "rate_limit_exceeded"
        assert_final_refusal(chat(g, max_tokens=500))
    finally:
        g.stop()


def test_list_limits_that_are_not_ascii_digits_are_400(gw: Gateway) -> None:
    """`limit=²` passed `str.isdigit()` and `int()` refused it; 5,000 digits passed too and
    `int()` refused more than 4,300: both were a plain-text 500."""
    auth = {"authorization": f"Bearer {ALICE}"}
    for path in ("/v1/files", "/v1/batches"):
        for limit in ("%C2%B2", "1" * 5000, "-1", "1.0"):
            r = httpx.get(f"{gw.url}{path}?limit={limit}", headers=auth, timeout=10)
            assert r.status_code == 400, (path, limit[:10], r.text[:200])
            assert r.json()["error"]["param"] == "limit"


def test_a_credential_is_trimmed_of_http_whitespace_only(gw: Gateway) -> None:
    """NBSP and NEL were trimmed from a credential (Python's str.strip): a proxy in front that
    matches keys exactly saw another credential than the gateway served."""
    for value in (b"Bearer " + ALICE.encode() + b"\xa0", b"Bearer \x85" + ALICE.encode()):
        head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        status, body = raw(gw.port, head + b"authorization: " + value + b"\r\n", orjson.dumps(BODY))
        assert status == 401, body
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    status, body = raw(
        gw.port, head + b"authorization: Bearer " + ALICE.encode() + b" \t\r\n", orjson.dumps(BODY)
    )
    assert status == 200, body
