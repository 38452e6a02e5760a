"""SQL for approvals: requests bound to a plan hash, decisions, expiry, invalidation."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

import asyncpg

from opsexec.store import Connection

_COLUMN_NAMES = (
    "id",
    "execution_id",
    "step_number",
    "approval_level",
    "required_role",
    "plan_hash",
    "plan_snapshot_hash",
    "approver_id",
    "approver_principal",
    "auth_method",
    "state",
    "decided_at",
    "reason",
    "runbook_url",
    "created_at",
    "expires_at",
    "auto_approved",
    "auto_approval_policy",
    "invalidated_at",
    "metadata",
)


def _columns(alias: str = "approvals") -> str:
    # source_ip is inet; clients get the plain address text.
    named = ", ".join(f"{alias}.{name}" for name in _COLUMN_NAMES)
    return f"{named}, host({alias}.source_ip) AS source_ip"


APPROVAL_COLUMNS = _columns()


async def request_approval(
    connection: Connection,
    execution_id: UUID,
    *,
    level: int,
    required_role: str | None,
    plan_hash: str,
    snapshot_hash: str,
    runbook_url: str | None,
    expires_in: timedelta,
    step_number: int | None = None,
) -> asyncpg.Record:
    row = await connection.fetchrow(
        f"""INSERT INTO approvals (execution_id, step_number, approval_level, required_role,
                plan_hash, plan_snapshot_hash, runbook_url, expires_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, now() + $8::interval)
            RETURNING {APPROVAL_COLUMNS}""",
        execution_id,
        step_number,
        level,
        required_role,
        plan_hash,
        snapshot_hash,
        runbook_url,
        expires_in,
    )
    assert row is not None
    return row


async def record_auto_approval(
    connection: Connection,
    execution_id: UUID,
    *,
    level: int,
    plan_hash: str,
    snapshot_hash: str,
    runbook_url: str | None,
    policy_name: str,
    requester_principal: str,
) -> asyncpg.Record:
    row = await connection.fetchrow(
        f"""INSERT INTO approvals (execution_id, approval_level, plan_hash, plan_snapshot_hash,
                runbook_url, state, decided_at, auto_approved, auto_approval_policy, reason)
            VALUES ($1, $2, $3, $4, $5, 'approved', now(), true, $6, $7)
            RETURNING {APPROVAL_COLUMNS}""",
        execution_id,
        level,
        plan_hash,
        snapshot_hash,
        runbook_url,
        policy_name,
        f"auto-approved for {requester_principal} by policy {policy_name}",
    )
    assert row is not None
    return row


async def pending_approval(
    connection: Connection, execution_id: UUID, step_number: int | None
) -> asyncpg.Record | None:
    """The open request (plan-level, or for one gated step), locked for the decision."""
    return await connection.fetchrow(
        f"""SELECT {APPROVAL_COLUMNS} FROM approvals
            WHERE execution_id = $1 AND step_number IS NOT DISTINCT FROM $2
              AND state = 'pending' AND invalidated_at IS NULL
            ORDER BY created_at DESC LIMIT 1
            FOR UPDATE""",
        execution_id,
        step_number,
    )


async def record_decision(
    connection: Connection,
    approval_id: UUID,
    *,
    state: str,
    approver_id: UUID,
    approver_principal: str,
    auth_method: str,
    source_ip: str | None,
    reason: str | None,
) -> asyncpg.Record:
    row = await connection.fetchrow(
        f"""UPDATE approvals
            SET state = $2::approval_state, approver_id = $3, approver_principal = $4,
                auth_method = $5, source_ip = $6::inet, reason = $7, decided_at = now()
            WHERE id = $1 AND state = 'pending'
            RETURNING {APPROVAL_COLUMNS}""",
        approval_id,
        state,
        approver_id,
        approver_principal,
        auth_method,
        source_ip,
        reason,
    )
    assert row is not None, "decision on an approval that is no longer pending"
    return row


async def expire(connection: Connection, approval_id: UUID) -> None:
    await connection.execute(
        """UPDATE approvals SET state = 'expired', decided_at = now()
           WHERE id = $1 AND state = 'pending'""",
        approval_id,
    )


async def invalidate_all(connection: Connection, execution_id: UUID, why: str) -> int:
    """Void every live approval of an execution: what they approved no longer exists."""
    result: str = await connection.execute(
        """UPDATE approvals
           SET invalidated_at = now(),
               metadata = metadata || jsonb_build_object('invalidated_because', $2::text)
           WHERE execution_id = $1 AND invalidated_at IS NULL""",
        execution_id,
        why,
    )
    return int(result.split()[-1])


async def list_for_execution(connection: Connection, execution_id: UUID) -> list[asyncpg.Record]:
    return await connection.fetch(
        f"SELECT {APPROVAL_COLUMNS} FROM approvals WHERE execution_id = $1 ORDER BY created_at",
        execution_id,
    )


async def list_pending(connection: Connection, tenant_id: UUID) -> list[asyncpg.Record]:
    return await connection.fetch(
        f"""SELECT {_columns("a")}, e.actor_id AS requester_id, e.status AS execution_status
            FROM approvals a JOIN executions e ON e.id = a.execution_id
            WHERE e.tenant_id = $1 AND a.state = 'pending' AND a.invalidated_at IS NULL
            ORDER BY a.created_at""",
        tenant_id,
    )


async def due_for_expiry(connection: Connection, limit: int = 100) -> list[Any]:
    """Pending approvals past their deadline, with their execution's tenant."""
    return await connection.fetch(
        """SELECT a.id, a.execution_id, a.step_number, e.tenant_id, e.status
           FROM approvals a JOIN executions e ON e.id = a.execution_id
           WHERE a.state = 'pending' AND a.invalidated_at IS NULL AND a.expires_at < now()
           ORDER BY a.expires_at
           LIMIT $1
           FOR UPDATE OF a SKIP LOCKED""",
        limit,
    )


async def step_approved(connection: Connection, execution_id: UUID, step_number: int) -> bool:
    """A level-3 gate is open: its step's approval was given and not voided since."""
    approved: bool = await connection.fetchval(
        """SELECT EXISTS (SELECT 1 FROM approvals
           WHERE execution_id = $1 AND step_number = $2 AND state = 'approved'
             AND invalidated_at IS NULL)""",
        execution_id,
        step_number,
    )
    return approved
