"""SQL for the durable execution queue (R-QUEUE): enqueue, lease, heartbeat, retire.

Every write a worker makes to a leased job carries the job's ``lease_token``: once a
lease expires and the job is leased again, the old token matches nothing, so a worker
that was frozen or partitioned can no longer touch the job (fencing).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg

from opsexec.store import Connection
from opsexec.store.channels import QUEUE_CHANNEL, notify

DEFAULT_LEASE_MS = 60_000
"""The lease of a job whose metadata names none (rows written by hand, old rows)."""

# A job that waits for an approval exists from the start (so nothing is lost between
# submit and approval) but is invisible to workers until the approval releases it.
ENQUEUE = """
INSERT INTO execution_queue (execution_id, priority, max_attempts, available_at, metadata)
VALUES ($1, $2, $3, CASE WHEN $4 THEN now() ELSE 'infinity'::timestamptz END, $5)
RETURNING id
"""

# One round trip: pick by priority then age, skip rows other workers hold, lease them.
# While the kill switch is on ($4: the environment's; the runtime one is read here) or a
# tenant is switched off, nothing new starts: only jobs whose execution already runs (handed
# back at a shutdown, re-leased after a crash) are leased, so in-flight work finishes.
DEQUEUE = """
WITH switched_off AS (
    SELECT $4::boolean OR coalesce(
        (SELECT (value->>'engaged')::boolean FROM service_flags WHERE name = 'kill_switch'),
        false) AS service
),
next AS (
    SELECT q.id
    FROM execution_queue q
    JOIN executions e ON e.id = q.execution_id
    JOIN tenants t ON t.id = e.tenant_id
    WHERE q.status = 'queued' AND q.available_at <= now()
      AND (e.status = 'running' OR (
          NOT (SELECT service FROM switched_off)
          AND coalesce((t.settings->>'enabled')::boolean, true)))
    ORDER BY q.priority, q.queued_at
    LIMIT $2
    FOR UPDATE OF q SKIP LOCKED
)
UPDATE execution_queue q
SET status = 'leased',
    leased_by = $1,
    leased_at = now(),
    lease_expires_at = now() + make_interval(
        secs => coalesce((q.metadata->>'lease_ms')::float, $3) / 1000),
    lease_token = gen_random_uuid(),
    lease_count = q.lease_count + 1,
    started_at = coalesce(q.started_at, now())
FROM next
WHERE q.id = next.id
RETURNING q.*, (SELECT tenant_id FROM executions e WHERE e.id = q.execution_id) AS tenant_id
"""

# A renewal is counted on the execution (lease_renewals, R-OBS) in the same statement.
HEARTBEAT = """
WITH renewed AS (
    UPDATE execution_queue
    SET lease_expires_at = now() + make_interval(
        secs => coalesce((metadata->>'lease_ms')::float, $3) / 1000)
    WHERE id = $1 AND lease_token = $2 AND status = 'leased'
    RETURNING execution_id, lease_expires_at
), counted AS (
    UPDATE executions e SET lease_renewals = e.lease_renewals + 1
    FROM renewed WHERE e.id = renewed.execution_id
)
SELECT lease_expires_at FROM renewed
"""

COMPLETE = """
UPDATE execution_queue
SET status = 'completed', completed_at = now(), leased_by = NULL, leased_at = NULL,
    lease_token = NULL, lease_expires_at = NULL
WHERE id = $1 AND lease_token = $2 AND status = 'leased'
RETURNING id
"""

# Handing a job back without charging an attempt: graceful shutdown, a busy lock, a
# level-3 gate (available again only when its approval releases it: 'infinity').
HAND_BACK = """
UPDATE execution_queue
SET status = 'queued', leased_by = NULL, leased_at = NULL, lease_token = NULL,
    lease_expires_at = NULL,
    available_at = CASE WHEN $3::float IS NULL THEN 'infinity'::timestamptz
                        ELSE now() + make_interval(secs => $3::float) END,
    last_error = coalesce($4, last_error),
    metadata = metadata || $5
WHERE id = $1 AND lease_token = $2 AND status = 'leased'
RETURNING id
"""

# A failed attempt: back off 2^attempt seconds, or give up when attempts are spent.
# A worker passes its lease token ($4), so a worker whose lease already passed to another
# cannot charge the new owner's attempt; the reaper passes NULL for the rows it locked.
FAIL_ATTEMPT = """
UPDATE execution_queue
SET attempt = attempt + 1,
    status = CASE WHEN attempt + 1 >= max_attempts THEN 'failed' ELSE 'queued' END,
    available_at = now() + make_interval(secs => power(2, attempt + 1) * $3),
    completed_at = CASE WHEN attempt + 1 >= max_attempts THEN now() END,
    leased_by = NULL, leased_at = NULL, lease_token = NULL, lease_expires_at = NULL,
    last_error = $2
