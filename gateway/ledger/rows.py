"""One ledger row per request: its columns, how an Exchange becomes one, and the spool's codec.

The hot path appends ``(wall_clock, exchange, known_model)`` and nothing else; the row is built
here, in the writer's task, when it is written (so the cost uses the prices of that moment).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from random import getrandbits
from typing import Any

import orjson

from gateway.ledger.pricing import PriceTable
from gateway.pipeline.exchange import Exchange
from gateway.redact import redact

# Order of the columns in a row tuple, in COPY and in the spool (the events table's columns).
COLUMNS: tuple[str, ...] = (
    "ts",  # timestamptz: when the request arrived (UTC); the partition key
    "id",  # bigint: unique per row with ts (random 63 bits); the idempotency key of inserts
    "request_id",  # text: the X-Request-Id the client got (the client's own if it sent one)
    "endpoint",
    "subject",
    "credential",  # the API key's sha256 prefix or the JWT's jti; never a secret
    "team",
    "tier",
    "via",
    "route",
    "requested_model",
    "model",
    "backend",
    "provider",  # "local", the external provider's label, or "-" (never reached a backend)
    "stream",
    "status",  # HTTP status; 499 when the client left before the response started
    "error_reason",
    "fault",
    "prompt_tokens",
    "completion_tokens",
    "ttft_ms",
    "duration_ms",
    "queue_wait_ms",
    "fallback",
    "client_disconnected",
    "cost_usd",  # numeric: USD from the price table at write time; 0 for a cache hit
    "cache",  # hit, miss, bypass, or NULL (cache off / not looked up); migration 0004
    "cost_saved_usd",  # numeric: what a cache hit's tokens would have cost; 0 otherwise
)
# The columns before migration 0004 (a schema not yet upgraded, and rows spooled by earlier versions).
COLUMNS_0003: tuple[str, ...] = COLUMNS[:-2]
# A row as the writer holds and spools it: the events' columns, then what a capture keeps.
ROW_COLUMNS: tuple[str, ...] = (*COLUMNS, "messages", "completion")
COST = COLUMNS.index("cost_usd")
SAVED = COLUMNS.index("cost_saved_usd")
Row = tuple[Any, ...]
Pending = tuple[float, Exchange, bool]  # (time.time() at the end, the exchange, model known)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_TEXT = 256  # client-chosen strings (model names) are bounded in the table


def provider_of(ex: Exchange) -> str:
    """``local``, the external provider's label (a fallback), or ``-`` (never reached one)."""
    if ex.fallback is not None:
        return ex.backend or "-"
    if ex.cache == "hit":
        return "cache"
    return "local" if ex.backend is not None else "-"


def cost_of(ex: Exchange, prices: PriceTable) -> Decimal:
    """USD of a finished request at today's prices (the external provider's rate for a fallback)."""
    provider = provider_of(ex) if ex.fallback is not None else None
    return prices.cost(ex.model, provider, ex.prompt_tokens, ex.completion_tokens)


def to_row(item: Pending, prices: PriceTable) -> Row:
    """The row of one finished request."""
    wall, ex, known = item
    p = ex.principal
    start = wall - (ex.finished - ex.started)
    external = ex.fallback is not None
    provider = provider_of(ex)
    model = ex.model if known else ex.model[:_MAX_TEXT]
    status = 499 if ex.disconnected and not ex.response_started else ex.status
    return (
        _EPOCH + timedelta(seconds=start),
        getrandbits(63),
        ex.request_id,
        ex.endpoint,
        p.subject,
        p.credential,
        p.team,
        p.tier,
        p.via,
        ex.route,
        None if ex.requested_model is None else ex.requested_model[:_MAX_TEXT],
        model,
        ex.backend,
        provider,
        ex.stream,
        status,
        "client_disconnect" if ex.disconnected else ex.reason,
        None if ex.fault is None else ex.fault.value,
        ex.prompt_tokens,
        ex.completion_tokens,
        None if ex.ttft is None else ex.ttft * 1000.0,
        (ex.finished - ex.started) * 1000.0,
        ex.queue_wait * 1000.0,
        ex.fallback,
        ex.disconnected,
        *_costs(ex, prices, model, provider if external else None),
        *(_captured(ex) if ex.messages is not None and ex.cache != "hit" else (None, None)),
    )


_ZERO = Decimal(0)


def _costs(ex: Exchange, prices: PriceTable, model: str, provider: str | None) -> tuple[Any, ...]:
    """(cost_usd, cache, cost_saved_usd): a cache hit costs nothing and saves its tokens' price."""
    cost = prices.cost(model, provider, ex.prompt_tokens, ex.completion_tokens)
    if ex.cache == "hit":
        return _ZERO, "hit", cost
    return cost, ex.cache, _ZERO


def _captured(ex: Exchange) -> tuple[str, str | None]:
    """The messages (JSON text, each text content redacted) and the completion (redacted)."""
    messages = [_redacted(m) for m in ex.messages or ()]
    completion = redact("".join(ex.capture)) if ex.capture is not None else None
    return orjson.dumps(messages).decode(), completion


def _redacted(message: object) -> object:
    """A message with its text content and its tool calls' arguments redacted."""
    if not isinstance(message, dict):
        return message
    out = dict(message)
    content = message.get("content")
    if isinstance(content, str):
        out["content"] = redact(content)
    elif isinstance(content, list):
        out["content"] = [
            {**p, "text": redact(p["text"])} if isinstance(p, dict) and isinstance(p.get("text"), str) else p
            for p in content
        ]
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        out["tool_calls"] = [
            {**c, "function": _redacted_call(c["function"])} if isinstance(c, dict) and "function" in c else c
            for c in calls
        ]
    if "function_call" in message:  # the legacy single call
        out["function_call"] = _redacted_call(message["function_call"])
    return out


def _redacted_call(call: object) -> object:
    if isinstance(call, dict) and isinstance(call.get("arguments"), str):
        return {**call, "arguments": redact(call["arguments"])}
    return call


def encode_batch(rows: list[Row]) -> bytes:
    """One spool line: the rows as a JSON array (ts as integer microseconds, cost as a string)."""
    out = []
    for r in rows:
        ts: datetime = r[0]
        delta = ts - _EPOCH
        micros = (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
        out.append((micros, *r[1:COST], str(r[COST]), r[COST + 1], str(r[SAVED]), *r[SAVED + 1 :]))
    return orjson.dumps(out) + b"\n"


def decode_batch(line: bytes) -> list[Row]:
    """The rows of one spool line. Raises ValueError on a line that is not one (a torn write)."""
    data = orjson.loads(line)
    if not isinstance(data, list):
        raise ValueError("not a batch")
    rows: list[Row] = []
    old = len(ROW_COLUMNS) - 2  # a row spooled before migration 0004: no cache columns
    for r in data:
        if not isinstance(r, list) or len(r) not in (len(ROW_COLUMNS), old):
            raise ValueError("not a row")
        if len(r) == old:
            r = [*r[: COST + 1], None, "0", *r[COST + 1 :]]
        rows.append(
            (
                _EPOCH + timedelta(microseconds=r[0]),
                *r[1:COST],
                Decimal(r[COST]),
                r[COST + 1],
                Decimal(r[SAVED]),
                *r[SAVED + 1 :],
            )
        )
    return rows


def without_cache_columns(rows: list[Row]) -> list[Row]:
    """Rows for a schema before migration 0004 (``COLUMNS_0003`` + the capture's two)."""
    return [(*r[: COST + 1], *r[SAVED + 1 :]) for r in rows]
