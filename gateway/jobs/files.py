"""File records and their bytes: OpenAI's File object, owned by a principal, kept for a while.

A record is OpenAI's File object (``id`` ``file-…``, ``object: "file"``, ``bytes``,
``created_at``, ``filename``, ``purpose``, ``status: "processed"``, ``expires_at``) stored as
JSON in Redis at ``{prefix}file:{id}`` with a TTL that ends at ``expires_at``; the owner's
files are listed from a sorted set ``{prefix}files:{owner}`` (score: creation time in
microseconds). The bytes live in a :class:`~gateway.jobs.filestore.FileStore` under the id.
Expired files: Redis drops the record by its TTL; :meth:`Files.reap` (run by
:meth:`Files.run_reaper`) removes their bytes and index entries, found through the sorted set
``{prefix}files:expiry`` (score: ``expires_at``).

An owner is a principal's ``(subject, team)`` (:func:`owner_key`): a file of another owner is
reported exactly like a missing one (``None`` / ``False``; the API answers 404).
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import secrets
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, cast

import orjson
import redis.asyncio as aioredis
import structlog

from gateway.auth.principal import Principal
from gateway.errors import InvalidRequest
from gateway.jobs.config import JobsSettings
from gateway.jobs.filestore import FileStore
from gateway.jobs.quota import FORGET_FILE, RECORD_FILE, StorageQuotaExceeded
from gateway.jobs.upload_check import UploadCheck

log = structlog.get_logger("gateway.jobs.files")

MIN_EXPIRES_AFTER = 3600  # seconds; OpenAI's bounds for `expires_after[seconds]`
MAX_EXPIRES_AFTER = 30 * 86400
_PAGE = 256  # ids fetched per round trip when listing
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark (files saved by some Windows tools)

Order = Literal["asc", "desc"]


def owner_key(principal: Principal) -> str:
    """The owner of what ``principal`` creates: a stable 32-hex-digit digest of (subject, team).

    The same subject in another team is another owner; the digest keeps subjects (emails,
    client ids) out of Redis key names.
    """
    return hashlib.sha256(orjson.dumps([principal.subject, principal.team])).hexdigest()[:32]


def _text(value: object) -> str:
    """A member or value as redis-py returns it (bytes with the default client)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_expires_after(seconds: int | None) -> None:
    if seconds is not None and not MIN_EXPIRES_AFTER <= seconds <= MAX_EXPIRES_AFTER:
        raise InvalidRequest(
            f"`expires_after[seconds]` must be between {MIN_EXPIRES_AFTER} and {MAX_EXPIRES_AFTER}.",
            param="expires_after",
        )


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class Received:
    """An upload's bytes in the store, not yet a file (:meth:`Files.commit` makes it one)."""

    owner: str
    file_id: str
    created_us: int  # microseconds since the epoch
    check: UploadCheck

    @property
    def bytes(self) -> int:
        return self.check.bytes


