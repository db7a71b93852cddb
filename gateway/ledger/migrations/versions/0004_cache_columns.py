"""Response-cache outcomes: ``events.cache`` and ``cost_saved_usd``; hits and savings in the rollup.

``cache`` is ``hit``, ``miss``, ``bypass`` or NULL (the cache is off or the request was never
looked up); a hit's ``cost_usd`` is 0 and its ``cost_saved_usd`` what the same tokens would have
cost. Adding columns with constant defaults rewrites no table (PostgreSQL 11+), and on a
partitioned table they reach every partition.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE events ADD COLUMN cache text,"
        " ADD COLUMN cost_saved_usd numeric(20, 10) NOT NULL DEFAULT 0"
    )
    op.execute(
        "ALTER TABLE usage_hourly ADD COLUMN cache_hits bigint NOT NULL DEFAULT 0,"
        " ADD COLUMN cost_saved_usd numeric(24, 10) NOT NULL DEFAULT 0"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE usage_hourly DROP COLUMN cache_hits, DROP COLUMN cost_saved_usd")
    op.execute("ALTER TABLE events DROP COLUMN cache, DROP COLUMN cost_saved_usd")
