"""Where the bytes of uploaded and produced files live: a local directory or S3.

One small interface, :class:`FileStore`, with two implementations chosen by ``jobs.files``:

* ``file:///path`` → :class:`LocalFileStore` (one node, or a volume every replica mounts);
* ``s3://bucket/prefix`` → :class:`S3FileStore` (several replicas), with aiobotocore. Credentials
  come from the standard AWS chain (environment, shared config, instance/task role); the
  endpoint from the standard ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` variables (MinIO,
  a local test server).

Both stream: nothing holds a whole file in memory. A write is atomic: until it completes,
readers see the previous state of the key (nothing, for a new file); a failed or cancelled
write leaves nothing behind under the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
WRITE_BUFFER_BYTES = 1024 * 1024  # bytes gathered before one write in the I/O thread
S3_PART_BYTES = 8 * 1024 * 1024  # multipart part size (S3's minimum is 5 MiB, the last excepted)


class FileStore(Protocol):
    """Bytes under flat keys (``[A-Za-z0-9][A-Za-z0-9._-]*``, at most 200 characters).

    Errors: ``ValueError`` for a malformed key; ``FileNotFoundError`` when reading a key that
    is not there (raised by the first iteration of :meth:`read`); whatever the chunk iterator
    raises in :meth:`write` is re-raised after the partial data is discarded.
    """

    async def write(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        """Store everything ``chunks`` yields under ``key`` (replacing it); returns bytes written."""
        ...

    def read(self, key: str, chunk_size: int = 65536) -> AsyncIterator[bytes]:
        """The bytes under ``key``, in chunks of at most ``chunk_size`` bytes."""
        ...

    async def delete(self, key: str) -> None:
        """Remove ``key``; a key that is not there is not an error."""
        ...

    async def close(self) -> None:
        """Release clients and connections."""
        ...


def _check_key(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise ValueError(f"invalid file store key {key!r}")
    return key


class LocalFileStore:
    """Files in one directory; all file I/O in worker threads (never on the event loop).

    A write goes to a hidden temporary file in the same directory, is fsynced and then renamed
    over the key (``os.replace`` is atomic on POSIX), so a crash mid-upload leaves at most a
    ``.tmp-*`` file, never a truncated file under the key.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    async def write(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        final = self._path(key)
        tmp = self.root / f".tmp-{key}-{secrets.token_hex(6)}"

        def open_tmp() -> IO[bytes]:
            self.root.mkdir(parents=True, exist_ok=True)
            return open(tmp, "wb")

        def finish(f: IO[bytes]) -> None:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, final)

        def discard(f: IO[bytes]) -> None:
            f.close()
            tmp.unlink(missing_ok=True)

        f = await asyncio.to_thread(open_tmp)
        total = 0
        try:
            buffer: list[bytes] = []
            buffered = 0
            async for chunk in chunks:
                if not chunk:
                    continue
                buffer.append(chunk)
                buffered += len(chunk)
                if buffered >= WRITE_BUFFER_BYTES:
                    await asyncio.to_thread(f.write, b"".join(buffer))
                    total += buffered
                    buffer, buffered = [], 0
            if buffer:
                await asyncio.to_thread(f.write, b"".join(buffer))
                total += buffered
            await asyncio.to_thread(finish, f)
        except BaseException:
            # Cancelled too: the temporary file must not outlive the write.
            await asyncio.shield(asyncio.to_thread(discard, f))
            raise
        return total

    async def read(self, key: str, chunk_size: int = 65536) -> AsyncIterator[bytes]:
        path = self._path(key)
        f = await asyncio.to_thread(open, path, "rb")
        try:
            while True:
                chunk = await asyncio.to_thread(f.read, chunk_size)
                if not chunk:
                    return
                yield chunk
        finally:
            await asyncio.to_thread(f.close)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, missing_ok=True)

    async def close(self) -> None:
        return None


class S3FileStore:
    """Objects under ``s3://bucket/prefix``, through one aiobotocore client made on first use.

    Writes of more than one part use a multipart upload, completed only when every part is in
    (aborted otherwise), so a partial object is never visible; smaller files are one
    ``PutObject``. Memory per write: one part (8 MiB).
    """

    def __init__(self, bucket: str, prefix: str = "") -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._client: S3Client | None = None
        self._lock = asyncio.Lock()
        self._stack = contextlib.AsyncExitStack()

    async def _s3(self) -> S3Client:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                from aiobotocore.session import get_session

                self._client = await self._stack.enter_async_context(get_session().create_client("s3"))
        return self._client

    def _key(self, key: str) -> str:
        return self.prefix + _check_key(key)

    async def write(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        s3 = await self._s3()
        name = self._key(key)
        buffer = bytearray()
        total = 0
        upload_id: str | None = None
        parts: list[CompletedPartTypeDef] = []

        async def upload_part(upload: str) -> None:
            number = len(parts) + 1
            part = await s3.upload_part(
                Bucket=self.bucket, Key=name, UploadId=upload, PartNumber=number, Body=bytes(buffer)
            )
            parts.append({"ETag": part["ETag"], "PartNumber": number})
            buffer.clear()

        try:
            async for chunk in chunks:
                buffer += chunk
                total += len(chunk)
                if len(buffer) >= S3_PART_BYTES:
                    if upload_id is None:
                        created = await s3.create_multipart_upload(Bucket=self.bucket, Key=name)
                        upload_id = created["UploadId"]
                    await upload_part(upload_id)
            if upload_id is None:
                await s3.put_object(Bucket=self.bucket, Key=name, Body=bytes(buffer))
                return total
            if buffer:
                await upload_part(upload_id)
            await s3.complete_multipart_upload(
                Bucket=self.bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
            return total
        except BaseException:
            if upload_id is not None:
                try:
                    await asyncio.shield(
                        s3.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
                    )
                except Exception:
                    pass  # the bucket's lifecycle rule for incomplete uploads is the backstop
            raise

    async def read(self, key: str, chunk_size: int = 65536) -> AsyncIterator[bytes]:
        s3 = await self._s3()
        try:
            response = await s3.get_object(Bucket=self.bucket, Key=self._key(key))
        except s3.exceptions.NoSuchKey:
            raise FileNotFoundError(key) from None
        body = response["Body"]
        try:
            while True:
                chunk = await body.read(chunk_size)
                if not chunk:
                    return
                yield chunk
        finally:
            body.close()

    async def delete(self, key: str) -> None:
        s3 = await self._s3()
        await s3.delete_object(Bucket=self.bucket, Key=self._key(key))

    async def close(self) -> None:
        self._client = None
        await self._stack.aclose()


def open_store(url: str) -> FileStore:
    """The store a ``jobs.files`` URL names: ``file:///abs/path``, ``file://./rel/path`` or
    ``s3://bucket/prefix``. Raises ``ValueError`` for another scheme or a missing bucket."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        # file://./x is relative (the netloc is "."); file:///x is absolute
        path = unquote(parts.netloc + parts.path) if parts.netloc in ("", ".", "..") else None
        if path is None:
            raise ValueError(f"`{url}`: a file URL names a local path (file:///abs or file://./rel)")
        return LocalFileStore(Path(path))
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"`{url}`: an S3 URL names a bucket (s3://bucket/prefix)")
        return S3FileStore(parts.netloc, unquote(parts.path))
    raise ValueError(f"`{url}`: file store URLs are file:///path or s3://bucket/prefix")
