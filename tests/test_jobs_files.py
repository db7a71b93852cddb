"""Files (gateway/jobs/files.py) and batch input checks (gateway/jobs/batch_input.py).

Real Redis at 127.0.0.1:6379 (a key prefix unique to each test, removed afterwards) and a
LocalFileStore in the test's temporary directory. The S3 store and the HTTP API have their own
files (tests/test_jobs_filestore_s3.py, tests/test_jobs_files_api.py).
"""

from __future__ import annotations

import secrets
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from gateway.auth.principal import Principal
from gateway.errors import InvalidRequest, PayloadTooLarge
from gateway.jobs.batch_input import iter_batch_requests, validate_batch_input
from gateway.jobs.config import JobsSettings
from gateway.jobs.files import Files, owner_key
from gateway.jobs.filestore import LocalFileStore, open_store

REDIS_URL = "redis://127.0.0.1:6379/0"
CHAT = "/v1/chat/completions"


async def chunks_of(data: bytes, size: int = 7) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def gather(it: AsyncIterator[Any]) -> list[Any]:
    return [x async for x in it]


def line(custom_id: str, model: str = "tiny", **over: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"model": model, "messages": [{"role": "user", "content": "hi"}]},
    }
    item.update(over)
    return item


def jsonl(*items: Any) -> bytes:
    return b"".join((i if isinstance(i, bytes) else orjson.dumps(i)) + b"\n" for i in items)


@pytest.fixture
async def redis() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        pytest.fail(f"needs Redis at 127.0.0.1:6379 ({type(exc).__name__}: {exc})")
    yield client
    await client.aclose()


@pytest.fixture
async def files(tmp_path: Path, redis: aioredis.Redis) -> AsyncIterator[Files]:
    prefix = f"test:files:{secrets.token_hex(6)}:"
    settings = JobsSettings(key_prefix=prefix, max_file_bytes=4096, max_file_lines=5)
    f = Files(settings, redis, LocalFileStore(tmp_path / "store"))
    yield f
    async for key in redis.scan_iter(match=prefix + "*"):
        await redis.delete(key)


def owner(subject: str = "alice", team: str | None = "t1") -> str:
    return owner_key(Principal(subject, team, None, frozenset(), None, "api_key"))


# ---------------------------------------------------------------- owners and records


def test_owner_key_separates_subject_and_team() -> None:
    assert owner("alice", "t1") == owner("alice", "t1")
    assert len({owner("alice", "t1"), owner("alice", "t2"), owner("alice", None), owner("bob", "t1")}) == 4
    assert "alice" not in owner("alice", "t1")


async def test_create_get_content_roundtrip(files: Files) -> None:
    data = jsonl(line("a"), line("b"))
    record = await files.create(owner(), "in.jsonl", "batch", chunks_of(data))
    assert record["id"].startswith("file-")
    assert record["object"] == "file"
    assert record["bytes"] == len(data)
    assert record["filename"] == "in.jsonl"
    assert record["purpose"] == "batch"
    assert record["status"] == "processed"
    assert record["expires_at"] == record["created_at"] + int(files.settings.retention)
    assert await files.get(owner(), record["id"]) == record
    assert b"".join(await gather(files.content(record["id"]))) == data


async def test_record_has_ttl_at_expires_at(files: Files, redis: aioredis.Redis) -> None:
    record = await files.create(owner(), "x.jsonl", "user_data", chunks_of(b"abc"), expires_after=3600)
    assert record["expires_at"] == record["created_at"] + 3600
    ttl = await redis.ttl(f"{files.prefix}file:{record['id']}")
    assert 3500 < ttl <= 3601


async def test_expires_after_out_of_range_is_refused(files: Files) -> None:
    with pytest.raises(InvalidRequest) as info:
        await files.create(owner(), "x", "batch", chunks_of(b"{}\n"), expires_after=60)
    assert info.value.param == "expires_after"


async def test_other_owner_sees_nothing(files: Files) -> None:
    record = await files.create(owner(), "in.jsonl", "batch", chunks_of(jsonl(line("a"))))
    for other in (owner("bob", "t1"), owner("alice", "t2"), owner("alice", None)):
        assert await files.get(other, record["id"]) is None
        assert await files.list(other) == ([], False)
        assert await files.delete(other, record["id"]) is False
    assert await files.get(owner(), record["id"]) == record


async def test_missing_and_malformed_ids_are_none(files: Files) -> None:
    assert await files.get(owner(), "file-" + "0" * 24) is None
    assert await files.get(owner(), "batch_123") is None
    assert await files.delete(owner(), "file-nope") is False


# ---------------------------------------------------------------- upload checks


