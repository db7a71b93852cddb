"""structlog set-up: JSON lines on stdout, uvicorn's stdlib logs through the same pipeline.

The request id is bound with contextvars by the proxy, so every line logged
while a request is handled carries it. Nothing here logs prompt or
completion text; the audit line (gateway.pipeline.account) carries counts only.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime
import logging
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

import orjson
import structlog

from gateway.config import LoggingSettings


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


BATCH_SECONDS = 0.05


class BackgroundWriter:
    """A file-like sink whose writes return at once; a thread does the blocking write.

    Keeps the write syscall (and a slow log pipe) off the event loop: a queue
    put costs well under a microsecond. Lines are handed over in batches: the
    first line of a batch arms a 50 ms timer on the event loop, which wakes the
    thread once for everything written meanwhile. Waking the thread per line
    (futex, GIL hand-over, write, flush) cost 50-100 µs of the event loop's time
    per request; waking it on a fixed 50 ms tick cost 20 wake-ups a second with
    nothing to write (docs/benchmarks.md). Drained at exit so no line is lost.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._armed = False  # a hand-over timer is pending on the event loop
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def write(self, text: str) -> int:
        self._queue.put(text)
        if not self._armed:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on an event loop (start-up, CLI, another thread): now
                self._wake.set()
            else:
                self._armed = True
                loop.call_later(BATCH_SECONDS, self._hand_over)
        return len(text)

    def _hand_over(self) -> None:
        self._armed = False
        self._wake.set()

    def flush(self) -> None:
        pass

    def _run(self) -> None:
        q, stream = self._queue, self._stream
        while True:
            self._wake.wait()
            self._wake.clear()
            lines: list[str] = []
            done = False
            while True:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    done = True
                    break
                lines.append(item)
            if lines:
                try:
                    stream.write("".join(lines))
                    stream.flush()
                except (ValueError, OSError):
                    # The stream was closed under us (a reader gone: EPIPE; a test's captured
                    # stdout): nobody can read these lines any more, and the thread keeps draining
                    # rather than dying with a traceback per batch.
                    pass
            if done:
                return

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._wake.set()
            self._thread.join(timeout=5)


_writer: BackgroundWriter | None = None


def _sink() -> BackgroundWriter:
    global _writer  # one writer per process: the process has one stdout
    if _writer is None:
        _writer = BackgroundWriter(sys.stdout)
    return _writer


def configure_logging(settings: LoggingSettings) -> None:
    level = getattr(logging, settings.level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if settings.format == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)

    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(_sink()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )

    # uvicorn (and any library) logs via stdlib logging: render them the same way.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(_sink())
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "httpx"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # The proxy writes its own audit line per request; uvicorn's access log would double it.
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))


def audit_writer(settings: LoggingSettings, sink: Any = None) -> Callable[[dict[str, Any]], None] | None:
    """A writer for the per-request audit line that skips structlog's processor chain.

    It writes the line the JSON pipeline above would render (the fields, ``event``,
    ``request_id``, ``level``, ``timestamp``) at a third of the cost. None when the line
    would not be JSON or the level hides it: then structlog logs it.
    """
    if settings.format != "json" or getattr(logging, settings.level.upper()) > logging.INFO:
        return None
    sink = sink or _sink()
    now, utc = datetime.datetime.now, datetime.UTC

    def write(fields: dict[str, Any]) -> None:
        # The caller puts in ``event`` and the bound ``request_id`` (a copy of the whole context
        # per line would cost more than the rest of the line).
        fields["level"] = "info"
        fields["timestamp"] = now(utc).isoformat().replace("+00:00", "Z")
        sink.write(orjson.dumps(fields).decode() + "\n")

    return write


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
