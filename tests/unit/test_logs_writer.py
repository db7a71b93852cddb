"""The log writer's thread (gateway/logs.py) outlives a reader that went away."""

from __future__ import annotations

import os
import threading

from gateway.logs import BackgroundWriter


def test_a_reader_gone_does_not_kill_the_writer_thread() -> None:
    """stdout a pipe whose reader exited (EPIPE), or a stream closed under the writer: the lines
    cannot be read by anyone, and the thread keeps draining instead of dying with a traceback
    (and close() still ends it)."""
    r, w = os.pipe()
    os.close(r)
    stream = os.fdopen(w, "w")
    died: list[type[BaseException]] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: died.append(args.exc_type)
    try:
        writer = BackgroundWriter(stream)
        writer.write("one\n")  # not on an event loop: handed over at once
        writer.write("two\n")
        writer.close()
        stream2 = open(os.devnull, "w")  # noqa: SIM115 - closed before the writer uses it
        stream2.close()
        closed = BackgroundWriter(stream2)
        closed.write("three\n")
        closed.close()
    finally:
        threading.excepthook = previous
        try:
            stream.close()
        except OSError:
            pass
    assert died == []
    assert not writer._thread.is_alive() and not closed._thread.is_alive()
