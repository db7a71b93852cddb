"""The limit stage's pure logic in-process: reset text, the estimate and what feeds it, what is
charged, and the limiter over memory counters on an injected clock. Milliseconds each."""

from __future__ import annotations

import gzip
import json
import math
import zlib
from typing import Any

import orjson
import pytest

from gateway.auth.principal import Principal
from gateway.config import ValidationSettings, load_settings
from gateway.errors import InvalidRequest, PayloadTooLarge
from gateway.pipeline.counters import CAP, MemoryCounters
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.limit import LEASE_GRACE, WINDOW, RateLimited, RateLimiter, reset_text
from gateway.pipeline.receive import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    ClientGone,
    UnsupportedMediaType,
    parse,
    read_body,
)
from gateway.proxy import _tokens_used

CEILING = ValidationSettings().max_tokens_ceiling


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


# ----------------------------------------------------------------------------- reset text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0ms"),
        (-3.0, "0ms"),
        (0.25, "250ms"),
        (0.9999, "999ms"),
        (1.0, "1s"),
        (1.2, "2s"),
        (59.0, "59s"),
        (59.001, "1m0s"),
        (60.0, "1m0s"),
        (60.0000000001, "1m0s"),  # end - now in floats: never longer than the window
        (61.0, "1m0s"),  # Redis TTL plus a second of slack: never longer than the window
    ],
)
def test_reset_text(seconds: float, text: str) -> None:
    assert reset_text(seconds) == text


def test_reset_text_of_a_window_ttl_measured_at_any_time_is_within_the_window() -> None:
    for base in (0.1, 1e3 + 0.3, 1e6 + 0.7, 1e9 + 0.123):  # monotonic clocks of long-lived hosts
        end = base + WINDOW
        assert reset_text(end - base) == "1m0s"


# ----------------------------------------------------------------------------- what feeds the estimate


def parsed(endpoint: Any, body: dict[str, Any]) -> Any:
    # json, not orjson: the body may hold integers beyond 64 bits, as a hostile client's may
    return parse(endpoint, json.dumps(body).encode(), ValidationSettings())


CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION_BODY = {"model": "m", "prompt": "hi"}
EMBEDDING_BODY = {"model": "m", "input": "hi"}

HOSTILE = [-1, 0, -(10**15), 10**15, 2**63, 2**64 + 1, 1.5, 600.0, True, False, "600", None, [600]]


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens", "n"])
def test_chat_rejects_every_bad_value_of_a_field_that_feeds_the_reservation(name: str, value: Any) -> None:
    body = {**CHAT_BODY, name: value}
    if value is None:
        assert parsed(CHAT, body).max_tokens is None
        return
    with pytest.raises(InvalidRequest) as info:
        parsed(CHAT, body)
    assert info.value.param == name


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
@pytest.mark.parametrize("name", ["max_tokens", "n"])
def test_completions_reject_every_bad_value_of_a_field_that_feeds_the_reservation(
    name: str, value: Any
) -> None:
    body = {**COMPLETION_BODY, name: value}
    if value is None:
        assert parsed(COMPLETIONS, body).max_tokens is None
        return
    with pytest.raises(InvalidRequest) as info:
        parsed(COMPLETIONS, body)
    assert info.value.param == name


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
def test_completions_ignore_max_completion_tokens_like_vllm(value: Any) -> None:
    """vLLM's CompletionRequest has no max_completion_tokens: it cannot move the reservation."""
    req = parsed(COMPLETIONS, {**COMPLETION_BODY, "max_tokens": 600, "max_completion_tokens": value})
    assert (req.max_tokens, req.n) == (600, 1)


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens", "n"])
def test_embeddings_reserve_no_completion_whatever_the_body_says(name: str, value: Any) -> None:
    req = parsed(EMBEDDINGS, {**EMBEDDING_BODY, name: value})
    assert (req.max_tokens, req.n) == (0, 1)


