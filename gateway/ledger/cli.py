"""The ledger's commands: ``db upgrade | current``, ``usage``, ``export-dataset``, ``purge``.

Cheap to import (the CLI builds its parser on every run): alembic, SQLAlchemy and asyncpg are
imported when a command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from gateway.config import ConfigError, load_settings


def register(subparsers: Any) -> None:
    """Add the ``db`` command (with ``upgrade`` and ``current``) to the CLI's subparsers."""
    db = subparsers.add_parser("db", help="the usage ledger's PostgreSQL schema (docs/ledger.md)")
    actions = db.add_subparsers(dest="db_command", required=True)
    up = actions.add_parser(
        "upgrade", help="apply the schema migrations (under an advisory lock; safe to run twice)"
    )
    up.add_argument("--config", help="YAML config file with a `ledger` section")
    up.add_argument("--revision", default="head", help="target revision (default: head)")
    up.set_defaults(func=_upgrade)
    cur = actions.add_parser("current", help="print the schema's revision and the newest one shipped")
    cur.add_argument("--config", help="YAML config file with a `ledger` section")
    cur.set_defaults(func=_current)

    usage = subparsers.add_parser(
        "usage", help="requests, tokens, cost and cache savings from the ledger, as a table"
    )
    usage.add_argument("--config", help="YAML config file with a `ledger` section")
    usage.add_argument("--since", default="30d", help="how far back: 30d, 12h, 90m, or a date (UTC)")
    usage.add_argument("--until", help="end (exclusive): a date or date-time (UTC); default now")
    usage.add_argument(
        "--by", default="team,model", help="comma-separated: team, principal, model, route, provider"
    )
    usage.add_argument("--csv", action="store_true", help="CSV instead of an aligned table")
    usage.set_defaults(func=_usage)

    export = subparsers.add_parser(
        "export-dataset", help="a team's captured requests as OpenAI fine-tuning JSONL"
    )
    export.add_argument("--config", help="YAML config file with a `ledger` section")
    export.add_argument("--team", required=True, help="the team whose captured requests to export")
    export.add_argument("--since", default="30d", help="how far back: 30d, 12h, or a date (UTC)")
    export.add_argument("--out", help="file to write (default: standard output)")
    export.set_defaults(func=_export)

    purge = subparsers.add_parser("purge", help="delete a team's captured content (the usage rows stay)")
    purge.add_argument("--config", help="YAML config file with a `ledger` section")
    purge.add_argument("--team", required=True, help="the team whose captured content to delete")
    purge.add_argument("--before", help="only what was captured before this date (UTC); default: all")
    purge.set_defaults(func=_purge)


def _ledger_settings(args: argparse.Namespace) -> Any:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return None
    if settings.ledger is None:
        print("the configuration has no `ledger` section (or GATEWAY_LEDGER__DSN)", file=sys.stderr)
        return None
    return settings.ledger


