"""A ``multipart/form-data`` request body read as a stream of parts, never held whole.

python-multipart's push parser (callbacks) is driven from the body's chunks as they arrive;
its events are handed out one at a time, so memory holds one received chunk and the events it
produced. Used by ``POST /v1/files`` (gateway/jobs/files_api.py) to pass the file part straight
to the file store.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from gateway.errors import InvalidRequest, PayloadTooLarge

MAX_FIELD_BYTES = 4096  # a form field other than the file (purpose, expires_after[...])


@dataclass(slots=True)
class Part:
    """One part's head: its form field ``name`` and, for a file, the ``filename`` it was sent as."""

    name: str
    filename: str | None
    headers: dict[str, str] = field(default_factory=dict)


def form_boundary(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/form-data`` content type; ``InvalidRequest`` otherwise."""
    kind, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidRequest("Send the upload as multipart/form-data (fields `file` and `purpose`).")
    return boundary


class FormStream:
    """Parts of a multipart body in order: :meth:`next_part`, then :meth:`data` or :meth:`text`.

    ``max_bytes`` bounds the whole body (413 ``PayloadTooLarge`` past it). Raises
    ``InvalidRequest`` for a malformed body or one that ends early.
    """

    def __init__(self, body: AsyncIterator[bytes], boundary: bytes, max_bytes: int) -> None:
        self._body = body
        self._max_bytes = max_bytes
        self._received = 0
        # (kind, data): "head" with the part's headers (a dict of its own), "data" with bytes
        self._events: deque[tuple[str, bytes | dict[str, str]]] = deque()
        self._done = False
        self._field = b""
        self._value = b""
        self._headers: dict[str, str] = {}
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
        )

    # python-multipart callbacks: they only record events
    def _on_part_begin(self) -> None:
        self._headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._field.decode("latin-1").lower()] = self._value.decode("utf-8", "replace")
        self._field = self._value = b""

    def _on_headers_finished(self) -> None:
        self._events.append(("head", self._headers))

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._events.append(("data", data[start:end]))

    def _on_part_end(self) -> None:
        self._events.append(("end", b""))

    def _on_end(self) -> None:
        self._events.append(("finished", b""))

    async def _read(self) -> bytes | None:
        """The body's next chunk (counted against ``max_bytes``), or None at its end."""
        try:
            chunk = await anext(self._body)
        except StopAsyncIteration:
            self._done = True
            return None
        self._received += len(chunk)
        if self._received > self._max_bytes:
            raise PayloadTooLarge(f"The request body exceeds {self._max_bytes} bytes.", param="file")
        return chunk

    async def _next_event(self) -> tuple[str, bytes | dict[str, str]]:
        while not self._events:
            if self._done:
                raise InvalidRequest("The multipart body ended before its closing boundary.")
            chunk = await self._read()
            if chunk is None:
                continue
            try:
                self._parser.write(chunk)
            except MultipartParseError as exc:
                raise InvalidRequest(f"Malformed multipart body: {exc}") from None
        return self._events.popleft()

    async def next_part(self) -> Part | None:
        """The next part's head, or ``None`` after the last part. The previous part's content,
        if not read, is skipped."""
        while True:
            kind, headers = await self._next_event()
            if kind == "finished":
                return None
            if isinstance(headers, dict):
                disposition, options = parse_options_header(headers.get("content-disposition"))
                name = options.get(b"name")
                if disposition != b"form-data" or name is None:
                    raise InvalidRequest(
                        "Each part of the form needs `Content-Disposition: form-data; name=...`."
                    )
                filename = options.get(b"filename")
                return Part(
                    name.decode("utf-8", "replace"),
                    filename.decode("utf-8", "replace") if filename is not None else None,
                    headers,
                )

    async def finish(self) -> None:
        """Read the request body to its end after the closing boundary (an epilogue, or nothing):
        a form is complete only with the whole body its ``Content-Length`` announced, so an
        upload whose body never arrives in full is never kept. Raises as :meth:`next_part`, and
        whatever the body raises (a client gone)."""
        while not self._done:
            await self._read()

    async def data(self) -> AsyncIterator[bytes]:
        """The current part's content, chunk by chunk, as it arrives."""
        while True:
            kind, chunk = await self._next_event()
            if kind == "end":
                return
            if isinstance(chunk, bytes) and chunk:
                yield chunk

    async def text(self, limit: int = MAX_FIELD_BYTES) -> str:
        """The current part's content as UTF-8 text of at most ``limit`` bytes."""
        value = b""
        async for chunk in self.data():
            value += chunk
            if len(value) > limit:
                raise InvalidRequest(f"The form field is longer than {limit} bytes.")
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise InvalidRequest("A form field is not UTF-8 text.") from None