def test_chat_cap_is_max_completion_tokens_then_max_tokens_like_vllm() -> None:
    assert parsed(CHAT, {**CHAT_BODY, "max_tokens": 7}).max_tokens == 7
    assert parsed(CHAT, {**CHAT_BODY, "max_completion_tokens": 9, "max_tokens": 7}).max_tokens == 9
    assert parsed(CHAT, {**CHAT_BODY, "n": 3}).n == 3
    with pytest.raises(InvalidRequest):
        parsed(CHAT, {**CHAT_BODY, "max_completion_tokens": CEILING + 1})


def who(name: str) -> Principal:
    return Principal(name, None, "t", frozenset(), None, "jwt")


def limiter(**tiers: dict[str, int]) -> tuple[RateLimiter, Clock]:
    settings = load_settings(None, tiers=tiers or {"t": {"tokens_per_minute": 1000}})
    lim = RateLimiter(settings)
    clock = Clock()
    lim.storage = MemoryCounters(lim.lease_seconds, clock=clock)
    return lim, clock


def test_estimate_is_prompt_bytes_plus_n_times_the_cap_and_bounded() -> None:
    lim, _ = limiter()
    assert lim.estimate(10, 100, 2) == math.ceil(10 / 4) + 200
    assert lim.estimate(10, None) == math.ceil(10 / 4) + 1024  # completion_estimate
    assert lim.estimate(10, 0) == 3  # embeddings
    assert lim.estimate(10, -(10**15), -5) == 3  # never below the prompt estimate
    assert lim.estimate(10, 10**40, 10**40) == CAP


# ----------------------------------------------------------------------------- what is charged


async def admitted(lim: RateLimiter, estimate: int = 500) -> Exchange:
    ex = Exchange("rid", "chat", 0.0)
    ex.reservation = await lim.admit(who("alice"), estimate)
    ex.body_bytes = 40
    return ex


async def test_usage_is_charged_when_it_arrived() -> None:
    lim, _ = limiter()
    ex = await admitted(lim)
    ex.upstream_sent, ex.prompt_tokens, ex.completion_tokens = 1.0, 12, 30
    assert _tokens_used(ex, lim) == 42 and ex.tokens_charged == 42
    ex.prompt_tokens, ex.completion_tokens = -(10**18), -5  # a hostile backend
    assert _tokens_used(ex, lim) == 0


async def test_nothing_is_charged_before_a_backend_got_the_request() -> None:
    lim, _ = limiter()
    ex = await admitted(lim)
    ex.reason, ex.status = "queue_full", 429
    assert _tokens_used(ex, lim) == 0 and ex.tokens_charged == 0


async def test_nothing_is_charged_when_the_backend_refused_it() -> None:
    lim, _ = limiter()
    ex = await admitted(lim)
    ex.upstream_sent = ex.upstream_first = 1.0
    ex.status, ex.reason = 400, "upstream_client_error"
    assert _tokens_used(ex, lim) == 0


async def test_the_reservation_stands_once_written_to_a_backend() -> None:
    lim, _ = limiter()
    ex = await admitted(lim, 480)
    ex.upstream_sent = 1.0
    ex.disconnected = True  # a plain request: the client left while vLLM was generating
    assert _tokens_used(ex, lim) == 480 and ex.tokens_charged == 480


async def test_a_cut_stream_is_charged_its_prompt_estimate_and_events() -> None:
    lim, _ = limiter()
    ex = await admitted(lim, 480)
    ex.upstream_sent = ex.upstream_first = 1.0
    ex.stream, ex.events, ex.status = True, 7, 200
    assert _tokens_used(ex, lim) == math.ceil(40 / 4) + 7


# ----------------------------------------------------------------------------- the limiter


async def test_limiter_refund_and_extra_charge_land_in_the_window() -> None:
    lim, _ = limiter()
    p = who("alice")
    res = await lim.admit(p, 600)
    await lim.settle(res, 0)  # refused upstream: the whole reservation comes back
    res = await lim.admit(p, 1000)
    assert res.headers[1] == (b"x-ratelimit-remaining-tokens", b"0")
    await lim.settle(res, 250)
    with pytest.raises(RateLimited):
        await lim.admit(p, 751)
    await lim.admit(p, 750)


