"""The ledger writer: a bounded buffer on the hot path, batches to PostgreSQL off it.

``append()`` is all a request pays: one deque append (no I/O, no await, no row building).
A background task wakes every ``flush_interval`` seconds, or when ``batch_rows`` rows wait,
builds the rows (cost from the price table) and writes each batch in one transaction: ``COPY``
into a session-temporary staging table, then ``INSERT ... ON CONFLICT (ts, id) DO NOTHING``
into the partitioned events table, whose ``RETURNING`` rows feed the hourly rollup's upsert in
the same statement, so the rollup counts exactly the rows that were inserted.

When PostgreSQL is down, slow (a batch over ``write_timeout``) or refuses a batch, the batch is
appended to the spool (gateway/ledger/spool.py, fsynced, in a thread) and PostgreSQL is probed
every ``retry_interval`` seconds; once it answers, the spool is replayed before new rows.
Inserts are idempotent, so a replay repeated after a crash never duplicates a row.

What can be lost, worst case: the rows still in the buffer when the process is killed without
its shutdown (SIGKILL, OOM, power loss): up to ``flush_interval`` seconds of traffic (at most
``batch_rows``-ish rows while PostgreSQL is up; the same while it is down, since each cycle
spools what it took), plus a batch taken from the buffer and not yet committed or fsynced.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg
import structlog
from prometheus_client import Counter

from gateway.ledger.config import LedgerSettings, ModelPrice
from gateway.ledger.metrics import LedgerMetrics
from gateway.ledger.pricing import PriceTable
from gateway.ledger.rows import (
    COLUMNS,
    COLUMNS_0003,
    ROW_COLUMNS,
    Pending,
    Row,
    decode_batch,
    encode_batch,
    to_row,
    without_cache_columns,
)
from gateway.ledger.spool import Spool

if TYPE_CHECKING:
    from gateway.pipeline.exchange import Exchange

STAGING = "ledger_staging"


def insert_sql(columns: tuple[str, ...], purged: str) -> str:
    """The batch's insert from the staging table: events, captures and the hourly rollup.

    ``columns``: the events' columns of the schema (``COLUMNS``, or ``COLUMNS_0003`` before the
    cache's migration); ``purged``: the captures' purge-watermark condition (or "").
    """
    cols = ", ".join(columns)
    cache = "cache" in columns
    # The rollup's keys are NOT NULL: a missing team is '' (shown as "no team" by the queries).
    return f"""
WITH ins AS (
    INSERT INTO events ({cols}) SELECT {cols} FROM pg_temp.{STAGING}
    ON CONFLICT (ts, id) DO NOTHING
    RETURNING ts, team, subject, model, route, provider, status, prompt_tokens, completion_tokens, cost_usd
        {", cache, cost_saved_usd" if cache else ""}
), captured AS (
    INSERT INTO captures (ts, id, team, request_id, model, status, messages, completion)
    SELECT ts, id, team, request_id, model, status, messages, completion FROM pg_temp.{STAGING} s
    WHERE messages IS NOT NULL AND team IS NOT NULL
      {purged}
    ON CONFLICT (ts, id) DO NOTHING
)
INSERT INTO usage_hourly AS u
    (hour, team, subject, model, route, provider,
     requests, errors, prompt_tokens, completion_tokens, cost_usd
     {", cache_hits, cost_saved_usd" if cache else ""})
SELECT date_trunc('hour', ts), coalesce(team, ''), subject, model, route, provider,
       count(*), count(*) FILTER (WHERE status >= 400 OR status = 0),
       coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), sum(cost_usd)
       {", count(*) FILTER (WHERE cache = 'hit'), sum(cost_saved_usd)" if cache else ""}
FROM ins
GROUP BY 1, 2, 3, 4, 5, 6
ORDER BY 1, 2, 3, 4, 5, 6
ON CONFLICT (hour, team, subject, model, route, provider) DO UPDATE SET
    requests = u.requests + excluded.requests,
    errors = u.errors + excluded.errors,
    prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,
    completion_tokens = u.completion_tokens + excluded.completion_tokens,
    cost_usd = u.cost_usd + excluded.cost_usd
    {", cache_hits = u.cache_hits + excluded.cache_hits" if cache else ""}
    {", cost_saved_usd = u.cost_saved_usd + excluded.cost_saved_usd" if cache else ""}