async def test_too_large_is_refused_and_nothing_kept(files: Files, tmp_path: Path) -> None:
    with pytest.raises(PayloadTooLarge) as info:
        await files.create(owner(), "big", "user_data", chunks_of(b"x" * 5000, 1000))
    assert info.value.status == 413
    assert await files.list(owner()) == ([], False)
    assert list((tmp_path / "store").iterdir()) == []
    assert await files.redis.zcard(f"{files.prefix}files:expiry") == 0


async def test_exactly_max_bytes_is_accepted(files: Files) -> None:
    record = await files.create(owner(), "edge", "user_data", chunks_of(b"x" * 4096, 1000))
    assert record["bytes"] == 4096


async def test_batch_upload_must_be_utf8(files: Files, tmp_path: Path) -> None:
    # a 2-byte UTF-8 sequence split across chunks is fine; an invalid byte is not
    ok = jsonl({"custom_id": "é", "x": "ü"})
    await files.create(owner(), "ok", "batch", chunks_of(ok, 1))
    with pytest.raises(InvalidRequest) as info:
        await files.create(owner(), "bad", "batch", chunks_of(b'{"a": "\xff"}\n'))
    assert info.value.code == "invalid_file"
    assert info.value.param == "file"
    with pytest.raises(InvalidRequest):  # truncated sequence at the very end
        await files.create(owner(), "bad", "batch", chunks_of(b'{"a": 1}\n\xc3'))
    assert len(list((tmp_path / "store").iterdir())) == 1


async def test_batch_upload_line_limit(files: Files) -> None:
    five = b"{}\n" * 5
    await files.create(owner(), "five", "batch", chunks_of(five))
    await files.create(owner(), "five-unterminated", "batch", chunks_of(five[:-1]))
    with pytest.raises(InvalidRequest) as info:
        await files.create(owner(), "six", "batch", chunks_of(five + b"{}"))
    assert info.value.code == "too_many_lines"
    # other purposes are not line-checked, nor UTF-8 checked
    await files.create(owner(), "six", "user_data", chunks_of(b"\xff\n" * 6))


async def test_failing_source_keeps_nothing(files: Files, tmp_path: Path) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * 2_000_000  # past the store's write buffer: something was written
        raise ConnectionResetError("client went away")

    files.settings = JobsSettings(key_prefix=files.prefix, max_file_bytes=10_000_000)
    with pytest.raises(ConnectionResetError):
        await files.create(owner(), "x", "user_data", broken())
    assert list((tmp_path / "store").iterdir()) == []
    assert await files.list(owner()) == ([], False)


# ---------------------------------------------------------------- listing


async def test_list_order_cursor_purpose(files: Files) -> None:
    made = [
        await files.create(owner(), f"f{i}", "batch" if i % 2 == 0 else "user_data", chunks_of(b"{}\n"))
        for i in range(7)
    ]
    ids = [r["id"] for r in made]
    page, more = await files.list(owner(), limit=3)
    assert [r["id"] for r in page] == ids[::-1][:3] and more
    page, more = await files.list(owner(), after=page[-1]["id"], limit=3)
    assert [r["id"] for r in page] == ids[::-1][3:6] and more
    page, more = await files.list(owner(), after=page[-1]["id"], limit=3)
    assert [r["id"] for r in page] == ids[::-1][6:] and not more
    page, more = await files.list(owner(), order="asc", limit=100)
    assert [r["id"] for r in page] == ids and not more
    page, more = await files.list(owner(), purpose="batch", order="asc", limit=2)
    assert [r["id"] for r in page] == [ids[0], ids[2]] and more
    page, more = await files.list(owner(), purpose="batch", order="asc", after=ids[2], limit=2)
    assert [r["id"] for r in page] == [ids[4], ids[6]] and not more
    with pytest.raises(InvalidRequest):
        await files.list(owner(), after="file-unknown")


async def test_list_drops_expired_records(files: Files, redis: aioredis.Redis) -> None:
    a = await files.create(owner(), "a", "batch", chunks_of(b"{}\n"))
    b = await files.create(owner(), "b", "batch", chunks_of(b"{}\n"))
    await redis.delete(f"{files.prefix}file:{a['id']}")  # as its TTL would
    assert await files.list(owner()) == ([b], False)
    assert await redis.zcard(f"{files.prefix}files:{owner()}") == 1


# ---------------------------------------------------------------- delete and retention


async def test_delete_removes_record_index_and_bytes(files: Files, tmp_path: Path) -> None:
    record = await files.create(owner(), "a", "batch", chunks_of(b"{}\n"))
    assert await files.delete(owner(), record["id"]) is True
    assert await files.get(owner(), record["id"]) is None
    assert await files.list(owner()) == ([], False)
    assert list((tmp_path / "store").iterdir()) == []
    with pytest.raises(FileNotFoundError):
        await gather(files.content(record["id"]))
    assert await files.delete(owner(), record["id"]) is False


