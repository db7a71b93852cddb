"""structlog set-up: JSON lines on stdout, uvicorn's stdlib logs through the same pipeline.

The request id is bound with contextvars by the proxy, so every line logged
while a request is handled carries it. Nothing here logs prompt or
completion text; the audit line (gateway.pipeline.account) carries counts only.
"""

from __future__ import annotations

import atexit
import logging
import queue
import sys
import threading
import time
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
    put costs well under a microsecond. Drained at exit so no line is lost.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def write(self, text: str) -> int:
        self._queue.put(text)
        return len(text)

    def flush(self) -> None:
        pass

    def _run(self) -> None:
        # Batch every 50 ms instead of waking per line: a put() with no thread waiting on the
        # queue is a plain append, while waking the thread per line (futex, GIL hand-over, write,
        # flush) cost 50-100 µs of the event loop's time per request (docs/benchmarks.md).
        q, stream = self._queue, self._stream
        while True:
            time.sleep(BATCH_SECONDS)
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
                stream.write("".join(lines))
                stream.flush()
            if done:
                return

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
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
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "aiohttp", "httpx"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # The proxy writes its own audit line per request; uvicorn's access log would double it.
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