WHERE id = $1 AND status = 'leased' AND ($4::uuid IS NULL OR lease_token = $4::uuid)
RETURNING *, extract(epoch FROM available_at - now())::float AS backoff_s
"""

EXPIRED_LEASES = """
SELECT q.*, e.tenant_id FROM execution_queue q JOIN executions e ON e.id = q.execution_id
WHERE q.status = 'leased' AND q.lease_expires_at < now()
ORDER BY q.lease_expires_at
LIMIT $1
FOR UPDATE OF q SKIP LOCKED
"""

DEAD_LETTER = """
INSERT INTO execution_dlq (execution_id, original_queue_id, attempt_count, last_error,
                           plan_snapshot, execution_context)
SELECT e.id, $1, $2, $3, e.plan_snapshot,
       jsonb_build_object(
           'tenant_id', e.tenant_id, 'actor_id', e.actor_id, 'status', e.status,
           'plan_hash', e.plan_hash, 'execution_mode', e.execution_mode,
           'approval_level', e.approval_level, 'sla_class', e.sla_class,
           'timeout_policy_id', e.timeout_policy_id, 'priority', $4::int)
FROM executions e WHERE e.id = $5
RETURNING id
"""


async def enqueue(
    connection: Connection,
    execution_id: UUID,
    *,
    priority: int,
    max_attempts: int,
    runnable: bool,
    lease_ms: int = DEFAULT_LEASE_MS,
    max_lease_renewals: int = 3,
) -> UUID:
    queue_id: UUID = await connection.fetchval(
        ENQUEUE,
        execution_id,
        priority,
        max_attempts,
        runnable,
        {"lease_ms": lease_ms, "max_lease_renewals": max_lease_renewals},
    )
    return queue_id


async def release(connection: Connection, execution_id: UUID) -> None:
    """Make a queued job runnable now (its approval arrived) and wake the workers.

    ``clock_timestamp()``, not ``now()``: this is the submit's or approval's last statement,
    so the queue wait (``available_at`` to first lease) starts near the commit instead of
    including the rest of that transaction.
    """
    await connection.execute(
        """UPDATE execution_queue SET available_at = clock_timestamp()
           WHERE execution_id = $1 AND status = 'queued'""",
        execution_id,
    )
    await notify(connection, QUEUE_CHANNEL, str(execution_id))


async def close_unrun(connection: Connection, execution_id: UUID, reason: str) -> None:
    """The execution ended before any worker ran it (rejected, cancelled): retire its job."""
    await connection.execute(
        """UPDATE execution_queue
           SET status = 'completed', completed_at = now(), last_error = $2
           WHERE execution_id = $1 AND status = 'queued'""",
        execution_id,
        reason,
    )


async def dequeue(
    connection: Connection, worker_id: str, limit: int, *, kill_switch: bool = False
) -> list[asyncpg.Record]:
    """Lease up to ``limit`` runnable jobs, most urgent first, then oldest first.

    ``kill_switch`` is the environment's (``OPSEXEC_KILL_SWITCH``); the runtime switch and
    the tenants' ``enabled`` flags are read by the statement itself.
    """
    return await connection.fetch(DEQUEUE, worker_id, limit, DEFAULT_LEASE_MS, kill_switch)


async def heartbeat(connection: Connection, queue_id: UUID, token: UUID) -> bool:
    """Extend the lease and count the renewal; False means the lease is gone and the worker
    must stop touching the job."""
    return await connection.fetchval(HEARTBEAT, queue_id, token, DEFAULT_LEASE_MS) is not None


async def complete(connection: Connection, queue_id: UUID, token: UUID) -> bool:
    return await connection.fetchval(COMPLETE, queue_id, token) is not None


async def hand_back(
    connection: Connection,
    queue_id: UUID,
    token: UUID,
    *,
    available_in_s: float | None,
    reason: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> bool:
    """Return a leased job to the queue uncharged; ``None`` delay parks it until released."""
    returned = await connection.fetchval(
        HAND_BACK, queue_id, token, available_in_s, reason, metadata or {}
    )
    return returned is not None


async def park(connection: Connection, queue_id: UUID, token: UUID, execution_id: UUID) -> bool:
    """Hand a job back until its step approval releases it (level-3 gate).

    The approval may be decided between the engine parking the execution and this call;
    its ``release`` then found the job still leased and changed nothing. Reading the
    execution under a share lock (an approval holds it for update until it commits) closes
    that window: a job whose execution is no longer awaiting approval stays runnable.
    """
    status = await connection.fetchval(
        "SELECT status FROM executions WHERE id = $1 FOR SHARE", execution_id
    )
    waiting = status == "awaiting_approval"
    returned = await hand_back(
        connection,
        queue_id,
        token,
        available_in_s=None if waiting else 0.0,
        reason="awaiting step approval" if waiting else None,
    )
    if returned and not waiting:
        await notify(connection, QUEUE_CHANNEL, str(execution_id))
    return returned


async def fail_attempt(
    connection: Connection,
    queue_id: UUID,
    error: str,
    backoff_unit_s: float = 1.0,
    *,
    token: UUID | None = None,
) -> asyncpg.Record | None:
    """Charge an attempt; the row says whether the job is queued again or failed for good.

    With ``token`` only the lease holder can charge it (None: the lease was lost). The row
    carries ``backoff_s``, the wait before the next attempt, for the record.
    """
    return await connection.fetchrow(FAIL_ATTEMPT, queue_id, error, backoff_unit_s, token)


def retry_fields(row: asyncpg.Record) -> dict[str, Any]:
    """When a job charged with a failed attempt runs again (None: it was dead-lettered)."""
    if row["status"] == "failed":
        return {"retry_in_s": None, "retry_at": None}
    return {"retry_in_s": row["backoff_s"], "retry_at": row["available_at"].isoformat()}


async def expired_leases(connection: Connection, limit: int) -> list[asyncpg.Record]:
    return await connection.fetch(EXPIRED_LEASES, limit)


async def dead_letter(connection: Connection, job: asyncpg.Record, error: str) -> UUID:
    dlq_id: UUID = await connection.fetchval(
        DEAD_LETTER,
        job["id"],
        job["attempt"],
        error,
        job["priority"],
        job["execution_id"],
    )
    return dlq_id


async def lease_is_held(connection: Connection, execution_id: UUID, token: UUID) -> bool:
    """The fence: True while this token still holds the execution's job (row locked)."""
    held = await connection.fetchval(
        """SELECT 1 FROM execution_queue
           WHERE execution_id = $1 AND lease_token = $2 AND status = 'leased'
           FOR SHARE""",
        execution_id,
        token,
    )
    return held is not None


