"""A deadline for one call to a storage (Redis) that does not count this process's own event-loop
lag: the limiter's counters (gateway/pipeline/counters.py) and the response cache
(gateway/cache/store.py) give up on a call that Redis did not answer in time, never on one whose
answer was waiting in the socket while the loop was busy with other requests.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class _Deadline:
    """``timeout`` seconds for one Redis call, not counting this process's own event-loop lag.

    Under a burst the loop can be busy for longer than the timeout while Redis' answer
    already waits in the socket: the timer then fires late, in the same loop turn as that
    answer, before the call could read it. Failing open on that would admit requests nobody
    counted, so a timer that fires late by more than a tenth of the timeout waits once more
    (one more ``timeout``), up to ``MAX_EXTENSIONS`` times while the lag lasts (each late
    turn may be the one the answer arrived in); a timer that fires on time means Redis is
    slow or gone. A call is thus abandoned within ``(1 + MAX_EXTENSIONS) x timeout`` plus
    the loop's own lag.
    """

    MAX_EXTENSIONS = 4

    __slots__ = ("extensions", "handle", "loop", "timeout", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, timer: asyncio.Timeout, timeout: float) -> None:
        self.loop, self.timer, self.timeout = loop, timer, timeout
        self.extensions = 0
        when = loop.time() + timeout
        self.handle = loop.call_at(when, self._fire, when)

    def _fire(self, when: float) -> None:
        now = self.loop.time()
        if self.extensions < self.MAX_EXTENSIONS and now - when > self.timeout / 10:
            self.extensions += 1
            self.handle = self.loop.call_at(now + self.timeout, self._fire, now + self.timeout)
            return
        self.timer.reschedule(now)


class storage_timeout:
    """``async with storage_timeout(seconds):`` raises ``TimeoutError`` once the call took
    ``seconds``, not counting loop lag (``_Deadline``). Costs one ``asyncio.Timeout`` and one
    timer handle, as ``asyncio.timeout`` does."""

    __slots__ = ("_deadline", "_seconds", "_timer")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    async def __aenter__(self) -> None:
        self._timer = asyncio.timeout(None)
        await self._timer.__aenter__()
        self._deadline = _Deadline(asyncio.get_running_loop(), self._timer, self._seconds)

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._deadline.handle.cancel()
        await self._timer.__aexit__(kind, exc, tb)
