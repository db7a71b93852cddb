"""The Files API over real HTTP: a uvicorn process (tests/files_server.py, the gateway's own
listener) on a free loopback port, real Redis, a local file store, the official OpenAI SDK.

Two servers: ``small`` (``max_file_bytes`` 1 MiB, for the limit tests) and ``big`` (the default
200 MiB, for the memory test: a 200 MiB upload and download must not grow the server's memory
with the file's size).
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis

from tests.procs import Proc, free_port, python_m, wait_http

KEY_ALICE = "sk-files-alice-" + secrets.token_hex(8)
KEY_BOB = "sk-files-bob-" + secrets.token_hex(8)  # same team, another subject
KEY_ALICE_T2 = "sk-files-alice2-" + secrets.token_hex(8)  # same subject, another team
MIB = 1024 * 1024


class FilesServer:
    def __init__(self, tmp: Path, **jobs: Any) -> None:
        self.prefix = f"test:files-api:{secrets.token_hex(6)}:"
        self.store = tmp / "store"
        self.store.mkdir()
        self.port = free_port()
        settings = {
            "auth": {
                "api_keys": [
                    {"key": KEY_ALICE, "subject": "alice", "team": "t1"},
                    {"key": KEY_BOB, "subject": "bob", "team": "t1"},
                    {"key": KEY_ALICE_T2, "subject": "alice", "team": "t2"},
                ]
            },
            "jobs": {"key_prefix": self.prefix, "files": f"file://{self.store}", **jobs},
        }
        self.proc = Proc(
            [*python_m("tests.files_server"), str(self.port), orjson.dumps(settings).decode()], name="files"
        )
        wait_http(f"{self.url}/v1/files", self.proc, status=401)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str = KEY_ALICE) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def memory(self, field: str) -> int:
        """VmRSS / VmHWM of the server process, in bytes."""
        for row in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if row.startswith(field + ":"):
                return int(row.split()[1]) * 1024
        raise AssertionError(f"{field} not in /proc/{self.proc.pid}/status")

    def stop(self) -> None:
        self.proc.stop()
        r = redis.Redis(host="127.0.0.1", port=6379)
        for key in r.scan_iter(match=self.prefix + "*"):
            r.delete(key)
        r.close()


def require_redis() -> None:
    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.fail(f"needs Redis at 127.0.0.1:6379 ({type(exc).__name__}: {exc})")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FilesServer]:
    require_redis()
    server = FilesServer(tmp_path_factory.mktemp("small"), max_file_bytes=MIB, max_file_lines=100)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FilesServer]:
    require_redis()
    server = FilesServer(tmp_path_factory.mktemp("big"))
    yield server
    server.stop()


def batch_jsonl(n: int) -> bytes:
    return b"".join(
        orjson.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
            }
        )
        + b"\n"
        for i in range(n)
    )


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


# ---------------------------------------------------------------- the SDK flow


def test_sdk_upload_list_retrieve_content_delete(small: FilesServer) -> None:
    client = small.client()
    data = batch_jsonl(3)
    created = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    assert created.id.startswith("file-")
    assert (created.object, created.bytes, created.filename, created.purpose, created.status) == (
        "file",
        len(data),
        "in.jsonl",
        "batch",
        "processed",
    )
    assert created.expires_at == created.created_at + 7 * 86400
    assert client.files.retrieve(created.id) == created
    assert client.files.content(created.id).read() == data
    assert [f.id for f in client.files.list(purpose="batch")] == [created.id]
    assert list(client.files.list(purpose="user_data")) == []
    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    assert not list(small.store.iterdir())


def test_sdk_expires_after(small: FilesServer) -> None:
    created = small.client().files.create(
        file=("x.jsonl", io.BytesIO(b"hello\n")),
        purpose="user_data",
        expires_after={"anchor": "created_at", "seconds": 7200},
    )
    assert created.expires_at == created.created_at + 7200


def test_sdk_pagination(small: FilesServer) -> None:
    client = small.client(KEY_ALICE_T2)  # a principal with no other files in this module
    ids = [
        client.files.create(file=(f"{i}.jsonl", io.BytesIO(b"{}\n")), purpose="user_data").id
        for i in range(5)
    ]
    page = client.files.list(limit=2, order="asc")
    assert [f.id for f in page.data] == ids[:2] and page.has_more
    assert [f.id for f in client.files.list(limit=2, order="asc")] == ids  # the SDK follows `after`
    assert [f.id for f in client.files.list(limit=3)] == ids[::-1]
    for i in ids:
        client.files.delete(i)


def test_other_principals_get_404_everywhere(small: FilesServer) -> None:
    mine = small.client().files.create(file=("in.jsonl", io.BytesIO(batch_jsonl(1))), purpose="batch")
    for key in (KEY_BOB, KEY_ALICE_T2):
        other = small.client(key)
        for call in (other.files.retrieve, other.files.content, other.files.delete):
            with pytest.raises(openai.NotFoundError) as info:
                call(mine.id)
            err = error_of(info.value)
            assert err["type"] == "invalid_request_error"
            assert err["message"] == f"No such File object: {mine.id}"
        assert mine.id not in [f.id for f in other.files.list()]
    # the same answer as a file that never existed
    with pytest.raises(openai.NotFoundError) as info:
        small.client(KEY_BOB).files.retrieve("file-" + "0" * 24)
    assert error_of(info.value)["message"] == f"No such File object: file-{'0' * 24}"
    assert small.client().files.retrieve(mine.id).id == mine.id


def test_unauthenticated_is_401(small: FilesServer) -> None:
    with pytest.raises(openai.AuthenticationError):
        small.client("sk-wrong").files.list()
    r = httpx.post(small.url + "/v1/files", files={"file": ("a", b"x")}, data={"purpose": "batch"})
    assert r.status_code == 401


# ---------------------------------------------------------------- refusals


def test_too_large_upload_is_413(small: FilesServer) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        small.client().files.create(file=("big.bin", io.BytesIO(b"x" * (2 * MIB))), purpose="user_data")
    assert info.value.status_code == 413
    err = error_of(info.value)
    assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", "request_too_large", "file")


def test_too_large_chunked_upload_is_413_while_streaming(small: FilesServer) -> None:
    boundary = "b0undary"
    files_before = set(small.store.iterdir())

    def body() -> Iterator[bytes]:  # no Content-Length: the limit is found while reading
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'.encode()
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'.encode()
        for _ in range(3):
            yield b"x" * (MIB // 2)
        yield f"\r\n--{boundary}--\r\n".encode()

    r = httpx.post(
        small.url + "/v1/files",
        content=body(),
        headers={
            "authorization": f"Bearer {KEY_ALICE}",
            "content-type": f"multipart/form-data; boundary={boundary}",
        },
    )
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    assert set(small.store.iterdir()) == files_before


@pytest.mark.parametrize(
    ("purpose", "content", "param", "code"),
    [
        ("fine-tune", b"{}\n", "purpose", "invalid_request"),
        ("batch_output", b"{}\n", "purpose", "invalid_request"),
        ("batch", b'{"a": "\xff"}\n', "file", "invalid_file"),
        ("batch", b"{}\n" * 101, "file", "too_many_lines"),
    ],
)
def test_bad_uploads_are_400(small: FilesServer, purpose: str, content: bytes, param: str, code: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        small.client().files.create(file=("f.jsonl", io.BytesIO(content)), purpose=purpose)  # type: ignore[arg-type]
    err = error_of(info.value)
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, code)


def multipart(*parts: tuple[str, str | None, bytes], boundary: str = "zz") -> tuple[bytes, str]:
    body = b""
    for name, filename, content in parts:
        fn = f'; filename="{filename}"' if filename is not None else ""
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{fn}\r\n\r\n'.encode()
        body += content + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_file_before_purpose(small: FilesServer) -> None:
    auth = {"authorization": f"Bearer {KEY_ALICE}"}
    body, ctype = multipart(("file", "a.jsonl", b"{}\n"), ("purpose", None, b"batch"))
    r = httpx.post(small.url + "/v1/files", content=body, headers={**auth, "content-type": ctype})
    assert r.status_code == 200, r.text
    assert (r.json()["purpose"], r.json()["bytes"]) == ("batch", 3)
    # the batch checks still apply, once the purpose is known; the bytes are not kept
    files_before = set(small.store.iterdir())
    body, ctype = multipart(("file", "a.jsonl", b"\xff\n"), ("purpose", None, b"batch"))
    r = httpx.post(small.url + "/v1/files", content=body, headers={**auth, "content-type": ctype})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_file")
    body, ctype = multipart(("file", "a.jsonl", b"{}\n"), ("purpose", None, b"fine-tune"))
    r = httpx.post(small.url + "/v1/files", content=body, headers={**auth, "content-type": ctype})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "purpose")
    body, ctype = multipart(("file", "a.jsonl", b"{}\n"))
    r = httpx.post(small.url + "/v1/files", content=body, headers={**auth, "content-type": ctype})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "purpose")
    assert set(small.store.iterdir()) == files_before


def test_form_shape_errors_are_400(small: FilesServer) -> None:
    auth = {"authorization": f"Bearer {KEY_ALICE}"}
    r = httpx.post(
        small.url + "/v1/files", data={"purpose": "batch"}, files={"other": ("a", b"x")}, headers=auth
    )
    assert (r.status_code, r.json()["error"]["param"]) == (400, "file")
    r = httpx.post(small.url + "/v1/files", json={"purpose": "batch"}, headers=auth)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(small.url + "/v1/files?limit=0", headers=auth)
    assert (r.status_code, r.json()["error"]["param"]) == (400, "limit")
    r = httpx.get(small.url + "/v1/files?order=up", headers=auth)
    assert (r.status_code, r.json()["error"]["param"]) == (400, "order")


# ---------------------------------------------------------------- memory


def test_200_mib_upload_and_download_keep_server_memory_flat(big: FilesServer, tmp_path: Path) -> None:
    # 50,000 lines (the batch maximum) of 4194 bytes: 209,700,000 bytes, just under 200 MiB
    line = orjson.dumps(
        {
            "custom_id": "x",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": [{"role": "user", "content": ""}]},
        }
    )
    pad = 4194 - 1 - len(line)  # content characters that make a line of 4194 bytes with its newline
    path = tmp_path / "big.jsonl"
    with path.open("wb") as f:
        for i in range(50_000):
            f.write(
                line.replace(b'"0000000"', b'"%07d"' % i).replace(
                    b'"content":""', b'"content":"' + b"a" * pad + b'"'
                )
            )
            f.write(b"\n")
    size = path.stat().st_size
    assert size == 50_000 * 4194 <= 200 * MIB

    client = big.client()
    client.files.create(file=("warm.jsonl", io.BytesIO(batch_jsonl(2))), purpose="batch")  # imports, pools
    before = big.memory("VmRSS")
    with path.open("rb") as f:
        created = client.files.create(file=("big.jsonl", f), purpose="batch")
    assert created.bytes == size
    after_upload = big.memory("VmHWM")

    received = 0
    with httpx.stream(
        "GET", f"{big.url}/v1/files/{created.id}/content", headers={"authorization": f"Bearer {KEY_ALICE}"}
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-length"] == str(size)
        for chunk in r.iter_raw():
            received += len(chunk)
    assert received == size
    after_download = big.memory("VmHWM")
    print(
        f"server RSS before {before / MIB:.1f} MiB; peak after upload {after_upload / MIB:.1f} MiB, "
        f"after download {after_download / MIB:.1f} MiB"
    )
    assert after_upload - before < 64 * MIB
    assert after_download - before < 64 * MIB
    client.files.delete(created.id)


def test_client_gone_mid_upload_keeps_nothing(small: FilesServer) -> None:
    import socket
    import time

    files_before = set(small.store.iterdir())
    boundary = "cut"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
    ).encode()
    with socket.create_connection(("127.0.0.1", small.port)) as sock:
        sock.sendall(
            b"POST /v1/files HTTP/1.1\r\nhost: x\r\n"
            + f"authorization: Bearer {KEY_ALICE}\r\n".encode()
            + f"content-type: multipart/form-data; boundary={boundary}\r\n".encode()
            + b"content-length: 900000\r\n\r\n"
            + head
            + b"x" * 300_000
        )
        # the server is inside the upload once its temporary file appears
        deadline = time.monotonic() + 10
        while not [p for p in small.store.iterdir() if p.name.startswith(".tmp")]:
            assert time.monotonic() < deadline, "the upload never started writing"
            time.sleep(0.01)
    deadline = time.monotonic() + 10
    while set(small.store.iterdir()) != files_before:
        assert time.monotonic() < deadline, f"left behind: {set(small.store.iterdir()) - files_before}"
        time.sleep(0.01)
    assert small.proc.alive()
    assert small.client().files.list().data is not None


# ---------------------------------------------------------------- form parts


def test_a_form_of_many_parts_is_refused_naming_the_limit(small: FilesServer) -> None:
    """Only the fields the Files API defines are kept, and a form has at most 16 parts: before,
    every other field was kept in a dict, as many as the body held (a 150 MB form of tiny fields
    grew the server by some 200 MB that stayed)."""
    auth = {"authorization": f"Bearer {KEY_ALICE}"}
    files_before = set(small.store.iterdir())
    extra = [(f"f{i}", None, b"x") for i in range(100)]
    body, ctype = multipart(("purpose", None, b"batch"), *extra, ("file", "a.jsonl", b"{}\n"))
    r = httpx.post(small.url + "/v1/files", content=body, headers={**auth, "content-type": ctype})
    assert r.status_code == 400, r.text  # before: 200, the 100 fields kept until the end
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("invalid_request_error", "too_many_parts"), err
    assert "16 parts" in err["message"], err
    assert set(small.store.iterdir()) == files_before
    # The SDK's fields, and a field the API does not define (ignored), make a file.
    body, ctype = multipart(
        ("purpose", None, b"batch"),
        ("expires_after[anchor]", None, b"created_at"),
        ("expires_after[seconds]", None, b"3600"),
        ("note", None, b"ignored"),
        ("file", "a.jsonl", b"{}\n"),
    )
    r = httpx.post(small.url + "/v1/files", content=body, headers={**auth, "content-type": ctype})
    assert r.status_code == 200, r.text
    assert r.json()["expires_at"] == r.json()["created_at"] + 3600
    small.client().files.delete(r.json()["id"])


def test_a_flood_of_tiny_form_fields_does_not_grow_server_memory(big: FilesServer) -> None:
    boundary = "flood"
    fields = 300_000  # about 22 MB of `name="f<N>"` parts, each with the value `x`

    def body() -> Iterator[bytes]:
        chunk = []
        for i in range(fields):
            chunk.append(f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n')
            if len(chunk) == 1000:
                yield "".join(chunk).encode()
                chunk = []
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nx\r\n'
            f"--{boundary}--\r\n"
        ).encode()

    big.client().files.list()  # imports and pools warm
    before = big.memory("VmRSS")
    try:
        r = httpx.post(
            big.url + "/v1/files",
            content=body(),
            headers={
                "authorization": f"Bearer {KEY_ALICE}",
                "content-type": f"multipart/form-data; boundary={boundary}",
            },
            timeout=60,
        )
        status = r.status_code
    except httpx.TransportError:
        status = 0  # refused before the body was all sent: the server closed the connection
    after = big.memory("VmRSS")
    print(f"server RSS before {before / MIB:.1f} MiB, after {after / MIB:.1f} MiB (status {status})")
    assert status in (0, 400), status  # before: 200, with every field held until the end
    assert after - before < 8 * MIB, (before, after)
    auth = {"authorization": f"Bearer {KEY_ALICE}"}
    assert httpx.get(big.url + "/v1/files", headers=auth).status_code == 200  # still serving
