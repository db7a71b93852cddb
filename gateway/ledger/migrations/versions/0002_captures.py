"""Captured request messages and responses (teams with ``capture: true``).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE captures (
            ts         timestamptz NOT NULL,
            id         bigint      NOT NULL,
            team       text        NOT NULL,
            request_id text        NOT NULL,
            model      text        NOT NULL,
            status     smallint    NOT NULL,
            messages   jsonb       NOT NULL,
            completion text,
            PRIMARY KEY (ts, id)
        )
        """
    )
    op.execute("CREATE INDEX captures_team_ts ON captures (team, ts)")


def downgrade() -> None:
    op.execute("DROP TABLE captures")
