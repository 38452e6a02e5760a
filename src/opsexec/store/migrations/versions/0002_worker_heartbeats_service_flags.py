"""Worker heartbeats (readiness, drain) and service-wide flags (the runtime kill switch).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from opsexec.store.migrate import execute_script

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script("""
    -- One row per worker process (its --worker-id). The worker refreshes last_seen_at
    -- every few seconds, so /readyz and /metrics can tell a live fleet from a dead one,
    -- and reads drain_requested_at back in the same statement: that is how an operator
    -- asks one worker to finish what it holds and exit (R-ROLL).
    CREATE TABLE worker_heartbeats (
        worker_id           varchar(100) PRIMARY KEY,
        hostname            varchar(255),
        pid                 int,
        concurrency         int NOT NULL DEFAULT 0,
        running_jobs        int NOT NULL DEFAULT 0,
        started_at          timestamptz NOT NULL DEFAULT now(),
        last_seen_at        timestamptz NOT NULL DEFAULT now(),
        drain_requested_at  timestamptz,
        drain_requested_by  uuid REFERENCES users (id) ON DELETE SET NULL,
        stopped_at          timestamptz,
        metadata            jsonb NOT NULL DEFAULT '{}'::jsonb,
        CONSTRAINT valid_heartbeat_timing CHECK (last_seen_at >= started_at),
        CONSTRAINT valid_running_jobs CHECK (running_jobs >= 0 AND concurrency >= 0)
    );
    CREATE INDEX ix_worker_heartbeats_seen ON worker_heartbeats (last_seen_at DESC);

    -- Service-wide switches every process must see (the runtime kill switch). Per-tenant
    -- switches live in tenants.settings; environment variables still win over this table.
    CREATE TABLE service_flags (
        name        varchar(100) PRIMARY KEY,
        value       jsonb NOT NULL,
        updated_at  timestamptz NOT NULL DEFAULT now(),
        updated_by  uuid REFERENCES users (id) ON DELETE SET NULL
    );
    """)


def downgrade() -> None:
    execute_script("""
    DROP TABLE IF EXISTS service_flags, worker_heartbeats;
    """)
