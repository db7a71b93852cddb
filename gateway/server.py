"""The uvicorn server the gateway runs in (one worker; with several, uvicorn's own)."""

from __future__ import annotations

import asyncio
from types import FrameType

import uvicorn


class QuietServer(uvicorn.Server):
    """uvicorn's server with its housekeeping tick once a second instead of ten times.

    uvicorn's main loop wakes every 0.1 s to refresh the Date header (which changes once a
    second) and to look for a stop request; on an idle gateway those wake-ups were most of
    its CPU (docs/benchmarks.md, idle burn). Here it sleeps a second, or until a stop is asked.
    """

    _wake: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        counter = 0
        while not await self.on_tick(counter):
            # on_tick refreshes the Date header when counter % 10 == 0
            counter = (counter + 10) % 864000
            try:
                async with asyncio.timeout(1.0):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self.wake()

    def wake(self) -> None:
        """Look at ``should_exit`` now rather than at the next tick (any thread)."""
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)
