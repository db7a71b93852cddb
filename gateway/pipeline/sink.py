"""Result sinks: where the relay writes a response when no client socket is waiting for it.

The pipeline answers through an ASGI ``send``. A client's request is given uvicorn's; a job line
(gateway/jobs/worker.py) is given a ``ResultSink``, which keeps the status, headers and body so
the worker can store them as the job's result. The same seam serves any consumer that wants the
response instead of the wire (a cache entry, say), without a second copy of the pipeline.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any


class ResultSink:
    """An ASGI ``send`` that keeps one complete response in memory.

    ``status``: the HTTP status (0 until headers were sent); ``headers``: the response headers as
    (lower-case name, value) bytes pairs; ``body()``: the body sent so far. Bounded by what the
    pipeline sends: one non-streamed answer (``stream: true`` is refused for jobs).
    """

    __slots__ = ("_chunks", "complete", "headers", "status")

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._chunks: list[bytes] = []
        self.complete = False

    async def __call__(self, message: MutableMapping[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = int(message["status"])
            self.headers = list(message.get("headers", ()))
        elif kind == "http.response.body":
            body = message.get("body", b"")
            if body:
                self._chunks.append(bytes(body))
            if not message.get("more_body", False):
                self.complete = True

    def body(self) -> bytes:
        return b"".join(self._chunks)

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None
