"""Server-sent events: cut a backend's byte stream into whole events, in linear time.

The framing is the WHATWG HTML standard's ("Interpreting an event stream", §9.2.6): lines end
in CRLF, LF or a lone CR; a blank line ends an event; ``data:`` with or without one space;
lines starting with ``:`` are comments; ``event:``, ``id:`` and ``retry:`` are fields; several
``data:`` lines join with ``\\n``. vLLM only ever sends ``data: {json}\\n\\n``; the external
providers behind the fallback need not.

Output is always the *canonical* form the rest of the relay parses and the OpenAI SDK reads:
``data: <payload>\\n\\n`` per event. Input already in that form (vLLM's) is returned as the very
bytes that arrived, without re-serialising; anything else is parsed and written out canonically
(comments, ``id:`` and ``retry:`` dropped: the gateway never reconnects to a backend).

Every byte is searched once: the boundary search runs over the bytes that just arrived, and
an unfinished event waits as a list of parts joined once it ends. An unfinished event longer
than the limit raises :class:`EventTooLarge` (a backend that never ends its event must not
cost the gateway unbounded memory).
"""

from __future__ import annotations

import re

import orjson

_EOL = re.compile(rb"\r\n|\r|\n")


class EventTooLarge(Exception):
    """The backend's unfinished SSE event grew past the limit (bytes held, in ``args[0]``)."""


def is_canonical(events: bytes) -> bool:
    """Whole events (ending in ``\\n\\n``) that are each exactly one ``data: `` line and nothing else.

    Given the final ``\\n\\n``, every other LF must sit in a ``\\n\\ndata: `` (one per further event):
    two C-speed counts of a few hundred bytes, the price of keeping vLLM's stream a byte relay.
    """
    return (
        events.startswith(b"data: ")
        and events.endswith(b"\n\n")
        and events.count(b"\n") == 2 * events.count(b"\n\ndata: ") + 2
    )


def canonical_event(payload: bytes, event_type: bytes = b"") -> bytes:
    """One event in the canonical form.

    A JSON payload spread over several ``data:`` lines becomes one line (a raw newline in JSON
    text can only be insignificant whitespace); other multi-line payloads keep one ``data:`` line
    per line, as the standard requires. An ``event: error`` whose payload is not already
    ``{"error": ...}`` is wrapped so: OpenAI's clients recognise errors by that key.
    """
    if b"\n" in payload:
        if payload.lstrip()[:1] in (b"{", b"["):
            payload = payload.replace(b"\n", b" ")
        else:
            return b"".join(b"data: " + line + b"\n" for line in payload.split(b"\n")) + b"\n"
    if event_type == b"error":
        try:
            parsed = orjson.loads(payload)
        except orjson.JSONDecodeError:
            parsed = payload.decode(errors="replace")
        if not (isinstance(parsed, dict) and "error" in parsed):
            payload = orjson.dumps({"error": parsed})
    return b"data: " + payload + b"\n\n"


class SseSplitter:
    """Feed it the bytes of one SSE stream as they arrive; it returns the events completed so far.

    ``feed(data) -> bytes``: zero or more whole events in the canonical form (``b""`` while the
    current event is unfinished). Raises :class:`EventTooLarge` when more than ``limit`` bytes of
    one unfinished event are held.

    Two modes: while the stream has shown no CR the boundary is ``\\n\\n`` and canonical runs pass
    through as they are (the vLLM fast path); the first CR switches the stream to the full line
    parser for good (CRLF and CR framings).
    """

    __slots__ = (
        "_data",
        "_data_size",
        "_event",
        "_limit",
        "_line",
        "_line_size",
        "_lines",
        "_parts",
        "_size",
        "_skip_lf",
    )

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[bytes] = []  # LF mode: the unfinished event's bytes
        self._size = 0
        self._lines = False  # switched to the line parser (a CR was seen)
        self._line: list[bytes] = []  # line parser: the unfinished line
        self._line_size = 0
        self._skip_lf = False  # the last byte was a CR: an LF right after it belongs to it
        self._data: list[bytes] = []  # line parser: the event's data lines
        self._data_size = 0
        self._event = b""

    @property
    def pending(self) -> int:
        """Bytes held for the unfinished event."""
        return self._line_size + self._data_size if self._lines else self._size

    def feed(self, data: bytes) -> bytes:
        if (
            not self._parts
            and not self._lines
            and data.startswith(b"data: ")
            and data.endswith(b"\n\n")
            and b"\r" not in data
        ):
            # vLLM's case: whole canonical events, nothing pending. Returned as they came.
            lf = data.count(b"\n")
            if lf == 2 or lf == 2 * data.count(b"\n\ndata: ") + 2:
                return data
        if not data:
            return b""
        if self._lines:
            return self._parse(data)
        if b"\r" in data:
            self._lines = True
            if self._parts:
                data = b"".join(self._parts) + data
                self._parts.clear()
                self._size = 0
            return self._parse(data)
        end = data.rfind(b"\n\n")
        parts = self._parts
        if end < 0:
            if not (parts and data[:1] == b"\n" and parts[-1][-1:] == b"\n"):
                self._hold(data)
                return b""
            end = -1  # the blank line straddles the two reads
        cut = end + 2
        if parts:
            held = self._size + max(0, data.find(b"\n\n"))  # the event this read completes
            if held > self._limit:
                raise EventTooLarge(held)
            parts.append(data[:cut])
            events = b"".join(parts)
            parts.clear()
            self._size = 0
        else:
            events = data if cut == len(data) else data[:cut]
        if cut < len(data):
            self._hold(data[cut:])
        if is_canonical(events):
            return events
        return self._parse(events)

    def _hold(self, part: bytes) -> None:
        self._parts.append(part)
        self._size += len(part)
        if self._size > self._limit:
            raise EventTooLarge(self._size)

    def _parse(self, data: bytes) -> bytes:
        """The standard's line parser over ``data``, continuing the unfinished line and event."""
        if self._skip_lf:
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
        out: list[bytes] = []
        pos = 0
        line_parts = self._line
        for m in _EOL.finditer(data):
            line = data[pos : m.start()]
            if line_parts:
                line_parts.append(line)
                line = b"".join(line_parts)
                line_parts.clear()
                self._line_size = 0
            self._field(line, out)
            pos = m.end()
        if data.endswith(b"\r"):
            self._skip_lf = True
        if pos < len(data):
            line_parts.append(data[pos:])
            self._line_size += len(data) - pos
        if self._line_size + self._data_size > self._limit:
            raise EventTooLarge(self._line_size + self._data_size)
        return b"".join(out)

    def _field(self, line: bytes, out: list[bytes]) -> None:
        if not line:
            if self._data:
                out.append(canonical_event(b"\n".join(self._data), self._event))
                self._data.clear()
                self._data_size = 0
            self._event = b""
            return
        if line[:1] == b":":
            return  # a comment
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
            self._data_size += len(value) + 1
        elif name == b"event":
            self._event = value
        # id and retry: only a reconnecting client needs them; other names are ignored (the standard)