async def test_reap_removes_expired_bytes_only(files: Files, tmp_path: Path, redis: aioredis.Redis) -> None:
    short = await files.create(owner(), "a", "batch", chunks_of(b"{}\n"), expires_after=3600)
    long = await files.create(owner(), "b", "batch", chunks_of(b"{}\n"))
    assert await files.reap() == 0
    assert await files.reap(now=short["expires_at"] + 1) == 1
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [long["id"]]
    assert await files.get(owner(), short["id"]) is None
    assert await files.list(owner()) == ([long], False)
    assert await redis.zcard(f"{files.prefix}files:expiry") == 1


# ---------------------------------------------------------------- lines and outputs


async def test_lines_numbers_blank_lines_crlf_and_chunk_boundaries(files: Files) -> None:
    files.settings = JobsSettings(key_prefix=files.prefix)
    data = b'{"a":1}\r\n\n   \n{"b":2}\n' + b'{"c":"' + b"x" * 200_000 + b'"}'
    record = await files.create(owner(), "l", "user_data", chunks_of(data, 3), expires_after=3600)
    got = await gather(files.lines(record["id"]))
    assert [n for n, _ in got] == [1, 4, 5]
    assert got[0][1] == b'{"a":1}'
    assert got[1][1] == b'{"b":2}'
    assert len(got[2][1]) == 200_008


async def test_lines_drop_a_byte_order_mark_before_the_first_line(files: Files) -> None:
    files.settings = JobsSettings(key_prefix=files.prefix)
    for data in (b'\xef\xbb\xbf{"a":1}\n{"b":2}\n', b'\xef\xbb\xbf{"a":1}'):
        record = await files.create(owner(), "l", "user_data", chunks_of(data, 2), expires_after=3600)
        got = await gather(files.lines(record["id"]))
        assert got[0] == (1, b'{"a":1}')
    record = await files.create(
        owner(), "l", "user_data", chunks_of(b'{"a":1}\n\xef\xbb\xbf{"b":2}\n'), expires_after=3600
    )
    assert (await gather(files.lines(record["id"])))[1] == (2, b'\xef\xbb\xbf{"b":2}')  # only the file's


