"""What an upload is checked for as it streams: its size, and for batch input UTF-8 and lines."""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator

from gateway.errors import InvalidRequest, PayloadTooLarge


class UploadCheck:
    """Counts and checks an upload as it streams: bytes (refused past ``max_bytes``), lines and
    UTF-8 validity (measured always; refused as it streams when ``max_lines`` is given)."""

    def __init__(self, max_bytes: int, max_lines: int | None) -> None:
        self.max_bytes = max_bytes
        self.max_lines = max_lines
        self.bytes = 0
        self.newlines = 0
        self.last = b""
        self.utf8 = True
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    async def wrap(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            if not chunk:
                continue
            self.bytes += len(chunk)
            if self.bytes > self.max_bytes:
                raise PayloadTooLarge(
                    f"The file exceeds the largest upload allowed here, {self.max_bytes} bytes.", param="file"
                )
            self._decode(chunk, final=False)
            self.newlines += chunk.count(b"\n")
            self.last = chunk[-1:]
            if self.max_lines is not None:
                self.check_batch(self.max_lines)
            yield chunk
        self._decode(b"", final=True)
        if self.max_lines is not None:
            self.check_batch(self.max_lines)

    @property
    def lines(self) -> int:
        """Lines as ``wc -l`` counts them, plus an unterminated last one."""
        return self.newlines + (1 if self.last not in (b"", b"\n") else 0)

    def _decode(self, chunk: bytes, final: bool) -> None:
        if not self.utf8:
            return
        try:
            self._decoder.decode(chunk, final)
        except UnicodeDecodeError:
            self.utf8 = False

    def check_batch(self, max_lines: int) -> None:
        """Raise ``InvalidRequest`` if what was seen cannot be a batch input file."""
        if not self.utf8:
            raise InvalidRequest(
                "A batch input file must be UTF-8 encoded JSON Lines.", param="file", code="invalid_file"
            )
        if self.lines > max_lines:
            raise InvalidRequest(
                f"A batch input file may have at most {max_lines} lines.", param="file", code="too_many_lines"
            )
