"""Dead letters can be closed (their execution was cancelled), not only requeued; an
index for the reaper's scan of running immediate executions.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from opsexec.store.migrate import execute_script

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script("""
    -- An entry is open until someone decides: requeued (run it again) or closed (the
    -- execution was cancelled, so nothing will run it). The DLQ gauge counts open ones.
    ALTER TABLE execution_dlq
        ADD COLUMN closed_at timestamptz,
        ADD COLUMN closed_reason varchar(100),
        ADD CONSTRAINT dlq_requeued_or_closed CHECK (requeued_at IS NULL OR closed_at IS NULL),
        ADD CONSTRAINT dlq_closed_with_reason CHECK ((closed_at IS NULL) = (closed_reason IS NULL));
    CREATE INDEX ix_dlq_open ON execution_dlq (execution_id)
        WHERE requeued_at IS NULL AND closed_at IS NULL;

    -- Every reaper pass looks for immediate executions still running long past their
    -- timeout (their API process died): few rows, read often.
    CREATE INDEX ix_exec_running_immediate ON executions (started_at)
        WHERE status = 'running' AND execution_mode = 'immediate';
    """)


def downgrade() -> None:
    execute_script("""
    DROP INDEX IF EXISTS ix_exec_running_immediate;
    DROP INDEX IF EXISTS ix_dlq_open;
    ALTER TABLE execution_dlq
        DROP CONSTRAINT IF EXISTS dlq_closed_with_reason,
        DROP CONSTRAINT IF EXISTS dlq_requeued_or_closed,
        DROP COLUMN IF EXISTS closed_reason,
        DROP COLUMN IF EXISTS closed_at;
    """)