async def test_a_batch_whose_line_has_no_end_is_refused_without_holding_the_line(files: Files) -> None:
    """A 40 MB line with no newline (a client's way to make every batch validation hold its
    whole file in memory): the check sees a bound's worth of it, not 40 MB, and the lines after
    it keep their numbers."""
    files.settings = JobsSettings(key_prefix=files.prefix)
    huge = b'{"custom_id":"' + b"x" * 40_000_000 + b'"}'
    ok = orjson.dumps(line("after"))
    record = await files.create(
        owner(), "b", "batch", chunks_of(huge + b"\n" + ok + b"\n", 1 << 16), expires_after=3600
    )
    got = await gather(files.lines(record["id"], 1000))
    assert [(n, len(x)) for n, x in got] == [(1, 1001), (2, len(ok))]
    tracemalloc.start()
    try:
        count, errors = await validate_batch_input(files, record["id"], CHAT, allow_tiny, 10, 1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (count, [(e["code"], e["line"]) for e in errors]) == (2, [("line_too_large", 1)])
    assert peak < 8_000_000, peak  # the file is read in chunks (the store's); never the 40 MB line


async def test_create_output_writes_lines(files: Files) -> None:
    async def produced() -> AsyncIterator[bytes]:
        for i in range(3):
            yield orjson.dumps({"custom_id": str(i)})

    record = await files.create_output(owner(), "batch_x_output.jsonl", "batch_output", produced())
    assert record["purpose"] == "batch_output"
    content = b"".join(await gather(files.content(record["id"])))
    assert content == b'{"custom_id":"0"}\n{"custom_id":"1"}\n{"custom_id":"2"}\n'
    assert record["bytes"] == len(content)
    assert await files.get(owner(), record["id"]) == record


# ---------------------------------------------------------------- batch input


def allow_tiny(model: str, body: object = None) -> str | None:
    return None if model == "tiny" else f"You may not use the model `{model}`."


async def upload(files: Files, data: bytes) -> str:
    files.settings = JobsSettings(key_prefix=files.prefix)
    return str((await files.create(owner(), "in.jsonl", "batch", chunks_of(data, 50)))["id"])


async def test_valid_batch_input(files: Files) -> None:
    fid = await upload(files, jsonl(line("a"), line("b")) + b"\n" + jsonl(line("c")))
    assert await validate_batch_input(files, fid, CHAT, allow_tiny, 10) == (3, [])
    got = await gather(iter_batch_requests(files, fid))
    assert [(n, c) for n, c, _ in got] == [(1, "a"), (2, "b"), (4, "c")]
    assert got[0][2] == line("a")["body"]


async def test_each_bad_line_reported_with_its_number(files: Files) -> None:
    data = jsonl(
        line("ok-1"),
        b"{not json",
        b"[1, 2]",
        {"method": "POST", "url": CHAT, "body": {"model": "tiny"}},
        line("", model="tiny"),
        line("ok-1"),
        line("m", method="GET"),
        line("u", url="/v1/embeddings"),
        line("b", body="hello"),
        line("nm", body={"messages": []}),
        line("s", body={"model": "tiny", "stream": True}),
        line("forbidden", model="big"),
        line("ok-2"),
    )
    fid = await upload(files, data)
    count, errors = await validate_batch_input(files, fid, CHAT, allow_tiny, 100)
    assert count == 13
    assert [(e["line"], e["code"], e["param"]) for e in errors] == [
        (2, "invalid_json_line", None),
        (3, "invalid_json_line", None),
        (4, "invalid_custom_id", "custom_id"),
        (5, "invalid_custom_id", "custom_id"),
        (6, "duplicate_custom_id", "custom_id"),
        (7, "invalid_method", "method"),
        (8, "invalid_url", "url"),
        (9, "invalid_body", "body"),
        (10, "missing_model", "body.model"),
        (11, "stream_not_supported", "body.stream"),
        (12, "model_not_allowed", "body.model"),
    ]
    assert errors[10]["message"] == "You may not use the model `big`."
    assert all(set(e) == {"code", "message", "param", "line"} for e in errors)


async def test_too_many_request_lines(files: Files) -> None:
    fid = await upload(files, jsonl(*(line(str(i)) for i in range(4))))
    count, errors = await validate_batch_input(files, fid, CHAT, allow_tiny, 3)
    assert count == 3
    assert [(e["code"], e["line"]) for e in errors] == [("too_many_lines", 4)]


async def test_errors_past_the_listed_ones_are_counted(files: Files) -> None:
    """2,000 bad lines listed 1,000 errors, the last on line 1,000, with no sign of the rest."""
    fid = await upload(files, b"not json\n" * 2003)
    count, errors = await validate_batch_input(files, fid, CHAT, allow_tiny, 5000)
    assert count == 2003
    assert len(errors) == 1001
    assert errors[999]["line"] == 1000
    assert (errors[-1]["code"], errors[-1]["line"]) == ("too_many_errors", None)
    assert errors[-1]["message"].startswith("1003 more lines have errors")


async def test_empty_and_blank_files_are_errors(files: Files) -> None:
    for data in (b"", b"\n \n\r\n"):
        fid = await upload(files, data)
        count, errors = await validate_batch_input(files, fid, CHAT, allow_tiny, 10)
        assert count == 0
        assert [e["code"] for e in errors] == ["empty_file"]


async def test_iter_batch_requests_refuses_unvalidated_lines(files: Files) -> None:
    fid = await upload(files, jsonl(line("a"), b"nope"))
    with pytest.raises(InvalidRequest):
        await gather(iter_batch_requests(files, fid))


# ---------------------------------------------------------------- store URLs


def test_open_store_urls(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/x")
    assert isinstance(store, LocalFileStore) and store.root == tmp_path / "x"
    rel = open_store("file://./.data/files")
    assert isinstance(rel, LocalFileStore) and rel.root == Path("./.data/files")
    for bad in ("http://x/y", "s3:///prefix", "file://host/x"):
        with pytest.raises(ValueError):
            open_store(bad)


async def test_local_store_refuses_path_keys(tmp_path: Path) -> None:
    store = LocalFileStore(tmp_path)
    for key in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(ValueError):
            await store.write(key, chunks_of(b"x"))


async def test_receive_then_commit_checks_the_late_purpose(files: Files, tmp_path: Path) -> None:
    received = await files.receive(owner(), chunks_of(b"\xff\n"))  # purpose not known yet
    assert received.bytes == 2
    with pytest.raises(InvalidRequest) as info:
        await files.commit(received, "x.jsonl", "batch")
    assert info.value.code == "invalid_file"
    assert list((tmp_path / "store").iterdir()) == []
    received = await files.receive(owner(), chunks_of(b"{}\n" * 6))
    with pytest.raises(InvalidRequest) as info:
        await files.commit(received, "x.jsonl", "batch")
    assert info.value.code == "too_many_lines"
    received = await files.receive(owner(), chunks_of(b"\xff\n"))
    record = await files.commit(received, "x.bin", "user_data", expires_after=3600)
    assert await files.get(owner(), record["id"]) == record
    assert (
        await files.redis.zscore(f"{files.prefix}files:expiry", f"{owner()}:{record['id']}")
        == record["expires_at"]
    )


async def test_uncommitted_upload_is_reaped(files: Files, tmp_path: Path) -> None:
    received = await files.receive(owner(), chunks_of(b"{}\n"))
    assert await files.reap(now=received.created_us / 1e6 + 3601) == 1
    assert list((tmp_path / "store").iterdir()) == []
