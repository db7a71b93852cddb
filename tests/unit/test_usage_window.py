"""The end of a usage query (gateway/ledger/api.py ``bucket_end``).

Without ``end_time`` the query covers everything up to now. ``int(now)`` at 120.3 s was 120, a
minute's edge: the 1m buckets stopped before the current minute, and rows written in its first
second were missing from the answer though they were in the ledger (a CI run of
tests/test_usage_api_filters.py found 5 of 7 rows; tests/test_cache_ledger.py once found none).
"""

from __future__ import annotations

import pytest

from gateway.ledger.api import bucket_end


@pytest.mark.parametrize(
    ("now", "width", "end"),
    [
        (120.3, 60, 180),  # the first second of a minute: that minute is included (was 120)
        (120.0, 60, 180),  # exactly on the edge: a row written at 120.0 is in [120, 180)
        (119.5, 60, 120),
        (3600.2, 3600, 7200),
        (86399.9, 86400, 86400),
    ],
)
def test_without_end_time_the_current_second_and_its_bucket_are_included(
    now: float, width: int, end: int
) -> None:
    assert bucket_end(None, now, width) == end


def test_an_explicit_end_time_is_exclusive_and_rounded_up_to_a_bucket() -> None:
    assert bucket_end(120, 500.0, 60) == 120
    assert bucket_end(121, 500.0, 60) == 180
    assert bucket_end(7201, 0.0, 3600) == 10800
