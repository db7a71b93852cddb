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
        ("/v1/files", {"GET", "POST"}),
        ("/v1/files/file-x", {"GET", "DELETE"}),
        ("/v1/batches", {"GET", "POST"}),
        ("/v1/jobs/job_x", {"GET", "DELETE"}),
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
    for path in ("/live", "/ready", "/health", "/metrics", "/v1/models", "/v1/models/tiny"):
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


def test_a_request_larger_than_the_budget_is_refused_with_the_storage_down(sim: Sim, tmp_path: Path) -> None:
    """With the limit storage unreachable and `on_storage_error: open`, a request that no wait
    could ever let through was served: the configuration alone refuses it."""
    key = "sk-small-" + "s" * 24
    cfg = {
        "backends": [{"url": sim.url}],
        "auth": {"api_keys": [{"key": key, "subject": "small", "tier": "small"}]},
        "tiers": {"small": {"tokens_per_minute": 100}},
        "rate_limits": {"storage": f"redis://127.0.0.1:{free_port()}/0", "storage_timeout": 0.2},
    }
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    g = Gateway([], config=path)
    try:
        auth = {"authorization": f"Bearer {key}"}
        small = httpx.post(g.v1 + "/chat/completions", json=BODY, headers=auth, timeout=30)
        assert small.status_code == 200, small.text  # served, unchecked: the storage is down
        huge = httpx.post(
            g.v1 + "/chat/completions", json={**BODY, "max_tokens": 500}, headers=auth, timeout=30
        )
        assert huge.status_code == 429, huge.text
        assert huge.json()["error"]["code"] == "tokens_exceed_limit"
        assert huge.headers["x-should-retry"] == "false" and "retry-after" not in huge.headers
    finally:
        g.stop()