def _upgrade(args: argparse.Namespace) -> int:
    from gateway.ledger.migrate import upgrade

    ledger = _ledger_settings(args)
    if ledger is None:
        return 2
    try:
        revision = asyncio.run(upgrade(ledger, args.revision))
    except Exception as exc:  # the database's or alembic's own message; never the password
        print(f"db upgrade failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"ledger schema `{ledger.schema_name}` at revision {revision}")
    return 0


def _current(args: argparse.Namespace) -> int:
    from gateway.ledger.migrate import current, head

    ledger = _ledger_settings(args)
    if ledger is None:
        return 2
    try:
        revision = asyncio.run(current(ledger))
    except Exception as exc:
        print(f"db current failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"ledger schema `{ledger.schema_name}`: revision {revision or 'none'} (newest shipped: {head()})")
    return 0 if revision == head() else 1


def _when(text: str, now: float) -> float:
    """Epoch seconds of ``30d``/``12h``/``90m`` before now, or of an ISO date (UTC)."""
    from datetime import UTC, datetime

    units = {"d": 86400, "h": 3600, "m": 60}
    if text[:-1].isascii() and text[:-1].isdigit() and len(text) <= 10 and text[-1:] in units:
        return now - int(text[:-1]) * units[text[-1]]
    parsed = datetime.fromisoformat(text)
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _usage(args: argparse.Namespace) -> int:
    import time

    from gateway.ledger.usage import GROUPS

    ledger = _ledger_settings(args)
    if ledger is None:
        return 2
    by = [b.strip() for b in args.by.split(",") if b.strip()]
    allowed = ("team", "principal", "model", "route", "provider")
    bad = [b for b in by if b not in allowed]
    if bad:
        print(f"--by takes {', '.join(allowed)}; not {bad[0]!r}", file=sys.stderr)
        return 2
    now = time.time()
    try:
        start, end = _when(args.since, now), _when(args.until, now) if args.until else now
    except ValueError:
        print("--since/--until: use 30d, 12h, 90m or an ISO date", file=sys.stderr)
        return 2
    try:
        rows = asyncio.run(_usage_rows(ledger, int(start), int(end), by))
    except Exception as exc:
        print(f"usage failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    header = [*by, "requests", "errors", "prompt_tokens", "completion_tokens", "cost_usd"]
    header += ["cache_hits", "cost_saved_usd"]
    table = [
        [
            *((r[GROUPS[b]] or "-") for b in by),
            str(r["requests"]),
            str(r["errors"]),
            str(r["prompt_tokens"]),
            str(r["completion_tokens"]),
            f"{r['cost_usd']:.6f}",
            str(r["cache_hits"]),
            f"{r['cost_saved_usd']:.6f}",
        ]
        for r in rows
    ]
    if not args.csv and not any(r["cache_hits"] for r in rows):
        # The table a person reads has the cache's columns when the range has hits; CSV always.
        header, table = header[:-2], [row[:-2] for row in table]
    if args.csv:
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(table)
        return 0
    widths = [max([len(h), *(len(row[i]) for row in table)]) for i, h in enumerate(header)]
    for row in [header, *table]:
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [c.ljust(w) if i < len(by) else c.rjust(w) for i, (c, w) in pairs]
        print("  ".join(cells).rstrip())
    return 0


async def _usage_rows(ledger: Any, start: int, end: int, by: list[str]) -> list[Any]:
    from gateway.ledger.usage import has_cache_columns, totals

    conn = await _connect(ledger)
    try:
        return await totals(conn, start, end, by, await has_cache_columns(conn))
    finally:
        await conn.close()


async def _connect(ledger: Any) -> Any:
    import asyncpg

    return await asyncpg.connect(
        ledger.dsn,
        password=ledger.password(),
        timeout=ledger.write_timeout,
        server_settings={"search_path": ledger.schema_name, "timezone": "UTC"},
    )


def _export(args: argparse.Namespace) -> int:
    import time

    ledger = _ledger_settings(args)
    if ledger is None:
        return 2
    try:
        since = _when(args.since, time.time())
    except ValueError:
        print("--since: use 30d, 12h, 90m or an ISO date", file=sys.stderr)
        return 2
    try:
        lines = asyncio.run(_export_lines(ledger, args.team, since))
    except Exception as exc:
        print(f"export failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    data = "".join(lines)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(data)
    else:
        sys.stdout.write(data)
    print(f"{len(lines)} examples of team {args.team!r}", file=sys.stderr)
    return 0


async def _export_lines(ledger: Any, team: str, since: float) -> list[str]:
    """One JSONL line per successful captured chat request: its messages and the answer.

    Answers cut at the capture bound (marked ``[truncated]``) are left out: a cut answer would
    teach the model to stop mid-sentence.
    """
    from datetime import UTC, datetime

    import orjson

    conn = await _connect(ledger)
    try:
        rows = await conn.fetch(
            "SELECT messages::text AS messages, completion FROM captures"
            " WHERE team = $1 AND ts >= $2 AND status = 200 AND completion IS NOT NULL ORDER BY ts",
            team,
            datetime.fromtimestamp(since, UTC),
        )
    finally:
        await conn.close()
    out = []
    for r in rows:
        completion: str = r["completion"]
        if completion.endswith(" [truncated]"):
            continue
        messages = orjson.loads(r["messages"])
        example = {"messages": [*messages, {"role": "assistant", "content": completion}]}
        out.append(orjson.dumps(example).decode() + "\n")
    return out


def _purge(args: argparse.Namespace) -> int:
    ledger = _ledger_settings(args)
    if ledger is None:
        return 2
    from datetime import UTC, datetime

    try:
        before = datetime.fromtimestamp(_when(args.before, 0), UTC) if args.before else None
    except ValueError:
        print("--before: use an ISO date (UTC)", file=sys.stderr)
        return 2
    try:
        deleted = asyncio.run(_purge_rows(ledger, args.team, before))
    except Exception as exc:
        hint = " (run `llm-gateway db upgrade` first)" if "capture_purges" in str(exc) else ""
        print(f"purge failed: {type(exc).__name__}: {exc}{hint}", file=sys.stderr)
        return 1
    print(f"deleted {deleted} captured requests of team {args.team!r}")
    return 0


async def _purge_rows(ledger: Any, team: str, before: Any) -> int:
    conn = await _connect(ledger)
    try:
        async with conn.transaction():
            # The watermark keeps content captured before it out for good: rows still in a
            # gateway's spool are replayed without it (gateway/ledger/writer.py insert_sql).
            await conn.execute(
                "INSERT INTO capture_purges (team, before) VALUES ($1, coalesce($2, now()))", team, before
            )
            if before is None:
                status = await conn.execute("DELETE FROM captures WHERE team = $1", team)
            else:
                status = await conn.execute("DELETE FROM captures WHERE team = $1 AND ts < $2", team, before)
    finally:
        await conn.close()
    return int(status.split()[-1])
