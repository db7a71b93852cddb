"""The S3 file store against a real S3-compatible server process (moto's server) on loopback.

The store is configured as in production: the standard AWS chain for credentials (here the
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` variables) and ``AWS_ENDPOINT_URL`` for the
endpoint; requests go through the real aiobotocore client over real sockets.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import boto3
import pytest
import redis.asyncio as aioredis

from gateway.jobs.config import JobsSettings
from gateway.jobs.files import Files
from gateway.jobs.filestore import S3_PART_BYTES, S3FileStore, open_store
from tests.procs import Proc, free_port, python_m, wait_http

MIB = 1024 * 1024
BUCKET = "gateway-files"


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    port = free_port()
    proc = Proc([*python_m("moto.server"), "-H", "127.0.0.1", "-p", str(port)], name="moto")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/moto-api/", proc, status=None)
        yield url
    finally:
        proc.stop()


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for name, value in {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    client = boto3.client("s3")
    if BUCKET not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=BUCKET)
    yield client


@pytest.fixture
async def store(s3_env: Any) -> AsyncIterator[S3FileStore]:
    s = open_store(f"s3://{BUCKET}/run-{secrets.token_hex(4)}/files")
    assert isinstance(s, S3FileStore)
    yield s
    await s.close()


async def chunks_of(data: bytes, size: int = 1 << 20) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def read_all(store: S3FileStore, key: str, chunk_size: int = 65536) -> bytes:
    return b"".join([c async for c in store.read(key, chunk_size)])


def keys(client: Any, prefix: str) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


async def test_small_write_read_delete_under_prefix(store: S3FileStore, s3_env: Any) -> None:
    assert await store.write("file-a", chunks_of(b"hello\n", 2)) == 6
    assert keys(s3_env, store.prefix) == [store.prefix + "file-a"]
    assert store.prefix.endswith("/files/")
    assert await read_all(store, "file-a", 4) == b"hello\n"
    await store.delete("file-a")
    assert keys(s3_env, store.prefix) == []
    await store.delete("file-a")  # deleting what is not there is fine


async def test_empty_file(store: S3FileStore) -> None:
    assert await store.write("file-empty", chunks_of(b"")) == 0
    assert await read_all(store, "file-empty") == b""


async def test_multipart_write_reads_back_identical(store: S3FileStore, s3_env: Any) -> None:
    data = secrets.token_bytes(2 * S3_PART_BYTES + 3 * MIB)  # 3 parts, the last one short
    assert await store.write("file-big", chunks_of(data, 700_000)) == len(data)
    head = s3_env.head_object(Bucket=BUCKET, Key=store.prefix + "file-big")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3")  # a multipart object of 3 parts
    digest = hashlib.sha256()
    async for chunk in store.read("file-big"):
        assert len(chunk) <= 65536
        digest.update(chunk)
    assert digest.digest() == hashlib.sha256(data).digest()


async def test_failed_write_leaves_no_object_and_no_upload(store: S3FileStore, s3_env: Any) -> None:
    async def broken() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"x" * (5 * MIB)  # two parts uploaded before the failure
        raise ConnectionResetError("client gone")

    with pytest.raises(ConnectionResetError):
        await store.write("file-broken", broken())
    assert keys(s3_env, store.prefix) == []
    uploads = s3_env.list_multipart_uploads(Bucket=BUCKET, Prefix=store.prefix).get("Uploads", [])
    assert uploads == []


async def test_rewrite_replaces_whole(store: S3FileStore) -> None:
    await store.write("file-r", chunks_of(b"first version"))
    await store.write("file-r", chunks_of(b"second"))
    assert await read_all(store, "file-r") == b"second"


async def test_missing_key_is_file_not_found(store: S3FileStore) -> None:
    with pytest.raises(FileNotFoundError):
        await read_all(store, "file-missing")


async def test_files_on_s3(store: S3FileStore) -> None:
    client = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        await client.ping()
    except Exception as exc:
        pytest.fail(f"needs Redis at 127.0.0.1:6379 ({type(exc).__name__}: {exc})")
    prefix = f"test:files-s3:{secrets.token_hex(6)}:"
    files = Files(JobsSettings(key_prefix=prefix), client, store)
    try:
        data = b'{"a":1}\n\n{"b":2}\n'
        record = await files.create("owner", "in.jsonl", "batch", chunks_of(data, 5))
        assert record["bytes"] == len(data)
        assert [x async for x in files.lines(record["id"])] == [(1, b'{"a":1}'), (3, b'{"b":2}')]
        assert await files.delete("owner", record["id"]) is True
        with pytest.raises(FileNotFoundError):
            _ = [c async for c in files.content(record["id"])]
    finally:
        async for key in client.scan_iter(match=prefix + "*"):
            await client.delete(key)
        await client.aclose()
