"""The usage ledger: one PostgreSQL row per request, written off the hot path (docs/ledger.md).

Nothing is imported here: a gateway without a ``ledger`` section never loads asyncpg.
"""
