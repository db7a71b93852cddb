"""The ledger's local spool: batches PostgreSQL could not take, on disk until it can.

A spool directory holds segment files ``<ns>-<pid>.jsonl``. Each line is one batch, a JSON array
of rows (``codec.encode_batch``), written with one ``write`` and made durable with ``fsync``
before the batch counts as spooled. A process holds an exclusive ``flock`` on the segment it is
appending to, so a replayer (this process after a rotation, another worker, or the next start
after a crash) only takes segments nobody is writing: a lock held by a dead process is released
by the kernel. A segment is deleted only after every batch in it was committed to PostgreSQL;
a replay interrupted half-way repeats batches, which the idempotent insert (primary key
``(ts, id)``, ``ON CONFLICT DO NOTHING``) absorbs.

Every method does blocking file I/O: call them in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import BinaryIO

SUFFIX = ".jsonl"
SEGMENT_BYTES = 32 * 1024 * 1024  # a segment is replayed in one read: bound what that holds


class Spool:
    """Append-only segments in one directory (created on first use)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._file: BinaryIO | None = None
        self._size = 0

    def append(self, batch: bytes) -> None:
        """Write one batch (one line, ending in a newline) and fsync it. Raises OSError."""
        f = self._file
        if f is None:
            f = self._open_segment()
        f.write(batch)
        f.flush()
        os.fsync(f.fileno())
        self._size += len(batch)
        if self._size >= SEGMENT_BYTES:
            self.rotate()

    def _open_segment(self) -> BinaryIO:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{time.time_ns()}-{os.getpid()}{SUFFIX}"
        f = path.open("ab")
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # ours alone until rotated or the process ends
        self._file, self._size = f, 0
        return f

    def rotate(self) -> None:
        """Close the segment being appended to, so that it can be replayed."""
        if self._file is not None:
            self._file.close()  # closing releases the lock
            self._file = None

    def set_aside(self, batch: bytes) -> None:
        """Keep rows PostgreSQL refused as data in ``rejected-<ns>.rejected`` (never replayed)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / f"rejected-{time.time_ns()}.rejected").open("ab") as f:
            f.write(batch)
            f.flush()
            os.fsync(f.fileno())

    def segments(self) -> list[Path]:
        """Segment files in the directory, oldest first (the ones being written included)."""
        try:
            names = sorted(p for p in self.directory.iterdir() if p.name.endswith(SUFFIX))
        except FileNotFoundError:
            return []
        current = self._file.name if self._file is not None else None
        return [p for p in names if str(p) != current]

    def claim(self, path: Path) -> Claim | None:
        """Take a segment for replay: None if another live process is writing or replaying it."""
        try:
            f = path.open("rb")
        except FileNotFoundError:
            return None  # replayed and deleted by someone else meanwhile
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
        if not path.exists():  # deleted between our open and our lock: already replayed
            f.close()
            return None
        return Claim(path, f)


class Claim:
    """A segment locked for replay: read its batches, then ``done()`` (delete) or ``release()``."""

    def __init__(self, path: Path, file: BinaryIO) -> None:
        self.path = path
        self._file = file

    def lines(self) -> list[bytes]:
        """The segment's batches, one line each (a torn last line included: the caller skips it)."""
        return [line for line in self._file.read().split(b"\n") if line.strip()]

    def done(self) -> None:
        """Every batch is in PostgreSQL: delete the segment, then unlock it."""
        self.path.unlink(missing_ok=True)
        self._file.close()

    def release(self) -> None:
        self._file.close()
