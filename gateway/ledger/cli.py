"""``llm-gateway db upgrade | current``: the ledger's schema migrations from the command line.

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