async def _with_newlines(lines: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for line in lines:
        yield line + b"\n"


class Files:
    """The Files API's storage: records in Redis, bytes in a :class:`FileStore`.

    ``redis`` must be a client that returns bytes (``decode_responses=False``, the default).
    """

    def __init__(self, settings: JobsSettings, redis: aioredis.Redis, store: FileStore) -> None:
        self.settings = settings
        self.redis = redis
        self.store = store
        self.prefix = settings.key_prefix
        self._record_file = redis.register_script(RECORD_FILE)
        self._forget_file = redis.register_script(FORGET_FILE)

    # ---------------------------------------------------------------- keys

    def _record_key(self, file_id: str) -> str:
        return f"{self.prefix}file:{file_id}"

    def _index_key(self, owner: str) -> str:
        return f"{self.prefix}files:{owner}"

    def _usage_key(self, owner: str) -> str:
        return f"{self.prefix}files:usage:{owner}"

    @property
    def _expiry_key(self) -> str:
        return f"{self.prefix}files:expiry"

    # ---------------------------------------------------------------- writing

    async def create(
        self,
        owner: str,
        filename: str,
        purpose: str,
        chunks: AsyncIterator[bytes],
        *,
        expires_after: int | None = None,
    ) -> dict[str, Any]:
        """Store an upload; returns its File object.

        ``expires_after``: seconds from now until the file expires (OpenAI's
        ``expires_after[seconds]`` with anchor ``created_at``; 3600 to 2592000), else
        ``jobs.retention``. For purpose ``batch`` the bytes must be UTF-8 and have at most
        ``jobs.max_file_lines`` lines; each line's content is checked when a batch uses the file
        (gateway/jobs/batch_input.py).

        Raises ``PayloadTooLarge`` (413) past ``jobs.max_file_bytes`` and ``InvalidRequest``
        (400, ``param: "file"``, code ``invalid_file`` or ``too_many_lines``; ``param:
        "expires_after"``); nothing is kept then. Whatever ``chunks`` raises (a client gone
        mid-upload) propagates, also keeping nothing.
        """
        _check_expires_after(expires_after)
        received = await self.receive(owner, chunks, purpose=purpose)
        return await self.commit(received, filename, purpose, expires_after=expires_after)

    async def receive(
        self, owner: str, chunks: AsyncIterator[bytes], *, purpose: str | None = None, at_least: int = 0
    ) -> Received:
        """First half of :meth:`create`, for a form whose ``purpose`` may come after the file:
        stream the bytes to the store, measuring them; the purpose's checks run now if
        ``purpose`` is given, else in :meth:`commit`. Until committed the bytes are no file
        (and the reaper removes them after an hour). ``at_least``: bytes the file has at least
        (from the request's ``Content-Length``), refused at once when they cannot fit. Raises as
        :meth:`create`."""
        await self.check_room(owner, at_least)
        max_lines = self.settings.max_file_lines if purpose == "batch" else None
        check = UploadCheck(self.settings.max_file_bytes, max_lines)
        return await self._receive(owner, check.wrap(chunks), check, MIN_EXPIRES_AFTER)

    async def check_room(self, owner: str, at_least: int = 0) -> None:
        """Raise ``StorageQuotaExceeded`` (429) when the owner keeps ``jobs.max_stored_bytes``
        bytes or ``jobs.max_files`` files already, or a file of ``at_least`` bytes cannot fit:
        checked before an upload's first byte is stored, and again, atomically with the record,
        when it is committed. Files that expired and wait for the reaper are removed first."""
        for reaped in (False, True):
            usage = self._usage_key(owner)
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hget(usage, "_")
                pipe.hlen(usage)
                used_raw, fields = await pipe.execute()
            used = int(used_raw or 0)
            files = int(fields) - (1 if used_raw is not None else 0)
            over_bytes = used + max(at_least, 1) > self.settings.max_stored_bytes
            over_files = files >= self.settings.max_files
            if not (over_bytes or over_files):
                return
            if not reaped:
                await self._reap_due()
        if over_bytes:
            raise self._over_bytes(used, at_least)
        raise self._over_files()

    async def _reap_due(self, rounds: int = 10) -> None:
        """Remove expired files now (the reaper's work, done early) so they stop counting."""
        for _ in range(rounds):
            if await self.reap() < 100:
                return

    def _over_bytes(self, used: int, adding: int) -> StorageQuotaExceeded:
        size = f"a file of {adding} bytes" if adding else "more files"
        return StorageQuotaExceeded(
            f"Storage quota exceeded: you keep {used} bytes of files, {self.settings.max_stored_bytes} "
            f"are allowed, and {size} would not fit. Delete files (DELETE /v1/files/{{file_id}}) or "
            "wait for them to expire.",
            param="file",
        )

    def _over_files(self) -> StorageQuotaExceeded:
        return StorageQuotaExceeded(
            f"Storage quota exceeded: you keep {self.settings.max_files} files, the most allowed. "
            "Delete files (DELETE /v1/files/{file_id}) or wait for them to expire.",
            param="file",
        )

    async def commit(
        self, received: Received, filename: str, purpose: str, *, expires_after: int | None = None
    ) -> dict[str, Any]:
        """Second half of :meth:`create`: check what :meth:`receive` measured against the
        purpose and record the file; returns its File object. On ``InvalidRequest`` (as in
        :meth:`create`) or ``StorageQuotaExceeded`` (429: the owner's files would pass
        ``jobs.max_stored_bytes`` or ``jobs.max_files``) the bytes are removed."""
        try:
            _check_expires_after(expires_after)
            if purpose == "batch":
                received.check.check_batch(self.settings.max_file_lines)
        except InvalidRequest:
            await self.discard(received)
            raise
        return await self._record(received, filename, purpose, expires_after, bounded=True)

    async def discard(self, received: Received) -> None:
        """Remove the bytes of an upload that will not be committed."""
        await self._forget(f"{received.owner}:{received.file_id}")

    async def create_output(
        self, owner: str, filename: str, purpose: str, lines: AsyncIterator[bytes]
    ) -> dict[str, Any]:
        """Store a produced file (``batch_output``, ``batch_error``): each of ``lines`` (bytes
        without a newline) followed by ``\\n``. Kept for ``jobs.retention``; no size checks, and
        never refused for the owner's storage quota (a batch's results are not lost), but
        counted in it."""
        check = UploadCheck(sys.maxsize, None)
        received = await self._receive(
            owner, check.wrap(_with_newlines(lines)), check, int(self.settings.retention)
        )
        return await self._record(received, filename, purpose, None)

    async def _receive(
        self, owner: str, chunks: AsyncIterator[bytes], check: UploadCheck, keep: int
    ) -> Received:
        file_id = new_file_id()
        created_us = time.time_ns() // 1000
        # Registered for the reaper before any byte is stored: the bytes of a process that dies
        # before the record is written are still found and removed (after ``keep`` seconds).
        member = f"{owner}:{file_id}"
        await self.redis.zadd(self._expiry_key, {member: created_us // 1_000_000 + keep})
        try:
            await self.store.write(file_id, chunks)
        except BaseException:
            await asyncio.shield(self._forget(member))
            raise
        return Received(owner, file_id, created_us, check)

    async def _record(
        self,
        received: Received,
        filename: str,
        purpose: str,
        expires_after: int | None,
        bounded: bool = False,
        retried: bool = False,
    ) -> dict[str, Any]:
        owner, file_id = received.owner, received.file_id
        created_at = received.created_us // 1_000_000
        keep = expires_after if expires_after is not None else int(self.settings.retention)
        expires_at = created_at + keep
        record = {
            "id": file_id,
            "object": "file",
            "bytes": received.bytes,
            "created_at": created_at,
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": expires_at,
        }
        stored = {**record, "owner": owner}
        s = self.settings
        recorded = await self._record_file(
            keys=[
                self._record_key(file_id),
                self._index_key(owner),
                self._expiry_key,
                self._usage_key(owner),
            ],
            args=[
                orjson.dumps(stored),
                expires_at,
                file_id,
                received.created_us,
                f"{owner}:{file_id}",
                received.bytes,
                s.max_stored_bytes,
                s.max_files if bounded else 0,
            ],
        )
        if recorded != 1:
            if not retried:  # expired files may still count until the reaper runs: once more
                await self._reap_due()
                return await self._record(received, filename, purpose, expires_after, bounded, retried=True)
            await asyncio.shield(self.discard(received))
            if recorded == 0:
                used = int(await self.redis.hget(self._usage_key(owner), "_") or 0)
                raise self._over_bytes(used, received.bytes)
            raise self._over_files()
        log.info("file_stored", file_id=file_id, purpose=purpose, bytes=received.bytes)
        return record

    async def _forget(self, member: str) -> None:
        """Remove a file's bytes, then its expiry entry (kept for the reaper if that fails), and
        the file from its owner's storage usage."""
        owner, _, file_id = member.partition(":")
        await self.store.delete(file_id)
        await self._forget_file(keys=[self._usage_key(owner)], args=[file_id])
        await self.redis.zrem(self._expiry_key, member)

    # ---------------------------------------------------------------- reading

    async def _load(self, file_id: str) -> dict[str, Any] | None:
        raw = await self.redis.get(self._record_key(file_id))
        return orjson.loads(raw) if raw is not None else None

    @staticmethod
    def _public(stored: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in stored.items() if k != "owner"}

    async def get(self, owner: str, file_id: str) -> dict[str, Any] | None:
        """The File object, or ``None`` when it is missing, expired or another owner's."""
        if not file_id.startswith("file-"):
            return None
        stored = await self._load(file_id)
        if stored is None or stored.get("owner") != owner:
            return None
        return self._public(stored)

    async def list(
        self,
        owner: str,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10000,
        order: Order = "desc",
    ) -> tuple[builtins.list[dict[str, Any]], bool]:
        """The owner's files by ``created_at`` (``order``), after the file ``after`` (a cursor,
        exclusive), of ``purpose`` if given: ``(files, has_more)``, at most ``limit`` files.

        Raises ``InvalidRequest`` (``param: "after"``) when ``after`` is not one of the owner's
        files (deleted or expired since).
        """
        index = self._index_key(owner)
        desc = order == "desc"
        start = 0
        if after is not None:
            rank = await (self.redis.zrevrank(index, after) if desc else self.redis.zrank(index, after))
            if rank is None:
                raise InvalidRequest(f"No file `{after}` to list after.", param="after")
            start = cast(int, rank) + 1
        found: builtins.list[dict[str, Any]] = []
        while len(found) <= limit:
            ids = [_text(i) for i in await self.redis.zrange(index, start, start + _PAGE - 1, desc=desc)]
            if not ids:
                break
            start += len(ids)
            raws = await self.redis.mget([self._record_key(i) for i in ids])
            gone = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
            if gone:
                # Expired: the reaper removes them too; done here so a listing never shows them.
                await self.redis.zrem(index, *gone)
                start -= len(gone)
            for raw in raws:
                if raw is None:
                    continue
                stored = orjson.loads(raw)
                if purpose is None or stored.get("purpose") == purpose:
                    found.append(self._public(stored))
        return found[:limit], len(found) > limit

    def content(self, file_id: str) -> AsyncIterator[bytes]:
        """The file's bytes in chunks of up to 64 KiB. Check ownership with :meth:`get` first.

        Raises ``FileNotFoundError`` (on first iteration) when the bytes are gone."""
        return self.store.read(file_id)

    async def lines(
        self, file_id: str, max_line_bytes: int | None = None
    ) -> AsyncIterator[tuple[int, bytes]]:
        """``(line number, line)`` of the file: 1-based numbers, lines without ``\\n`` (nor a
        ``\\r`` before it, nor a UTF-8 byte order mark before the first); blank lines are skipped
        but counted. Streams: memory holds one chunk and the longest line, or with
        ``max_line_bytes`` at most that many bytes of a line (one more byte is kept of a longer
        line, so that the caller sees it is too long; the rest is skipped unread into memory).
        Raises ``FileNotFoundError`` when the bytes are gone."""
        number = 0
        cap = None if max_line_bytes is None else max_line_bytes + 1
        pending: builtins.list[bytes] = []  # the start of a line that continues in a later chunk
        held = 0  # bytes in pending
        async for chunk in self.store.read(file_id):
            if b"\n" not in chunk:
                if cap is None or held < cap:
                    pending.append(chunk if cap is None else chunk[: cap - held])
                    held += len(pending[-1])
                continue
            pieces = chunk.split(b"\n")
            if pending:
                pieces[0] = b"".join(pending) + pieces[0]
                if cap is not None:
                    pieces[0] = pieces[0][:cap]
            last = pieces.pop()
            pending, held = ([last], len(last)) if last else ([], 0)
            for piece in pieces:
                number += 1
                line = piece[:-1] if piece.endswith(b"\r") else piece
                if number == 1 and line.startswith(_BOM):
                    line = line[3:]
                if line.strip():
                    yield number, line
        if pending:
            line = b"".join(pending)
            line = line[:-1] if line.endswith(b"\r") else line
            if number == 0 and line.startswith(_BOM):
                line = line[3:]
            if line.strip():
                yield number + 1, line

    # ---------------------------------------------------------------- removing

    async def delete(self, owner: str, file_id: str) -> bool:
        """Delete the owner's file (record, then bytes); ``False`` when it is missing or another
        owner's."""
        if await self.get(owner, file_id) is None:
            return False
        member = f"{owner}:{file_id}"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._record_key(file_id))
            pipe.zrem(self._index_key(owner), file_id)
            await pipe.execute()
        await self._forget(member)
        log.info("file_deleted", file_id=file_id)
        return True

    async def reap(self, now: float | None = None, batch: int = 100) -> int:
        """Remove the bytes and index entries of files whose ``expires_at`` has passed (their
        records are gone by TTL already); returns how many were removed. Safe to run in every
        replica at once (deleting twice is harmless)."""
        now = time.time() if now is None else now
        members = await self.redis.zrangebyscore(self._expiry_key, "-inf", now, start=0, num=batch)
        for raw in members:
            member = _text(raw)
            owner, _, file_id = member.partition(":")
            await self.redis.delete(self._record_key(file_id))  # a clock a little ahead of Redis's
            await self.redis.zrem(self._index_key(owner), file_id)
            await self._forget(member)
        if members:
            log.info("files_reaped", count=len(members))
        return len(members)

    async def run_reaper(self, interval: float = 60.0) -> None:
        """Reap every ``interval`` seconds until cancelled (a task of the app's lifespan).
        A failed round (Redis or the store unreachable) is logged and retried next time."""
        while True:
            try:
                while await self.reap() > 0:
                    pass
            except Exception as exc:
                log.warning("files_reap_failed", error=type(exc).__name__)
            await asyncio.sleep(interval)