async def test_limiter_leases_do_not_drift_across_windows_and_replays() -> None:
    lim, clock = limiter(t={"max_concurrent": 4})
    assert lim.lease_seconds == 600 + LEASE_GRACE
    p = who("bob")
    for _ in range(3):
        held = [await lim.admit(p, 1) for _ in range(4)]
        with pytest.raises(RateLimited):
            await lim.admit(p, 1)
        for res in held:
            await lim.settle(res, 0)
            await lim.settle(res, 0)  # replayed: must not free a second slot
        clock.now += 66  # a window and more goes by
    held = [await lim.admit(p, 1) for _ in range(4)]
    with pytest.raises(RateLimited):
        await lim.admit(p, 1)
    clock.now += lim.lease_seconds + 0.1  # releases lost (a crashed replica): leases expire
    assert len([await lim.admit(p, 1) for _ in range(4)]) == 4
    assert held


async def test_limiter_replays_settlements_that_failed_while_storage_was_down() -> None:
    lim, _ = limiter(t={"max_concurrent": 1, "tokens_per_minute": 1000})
    p = who("carol")
    res = await lim.admit(p, 900)
    working = lim.storage

    class Down:
        slack = 0.0

        async def settle(self, *args: Any) -> None:
            raise ConnectionError("down")

    lim.storage = Down()  # type: ignore[assignment]
    await lim.settle(res, 100)
    await lim.settle(res, 100)  # settled twice while down: both replayed
    lim.storage = working
    res = await lim.admit(p, 900)  # the lease was released, 800 tokens refunded, once
    with pytest.raises(RateLimited):
        await lim.admit(p, 1)


# ----------------------------------------------------------------------------- compressed bodies


def receiver(*chunks: bytes) -> Any:
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    return receive


BODY = orjson.dumps(CHAT_BODY)


@pytest.mark.parametrize("coding", [b"gzip", b"GZIP", b"x-gzip", b" gzip "])
async def test_gzip_body_is_decoded_in_pieces(coding: bytes) -> None:
    packed = gzip.compress(BODY)
    pieces = [packed[i : i + 7] for i in range(0, len(packed), 7)]
    assert await read_body(receiver(*pieces), None, 4096, coding) == BODY


async def test_deflate_body_is_decoded() -> None:
    assert await read_body(receiver(zlib.compress(BODY)), None, 4096, b"deflate") == BODY


async def test_identity_and_no_coding_read_as_is() -> None:
    assert await read_body(receiver(BODY), None, 4096, b"identity") == BODY
    assert await read_body(receiver(BODY[:5], BODY[5:]), None, 4096) == BODY


async def test_a_decompression_bomb_stops_at_the_limit() -> None:
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))  # 64 MiB of zeros in ~64 KiB
    with pytest.raises(PayloadTooLarge):
        await read_body(receiver(bomb), len(bomb), 1024 * 1024, b"gzip")


async def test_a_compressed_body_at_the_limit_passes() -> None:
    exact = b"x" * 4096
    assert await read_body(receiver(gzip.compress(exact)), None, 4096, b"gzip") == exact
    with pytest.raises(PayloadTooLarge):
        await read_body(receiver(gzip.compress(exact + b"x")), None, 4096, b"gzip")


@pytest.mark.parametrize("coding", [b"br", b"zstd", b"compress", b"gzip, br", b"made-up"])
async def test_other_codings_are_415_naming_the_coding(coding: bytes) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        await read_body(receiver(BODY), None, 4096, coding)
    assert coding.decode() in info.value.message
    assert info.value.status == 415 and info.value.code == "unsupported_media_type"
    assert (b"accept-encoding", b"gzip, deflate") in info.value.headers()


async def test_corrupt_or_truncated_gzip_is_400() -> None:
    packed = gzip.compress(BODY)
    for broken in (packed[:-6], b"not gzip at all", packed[:10] + b"\xff" * 20):
        with pytest.raises(InvalidRequest) as info:
            await read_body(receiver(broken), None, 4096, b"gzip")
        assert info.value.code == "invalid_encoding"


async def test_client_gone_while_sending_a_compressed_body() -> None:
    packed = gzip.compress(BODY)
    chunks: list[dict[str, Any]] = [
        {"type": "http.request", "body": packed[:5], "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return chunks.pop(0)

    with pytest.raises(ClientGone):
        await read_body(receive, None, 4096, b"gzip")
