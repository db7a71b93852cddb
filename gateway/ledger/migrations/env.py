"""Alembic's environment for the ledger: run on the connection ``gateway.ledger.migrate`` passes.

The schema named by ``ledger.schema_name`` is created if missing and becomes the search path,
so the migrations use unqualified names and the version table lives beside the ledger's tables.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

config = context.config
connection = config.attributes["connection"]
schema: str = config.attributes["schema"]

connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
connection.execute(text(f'SET search_path TO "{schema}"'))
connection.execute(text("SET TIME ZONE 'UTC'"))
context.configure(
    connection=connection,
    version_table_schema=schema,
    transaction_per_migration=True,
)
with context.begin_transaction():
    context.run_migrations()
