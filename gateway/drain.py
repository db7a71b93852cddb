"""Graceful drain on SIGTERM (rolling deploy, spot reclaim).

uvicorn's own SIGTERM handling closes the listener at once and only then
waits for open connections, so a load balancer still routing here sees
connection refusals, and `/ready` never says "going away". Instead, the
lifespan takes SIGTERM/SIGINT over: `/ready` turns 503 at once, new
proxied requests get 503 + Retry-After, requests and streams in flight run
to completion (up to ``server.drain_seconds``), and only then is uvicorn's
original handler called to stop the server. A second signal ends the drain at once
(the requests still running are cut as below).

When the drain ends with proxied requests still running, the gateway cuts them
itself rather than leaving them to uvicorn (which would wait its own
``timeout_graceful_shutdown`` and then cancel them: a text/plain 500, a stream
cut without an error event, "Exception in ASGI application"). Each request's task
is cancelled with ``cutting`` set; the proxy sees that, not a client disconnect, and
ends the request in OpenAI's shape: 503 ``shutting_down`` with Retry-After before
the response started, a final SSE error event and ``data: [DONE]`` after. The
cancellation unwinds the upstream call (vLLM aborts the generation) and frees the
admission slot and the limit lease on the way. Either way the process exits with
status 0 once uvicorn has shut down, and the last log lines are written.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import structlog
import uvicorn

Handler = Callable[[int, FrameType | None], Any] | int | None

CUT_GRACE = 1.0
"""Seconds the requests cut at the end of the drain get to send their last words (the 503 or
the final SSE event) before uvicorn is told to stop: a client that does not read them is not
waited for longer."""


class Drain:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.tasks: set[asyncio.Task[Any]] = set()  # proxied requests in progress in this process
        self.cutting = False  # the drain is over: the tasks still in ``tasks`` are being ended
        self.since: float | None = None  # monotonic time the drain began
        self._previous: dict[int, Handler] = {}
        self._task: asyncio.Task[None] | None = None
        self._forced = False  # a second signal: end the drain now
        self._log = structlog.get_logger("gateway.drain")

    @property
    def active(self) -> int:
        """Proxied requests in progress in this process."""
        return len(self.tasks)

    @property
    def draining(self) -> bool:
        return self.since is not None

    def install(self) -> None:
        """Take over SIGTERM/SIGINT from uvicorn (call inside the running loop)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.getsignal(sig)
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                self._previous.pop(sig, None)

    def _on_signal(self, sig: int) -> None:
        if self.since is not None:
            # A second signal ends the drain now: the requests still running are cut as at the
            # deadline, then uvicorn stops as usual (not forced: its lifespan shutdown still runs).
            self._forced = True
            return
        self.since = time.monotonic()
        self._log.warning(
            "draining", signal=signal.Signals(sig).name, in_flight=self.active, timeout=self.timeout
        )
        self._task = asyncio.get_running_loop().create_task(self._wait_then_stop(sig))

    async def _wait_then_stop(self, sig: int) -> None:
        assert self.since is not None
        deadline = self.since + self.timeout
        while self.tasks and time.monotonic() < deadline and not self._forced:
            await asyncio.sleep(0.05)
        if self.tasks:
            await self._cut()
        self._log.warning(
            "drain finished", in_flight=self.active, seconds=round(time.monotonic() - self.since, 3)
        )
        self._hand_over(sig)

    async def _cut(self) -> None:
        """End the requests still running: each task is cancelled with ``cutting`` set, and the
        proxy answers it 503 ``shutting_down`` (or ends its stream with that error event)."""
        self.cutting = True
        self._log.warning("drain over: ending the requests in flight", in_flight=self.active)
        for task in self.tasks:
            task.cancel()
        end = time.monotonic() + CUT_GRACE
        while self.tasks and time.monotonic() < end:
            await asyncio.sleep(0.01)

    def _hand_over(self, sig: int) -> None:
        loop = asyncio.get_running_loop()
        for s, handler in self._previous.items():
            loop.remove_signal_handler(s)
            signal.signal(s, handler)
        previous = self._previous.get(sig)
        server = getattr(previous, "__self__", None)
        if isinstance(server, uvicorn.Server):
            # Stop uvicorn without handing it the signal: it re-raises the signals it caught once
            # it has shut down, and a process killed by SIGTERM exits 143 without running its
            # atexit handlers (the log writer's flush, coverage), losing its last log lines.
            # Kubernetes and ECS stop containers with SIGTERM: a drained stop is a clean exit 0.
            server.should_exit = True
            wake = getattr(server, "wake", None)
            if callable(wake):
                wake()
        elif callable(previous):
            previous(sig, None)
        else:
            signal.raise_signal(sig)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the rest of the drain, at least 1."""
        if self.since is None:
            return 1
        return max(1, int(self.since + self.timeout - time.monotonic()) + 1)
