"""Schema migrations (alembic, shipped in ``gateway/ledger/migrations``), applied under a lock.

Cold path only: ``llm-gateway db upgrade`` and the writer's start-up with ``auto_migrate`` call
this; SQLAlchemy is imported here and nowhere on the request path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.ledger.config import LedgerSettings

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# pg_advisory_lock key: replicas starting together run the migrations one after the other.
LOCK_KEY = 0x6C65646765720001


def _alembic_config(connection: Any, schema: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    cfg.attributes["schema"] = schema
    return cfg


def sqlalchemy_url(settings: LedgerSettings) -> Any:
    """The DSN as a SQLAlchemy URL on the asyncpg driver, the password from its source."""
    from sqlalchemy.engine import make_url

    url = make_url(settings.dsn).set(drivername="postgresql+asyncpg")
    password = settings.password()
    return url.set(password=password) if password is not None else url


async def upgrade(settings: LedgerSettings, revision: str = "head") -> str | None:
    """Apply the migrations up to ``revision``; returns the revision the schema is at afterwards.

    Holds a session advisory lock (``LOCK_KEY``) for the duration. Raises what the database
    raises (connection refused, permission denied) or alembic's CommandError.
    """
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(sqlalchemy_url(settings), poolclass=_null_pool())
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": LOCK_KEY})
            await conn.commit()
            try:
                await conn.run_sync(_run_upgrade, settings.schema_name, revision)
                await conn.commit()
                return await conn.run_sync(_current, settings.schema_name)
            finally:
                await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
                await conn.commit()
    finally:
        await engine.dispose()


async def current(settings: LedgerSettings) -> str | None:
    """The revision the schema is at (None: no migrations applied)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(sqlalchemy_url(settings), poolclass=_null_pool())
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_current, settings.schema_name)
    finally:
        await engine.dispose()


def head() -> str | None:
    """The newest revision shipped with this version of the gateway."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def _run_upgrade(connection: Any, schema: str, revision: str) -> None:
    from alembic import command

    command.upgrade(_alembic_config(connection, schema), revision)


def _current(connection: Any, schema: str) -> str | None:
    from alembic.migration import MigrationContext

    ctx = MigrationContext.configure(connection, opts={"version_table_schema": schema})
    rev: str | None = ctx.get_current_revision()
    return rev


def _null_pool() -> Any:
    from sqlalchemy.pool import NullPool

    return NullPool
