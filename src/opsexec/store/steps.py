"""SQL for ``execution_steps`` while an execution runs."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg

from opsexec.safety.masking import mask_text
from opsexec.store import Connection

START_STEP = """
UPDATE execution_steps
SET status = 'running', attempt = $2, started_at = coalesce(started_at, clock_timestamp()),
    ended_at = NULL, error_class = NULL, error_message = NULL
WHERE id = $1
RETURNING *
"""

FINISH_STEP = """
UPDATE execution_steps
SET status = $2::execution_status,
    ended_at = clock_timestamp(),
    duration_ms = (extract(epoch FROM clock_timestamp() - started_at) * 1000)::int,
    timed_out = $3,
    output_summary = $4,
    output_size_bytes = $5,
    output_ref = $6,
    error_class = $7,
    error_message = $8
WHERE id = $1
RETURNING *
"""


async def steps_of(connection: Connection, execution_id: UUID) -> list[asyncpg.Record]:
    return await connection.fetch(
        "SELECT * FROM execution_steps WHERE execution_id = $1 ORDER BY step_number",
        execution_id,
    )


async def start_step(connection: Connection, step_id: UUID, attempt: int) -> asyncpg.Record:
    row = await connection.fetchrow(START_STEP, step_id, attempt)
    assert row is not None
    return row


async def finish_step(
    connection: Connection,
    step_id: UUID,
    *,
    status: str,
    timed_out: bool = False,
    output_summary: dict[str, Any] | None = None,
    output_size_bytes: int | None = None,
    output_ref: str | None = None,
    error_class: str | None = None,
    error_message: str | None = None,
) -> asyncpg.Record:
    row = await connection.fetchrow(
        FINISH_STEP,
        step_id,
        status,
        timed_out,
        output_summary,
        output_size_bytes,
        output_ref,
        error_class,
        mask_text(error_message) if error_message else None,
    )
    assert row is not None
    return row


async def skip_unstarted(connection: Connection, execution_id: UUID, status: str) -> int:
    """Close steps that never ran (cancelled, or their execution failed first)."""
    result: str = await connection.execute(
        """UPDATE execution_steps SET status = $2::execution_status
           WHERE execution_id = $1 AND status IN ('pending', 'approved')""",
        execution_id,
        status,
    )
    return int(result.split()[-1])


async def abandon_running(
    connection: Connection, execution_id: UUID, status: str, error_class: str, message: str
) -> int:
    """Close steps left ``running`` by a worker that is gone, saying their outcome is unknown."""
    result: str = await connection.execute(
        """UPDATE execution_steps
           SET status = $2::execution_status, error_class = $3, error_message = $4,
               ended_at = greatest(now(), started_at)
           WHERE execution_id = $1 AND status = 'running'""",
        execution_id,
        status,
        error_class,
        message,
    )
    return int(result.split()[-1])


async def artifact_for_step(
    connection: Connection, tenant_id: UUID, execution_id: UUID, step_number: int
) -> asyncpg.Record | None:
    return await connection.fetchrow(
        """SELECT a.content_type, a.size_bytes, a.content
           FROM execution_steps s
           JOIN artifacts a ON a.step_id = s.id AND a.tenant_id = $1
           WHERE s.execution_id = $2 AND s.step_number = $3
           ORDER BY a.created_at DESC LIMIT 1""",
        tenant_id,
        execution_id,
        step_number,
    )


async def cancellation_requested(connection: Connection, execution_id: UUID) -> bool:
    requested: bool = await connection.fetchval(
        "SELECT cancelled_at IS NOT NULL FROM executions WHERE id = $1", execution_id
    )
    return requested