DLQ_COLUMNS = """d.id, d.execution_id, d.original_queue_id, d.failed_at, d.attempt_count,
    d.last_error, d.requeued_at, d.closed_at, d.closed_reason, d.execution_context"""


async def list_dlq(connection: Connection, tenant_id: UUID, limit: int = 100) -> list[Any]:
    return await connection.fetch(
        f"""SELECT {DLQ_COLUMNS}
            FROM execution_dlq d JOIN executions e ON e.id = d.execution_id
            WHERE e.tenant_id = $1
            ORDER BY d.failed_at DESC
            LIMIT $2""",
        tenant_id,
        limit,
    )


async def get_dead_letter(connection: Connection, dlq_id: UUID) -> asyncpg.Record | None:
    return await connection.fetchrow(
        f"SELECT {DLQ_COLUMNS} FROM execution_dlq d WHERE d.id = $1", dlq_id
    )


async def lock_dead_lettered_job(
    connection: Connection, execution_id: UUID
) -> asyncpg.Record | None:
    """The execution's job if it sits in the DLQ, locked so no requeue or lease races us."""
    return await connection.fetchrow(
        """SELECT * FROM execution_queue WHERE execution_id = $1 AND status = 'failed'
           AND EXISTS (SELECT 1 FROM execution_dlq d WHERE d.execution_id = $1
                       AND d.requeued_at IS NULL AND d.closed_at IS NULL)
           FOR UPDATE""",
        execution_id,
    )


async def close_dead_letters(connection: Connection, execution_id: UUID, reason: str) -> int:
    """Close the execution's open DLQ entries: nothing will run them any more."""
    result: str = await connection.execute(
        """UPDATE execution_dlq SET closed_at = now(), closed_reason = $2
           WHERE execution_id = $1 AND requeued_at IS NULL AND closed_at IS NULL""",
        execution_id,
        reason,
    )
    return int(result.split()[-1])


async def requeue_dead_letter(
    connection: Connection, tenant_id: UUID, dlq_id: UUID
) -> asyncpg.Record | None:
    """Put a dead-lettered job back in the queue with fresh attempts; None if unknown."""
    entry = await connection.fetchrow(
        """SELECT d.* FROM execution_dlq d JOIN executions e ON e.id = d.execution_id
           WHERE d.id = $1 AND e.tenant_id = $2 AND d.requeued_at IS NULL
             AND d.closed_at IS NULL
           FOR UPDATE OF d""",
        dlq_id,
        tenant_id,
    )
    if entry is None:
        return None
    await connection.execute(
        """UPDATE execution_queue
           SET status = 'queued', attempt = 0, available_at = now(), completed_at = NULL,
               last_error = NULL
           WHERE id = $1""",
        entry["original_queue_id"],
    )
    await connection.execute("UPDATE execution_dlq SET requeued_at = now() WHERE id = $1", dlq_id)
    await notify(connection, QUEUE_CHANNEL, str(entry["execution_id"]))
    return entry
