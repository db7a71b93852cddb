"""Events partitioned by day, the hourly rollup, and the partition functions.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

EVENTS = """
CREATE TABLE events (
    ts                  timestamptz      NOT NULL,
    id                  bigint           NOT NULL,
    request_id          text             NOT NULL,
    endpoint            text             NOT NULL,
    subject             text             NOT NULL,
    credential          text,
    team                text,
    tier                text,
    via                 text             NOT NULL,
    route               text             NOT NULL,
    requested_model     text,
    model               text             NOT NULL,
    backend             text,
    provider            text             NOT NULL,
    stream              boolean          NOT NULL,
    status              smallint         NOT NULL,
    error_reason        text,
    fault               text,
    prompt_tokens       integer,
    completion_tokens   integer,
    ttft_ms             real,
    duration_ms         real             NOT NULL,
    queue_wait_ms       real             NOT NULL,
    fallback            text,
    client_disconnected boolean          NOT NULL,
    cost_usd            numeric(20, 10)  NOT NULL,
    PRIMARY KEY (ts, id)
) PARTITION BY RANGE (ts)
"""

HOURLY = """
CREATE TABLE usage_hourly (
    hour              timestamptz     NOT NULL,
    team              text            NOT NULL,
    subject           text            NOT NULL,
    model             text            NOT NULL,
    route             text            NOT NULL,
    provider          text            NOT NULL,
    requests          bigint          NOT NULL,
    errors            bigint          NOT NULL,
    prompt_tokens     bigint          NOT NULL,
    completion_tokens bigint          NOT NULL,
    cost_usd          numeric(24, 10) NOT NULL,
    PRIMARY KEY (hour, team, subject, model, route, provider)
)
"""

# One daily partition [day, day + 1) in UTC; replicas creating the same one take turns.
ENSURE_PARTITION = r"""
CREATE FUNCTION ensure_partition(day date) RETURNS boolean
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    name text := 'events_' || to_char(day, 'YYYYMMDD');
BEGIN
    IF to_regclass(name) IS NOT NULL THEN
        RETURN false;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext(current_schema() || '.events partitions'));
    IF to_regclass(name) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format(
        'CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%L) TO (%L)',
        name, day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC');
    RETURN true;
END $$
"""

# Retention: whole partitions dropped (no DELETE, no vacuum debt); returns how many.
DROP_PARTITIONS = r"""
CREATE FUNCTION drop_partitions_before(cutoff date) RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    part record;
    dropped integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext(current_schema() || '.events partitions'));
    FOR part IN
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'events'::regclass AND c.relname ~ '^events_[0-9]{8}$'
          AND to_date(substr(c.relname, 8), 'YYYYMMDD') < cutoff
    LOOP
        EXECUTE format('DROP TABLE %I', part.relname);
        dropped := dropped + 1;
    END LOOP;
    RETURN dropped;
END $$
"""


def upgrade() -> None:
    op.execute(EVENTS)
    op.execute("CREATE INDEX events_team_ts ON events (team, ts)")
    op.execute("CREATE INDEX events_request_id ON events (request_id)")
    op.execute(HOURLY)
    op.execute("CREATE INDEX usage_hourly_team_hour ON usage_hourly (team, hour)")
    op.execute(ENSURE_PARTITION)
    op.execute(DROP_PARTITIONS)
    op.execute(
        "SELECT ensure_partition((now() AT TIME ZONE 'UTC')::date + d) FROM generate_series(-1, 7) AS d"
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION drop_partitions_before(date)")
    op.execute("DROP FUNCTION ensure_partition(date)")
    op.execute("DROP TABLE usage_hourly")
    op.execute("DROP TABLE events")
