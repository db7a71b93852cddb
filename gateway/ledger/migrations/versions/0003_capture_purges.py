"""Purge watermarks: captured content of a team from before a purge is never inserted again.

``llm-gateway purge`` records ``(team, before)`` here in the transaction that deletes the
captures; the writer's insert skips captured content of a team older than its latest
watermark, so a spool replayed after the purge (a gateway that stopped while PostgreSQL was
down) does not bring purged content back.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE capture_purges (
            team      text        NOT NULL,
            before    timestamptz NOT NULL,
            purged_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX capture_purges_team ON capture_purges (team, before)")


def downgrade() -> None:
    op.execute("DROP TABLE capture_purges")