"""


# Purge watermarks (migration 0003): captured content older than a team's purge is not inserted.
_NOT_PURGED = "AND NOT EXISTS (SELECT 1 FROM capture_purges p WHERE p.team = s.team AND s.ts < p.before)"
MAINTENANCE_INTERVAL = 3600.0  # partitions ahead, retention, orphaned spool segments
# Errors that mean "this connection or server is unusable now" as opposed to a bad batch.
_RETRY_IN_TRANSACTION = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)


def _refuses_the_data(exc: BaseException) -> bool:
    """The rows, not the server, are at fault: SQLSTATE class 22 (data exception) or 23
    (integrity), or a value asyncpg cannot encode (an integer out of range, a wrong type)."""
    if isinstance(exc, asyncpg.PostgresError):
        return (getattr(exc, "sqlstate", None) or "")[:2] in ("22", "23")
    return isinstance(exc, (OverflowError, TypeError, ValueError))


class LedgerWriter:
    """Owns the buffer, the PostgreSQL connection, the spool and the flush task.

    Built without I/O (``create_app``); ``start()`` in the lifespan starts the task, ``stop()``
    flushes what is left (to PostgreSQL, or to the spool) and ends it.
    """

    def __init__(
        self,
        settings: LedgerSettings,
        pricing: Mapping[str, ModelPrice],
        metrics: LedgerMetrics,
    ) -> None:
        self._s = settings
        self._password = settings.password()  # a missing variable or file stops start-up here
        self._prices = PriceTable(pricing)
        self._m = metrics
        self._buf: deque[Pending] = deque()
        self._max = settings.max_buffer_rows
        self._batch = settings.batch_rows
        self._wake = asyncio.Event()
        self._spool = Spool(settings.spool_dir)
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._next_connect = 0.0
        self._next_maintenance = 0.0
        self._migrated = False
        self._insert_sql = insert_sql(COLUMNS, _NOT_PURGED)
        self._cache_columns = True  # the schema has migration 0004's columns (_adopt_schema)
        self._days: set[date] = set()  # partitions known to exist
        self._log = structlog.get_logger("gateway.ledger")

    # -- the hot path ------------------------------------------------------------------------

    def append(self, ex: Exchange, known_model: bool) -> None:
        """Queue one finished request's row (O(1); no I/O). A full buffer drops it, counted."""
        buf = self._buf
        if len(buf) >= self._max:
            self._m.dropped.inc()
            return
        buf.append((time.time(), ex, known_model))
        if len(buf) == self._batch:
            self._wake.set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the flush task (it connects, migrates if configured, and replays the spool)."""
        self._m.up.set(0)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ledger-writer")

    async def stop(self) -> None:
        """Flush every buffered row (PostgreSQL, or the spool) and close. Never raises."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await self._task
            except Exception:
                self._log.exception("ledger writer failed")
        try:
            await self._flush_all()  # anything the task did not get to (it failed, or never ran)
        finally:
            await asyncio.to_thread(self._spool.rotate)
            await self._disconnect()

    @property
    def connected(self) -> bool:
        return self._conn is not None

    # -- the flush task ------------------------------------------------------------------------

    async def _run(self) -> None:
        s = self._s
        while True:
            try:
                await self._cycle()
            except Exception:  # a bug must not end the task: rows keep going to the spool
                self._log.exception("ledger flush cycle failed")
                await self._disconnect()
            if self._stopping:
                return
            # While PostgreSQL is down, wake up for the next reconnection attempt too.
            wait = s.flush_interval if self._conn is not None else min(s.flush_interval, s.retry_interval)
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    async def _cycle(self) -> None:
        loop = asyncio.get_running_loop()
        # Also at shutdown only when due: a database that just refused is not waited for again.
        due = loop.time() >= self._next_connect
        if self._conn is None and due and await self._connect():
            await self._replay()
        if self._conn is not None and loop.time() >= self._next_maintenance:
            await self._maintain()
        await self._flush_all()
        self._m.buffered.set(len(self._buf))

    async def _flush_all(self) -> None:
        while self._buf:
            await self._write_or_spool(self._take())

    def _take(self) -> list[Row]:
        buf, prices = self._buf, self._prices
        n = min(len(buf), self._batch)
        return [to_row(buf.popleft(), prices) for _ in range(n)]

    async def _write_or_spool(self, rows: list[Row]) -> None:
        if self._conn is not None and await self._commit(rows, self._m.written):
            return
        await self._to_spool(rows)

    async def _commit(self, rows: list[Row], counter: Counter) -> bool:
        """Insert a batch; False (and disconnected) when PostgreSQL is down or slow.

        A batch PostgreSQL refuses as data (not as an outage) is not retried as a whole: waiting
        would not help, every replay would be refused again. Its rows are tried alone; the ones
        refused are set aside in ``rejected-*.rejected`` in the spool directory (never replayed,
        for a person to read) and counted as dropped.
        """
        try:
            await self._insert(rows)
        except Exception as exc:
            if not _refuses_the_data(exc):
                self._failed("write", exc)
                await self._disconnect()
                return False
            self._log.error("ledger batch refused; trying its rows one by one", error=str(exc)[:300])
        else:
            counter.inc(len(rows))
            return True
        rejected: list[Row] = []
        for i, row in enumerate(rows):
            try:
                await self._insert([row])
            except Exception as exc:
                if not _refuses_the_data(exc):
                    self._failed("write", exc)
                    await self._disconnect()
                    await self._to_spool(rows[i:])
                    break
                rejected.append(row)
            else:
                counter.inc()
        if rejected:
            self._m.dropped.inc(len(rejected))
            self._log.error("ledger rows refused by PostgreSQL, set aside", rows=len(rejected))
            try:
                await asyncio.to_thread(self._spool.set_aside, encode_batch(rejected))
            except OSError:
                pass
        return True

    async def _to_spool(self, rows: list[Row]) -> None:
        data = encode_batch(rows)
        try:
            await asyncio.to_thread(self._spool.append, data)
        except OSError as exc:
            self._m.dropped.inc(len(rows))
            self._log.error("ledger spool write failed: rows lost", rows=len(rows), error=str(exc))
            return
        self._m.spooled.inc(len(rows))

    async def _insert(self, rows: list[Row]) -> None:
        """One batch, idempotently, with its rollup; bounded by ``write_timeout``."""
        conn = self._conn
        assert conn is not None
        async with asyncio.timeout(self._s.write_timeout):
            days = {r[0].date() for r in rows} - self._days
            for day in sorted(days):
                await conn.execute("SELECT ensure_partition($1)", day)
                self._days.add(day)
            for attempt in range(3):
                try:
                    async with conn.transaction():
                        if self._cache_columns:
                            await conn.copy_records_to_table(STAGING, records=rows, columns=ROW_COLUMNS)
                        else:  # a schema not yet at 0004 still takes rows, without their cache columns
                            await conn.copy_records_to_table(
                                STAGING,
                                records=without_cache_columns(rows),
                                columns=(*COLUMNS_0003, "messages", "completion"),
                            )
                        await conn.execute(self._insert_sql)
                    return
                except _RETRY_IN_TRANSACTION:
                    if attempt == 2:
                        raise  # rows go to the spool and are replayed later

    # -- connection ----------------------------------------------------------------------------

    async def _connect(self) -> bool:
        s = self._s
        loop = asyncio.get_running_loop()
        self._next_connect = loop.time() + s.retry_interval
        conn: asyncpg.Connection | None = None
        try:
            if s.auto_migrate and not self._migrated:
                from gateway.ledger.migrate import upgrade

                async with asyncio.timeout(max(30.0, s.write_timeout)):
                    await upgrade(s)
                self._migrated = True
            conn = await asyncpg.connect(
                s.dsn,
                password=self._password,
                timeout=s.write_timeout,
                command_timeout=s.write_timeout,
                server_settings={
                    "search_path": s.schema_name,
                    "timezone": "UTC",
                    "application_name": "llm-gateway-ledger",
                },
            )
            async with asyncio.timeout(s.write_timeout):
                await self._adopt_schema(conn, new=True)
        except Exception as exc:
            self._failed("connect", exc)
            if conn is not None:
                conn.terminate()
            return False
        self._conn = conn
        self._days.clear()
        self._m.up.set(1)
        self._log.info("ledger connected", dsn=s.safe_dsn(), schema=s.schema_name)
        return True

    async def _adopt_schema(self, conn: asyncpg.Connection, new: bool) -> None:
        """Match the staging table and the insert to the schema's revision.

        A gateway deployed before ``db upgrade`` still writes: without the purge watermark before
        0003, without the cache columns before 0004. Asked at connection and at each maintenance,
        so an upgrade done while the gateway runs is taken up within ``MAINTENANCE_INTERVAL``.
        """
        purges = bool(await conn.fetchval("SELECT to_regclass('capture_purges') IS NOT NULL"))
        cache_columns = bool(
            await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema ="
                " current_schema() AND table_name = 'events' AND column_name = 'cost_saved_usd')"
            )
        )
        if not new and cache_columns != self._cache_columns:
            # The staging table is a copy of the events' columns when it was created.
            await conn.execute(f"DROP TABLE IF EXISTS pg_temp.{STAGING}")
            self._log.info("ledger schema changed", cache_columns=cache_columns)
        await conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {STAGING} (LIKE events INCLUDING DEFAULTS,"
            " messages jsonb, completion text) ON COMMIT DELETE ROWS"
        )
        self._cache_columns = cache_columns
        self._insert_sql = insert_sql(
            COLUMNS if cache_columns else COLUMNS_0003, _NOT_PURGED if purges else ""
        )

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        self._m.up.set(0)
        if conn is not None:
            conn.terminate()  # no graceful close: the server may be the thing that is gone

    def _failed(self, what: str, exc: BaseException) -> None:
        # asyncpg's messages name the server and the SQL state, never the password.
        self._log.warning(
            f"ledger {what} failed: PostgreSQL unavailable, rows go to the spool",
            error=f"{type(exc).__name__}: {str(exc)[:300]}",
        )

    # -- spool replay ----------------------------------------------------------------------------

    async def _replay(self) -> None:
        """Every spooled batch into PostgreSQL; a segment is deleted once all of it is in."""
        await asyncio.to_thread(self._spool.rotate)
        for path in await asyncio.to_thread(self._spool.segments):
            claim = await asyncio.to_thread(self._spool.claim, path)
            if claim is None:
                continue  # another live process is writing or replaying it
            try:
                lines = await asyncio.to_thread(claim.lines)
                rows = 0
                for line in lines:
                    try:
                        batch = decode_batch(line)
                    except ValueError:
                        # A torn last write (the machine died mid-append): never acknowledged.
                        self._log.error("ledger spool: unreadable batch skipped", segment=path.name)
                        continue
                    for i in range(0, len(batch), self._batch):
                        chunk = batch[i : i + self._batch]
                        if not await self._commit(chunk, self._m.replayed):
                            raise ConnectionError("PostgreSQL went away during the replay")
                        rows += len(chunk)
                        if len(self._buf) >= self._batch:  # live rows do not wait for a long replay
                            await self._write_or_spool(self._take())
                            if self._conn is None:
                                raise ConnectionError("PostgreSQL went away during the replay")
            except Exception as exc:
                await asyncio.to_thread(claim.release)
                if self._conn is not None:
                    self._failed("replay", exc)
                    await self._disconnect()
                return
            await asyncio.to_thread(claim.done)
            self._log.info("ledger spool replayed", segment=path.name, rows=rows)

    # -- maintenance -----------------------------------------------------------------------------

    async def _maintain(self) -> None:
        """Partitions ahead, retention, and spool segments orphaned by other processes."""
        s = self._s
        self._next_maintenance = asyncio.get_running_loop().time() + MAINTENANCE_INTERVAL
        conn = self._conn
        assert conn is not None
        today = datetime.now(UTC).date()
        try:
            async with asyncio.timeout(max(30.0, s.write_timeout)):
                await conn.execute(
                    "SELECT ensure_partition($1::date + d) FROM generate_series(-1, $2::int) AS d",
                    today,
                    s.partitions_ahead,
                )
                dropped = await conn.fetchval(
                    "SELECT drop_partitions_before($1)", today - timedelta(days=s.retention_days)
                )
                await conn.execute(
                    "DELETE FROM usage_hourly WHERE hour < $1",
                    datetime.now(UTC) - timedelta(days=s.rollup_retention_days),
                )
                await conn.execute(
                    "DELETE FROM captures WHERE ts < $1", datetime.now(UTC) - timedelta(days=s.retention_days)
                )
                await self._adopt_schema(conn, new=False)
        except Exception as exc:
            self._failed("maintenance", exc)
            await self._disconnect()
            return
        self._days.clear()
        if dropped:
            self._log.info("ledger retention: partitions dropped", partitions=dropped)
        if await asyncio.to_thread(self._spool.segments):
            await self._replay()
