"""Per-attempt deadlines: their own first byte, capped by the total; plain requests wait for the total."""

from __future__ import annotations

from gateway.errors import Fault, TotalTimeout, UpstreamTimeout
from gateway.pipeline.attempt import Deadlines


def test_each_attempt_gets_its_own_first_byte_deadline() -> None:
    first = Deadlines.for_attempt(100.0, 2.0, 160.0)
    retry = Deadlines.for_attempt(102.5, 2.0, 160.0)  # after the first one timed out
    assert first.first_byte == 102.0
    assert retry.first_byte == 104.5


def test_the_first_byte_deadline_never_passes_the_total() -> None:
    d = Deadlines.for_attempt(100.0, 120.0, 101.0)
    assert d.first_byte == 101.0
    assert d.is_total(d.first_byte)  # when it fires, it is the total deadline that fired


def test_a_plain_request_waits_for_its_headers_until_the_total() -> None:
    d = Deadlines.for_attempt(100.0, 2.0, 160.0)
    assert d.headers(stream=True) == 102.0
    assert d.headers(stream=False) == 160.0  # vLLM sends them only when generation has ended
    assert not d.is_total(d.headers(stream=True))


def test_blame_of_the_timeouts() -> None:
    assert UpstreamTimeout("x", code="first_byte_timeout").fault is Fault.BACKEND
    total = TotalTimeout("x")
    assert total.fault is Fault.DEADLINE and total.code == "total_timeout" and not total.retryable
