"""SQL for the durable execution queue (R-QUEUE)."""

from __future__ import annotations

from uuid import UUID

from opsexec.store import Connection

# A job that waits for an approval exists from the start (so nothing is lost between
# submit and approval) but is invisible to workers until the approval releases it.
ENQUEUE = """
INSERT INTO execution_queue (execution_id, priority, max_attempts, available_at)
VALUES ($1, $2, $3, CASE WHEN $4 THEN now() ELSE 'infinity'::timestamptz END)
RETURNING id
"""


async def enqueue(
    connection: Connection,
    execution_id: UUID,
    *,
    priority: int,
    max_attempts: int,
    runnable: bool,
) -> UUID:
    queue_id: UUID = await connection.fetchval(
        ENQUEUE, execution_id, priority, max_attempts, runnable
    )
    return queue_id


async def release(connection: Connection, execution_id: UUID) -> None:
    """Make a queued job runnable now (its approval arrived) and wake the workers."""
    await connection.execute(
        """UPDATE execution_queue SET available_at = now()
           WHERE execution_id = $1 AND status = 'queued'""",
        execution_id,
    )
    await connection.execute("SELECT pg_notify('opsexec_queue', $1::text)", str(execution_id))


async def close_unrun(connection: Connection, execution_id: UUID, reason: str) -> None:
    """The execution ended before any worker ran it (rejected, cancelled): retire its job."""
    await connection.execute(
        """UPDATE execution_queue
           SET status = 'completed', completed_at = now(), last_error = $2
           WHERE execution_id = $1 AND status = 'queued'""",
        execution_id,
        reason,
    )
