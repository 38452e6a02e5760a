"""SQL for the ``executions`` table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from opsexec.errors import FSMError, NotFoundError
from opsexec.fsm import TERMINAL, ExecutionStatus, check_move
from opsexec.safety.masking import mask_value
from opsexec.store import Connection
from opsexec.store.events import append_events

# Columns a transition may set alongside the status; values are always parameters.
TRANSITION_FIELDS = frozenset(
    {
        "error_class",
        "error_message",
        "result_summary",
        "timed_out",
        "cancelled_by",
        "cancelled_at",
        "cancellation_reason",
        "worker_id",
        "queue_wait_ms",
        "retries_total",
        "cancel_checks_performed",
    }
)
_MASKED_FIELDS = frozenset({"error_message", "result_summary", "cancellation_reason"})
# A failed, cancelled or rejected execution frees its idempotency key at once (R-IDEM-2).
_RETIRING = frozenset({ExecutionStatus.FAILED, ExecutionStatus.CANCELLED, ExecutionStatus.REJECTED})

TRANSITION = """
UPDATE executions
SET status = $4::execution_status,
    last_transition_from = status,
    last_transition_at = clock_timestamp(),
    last_transition_by = $5,
    started_at = CASE WHEN $4::execution_status = 'running'
                      THEN coalesce(started_at, clock_timestamp()) ELSE started_at END,
    ended_at = CASE WHEN $6 THEN clock_timestamp() ELSE ended_at END,
    duration_ms = CASE WHEN $6 AND started_at IS NOT NULL
        THEN (extract(epoch FROM clock_timestamp() - started_at) * 1000)::int
        ELSE duration_ms END,
    idempotency_active = idempotency_active AND NOT $7
    {extra_assignments}
WHERE id = $1 AND tenant_id = $2 AND status = $3::execution_status
RETURNING *
"""


async def transition(
    connection: Connection,
    execution_id: UUID,
    tenant_id: UUID,
    *,
    expected: ExecutionStatus | str,
    to: ExecutionStatus | str,
    actor_id: UUID | None,
    reason: str | None = None,
    fields: Mapping[str, Any] | None = None,
    then: Sequence[tuple[str, Mapping[str, Any]]] = (),
) -> asyncpg.Record:
    """Move an execution ``expected → to`` as a compare-and-set, with its audit event.

    ``then`` are events that follow the ``status_transition`` one (``execution_running``,
    ``execution_completed``...), written with it in one statement.

    Call inside a transaction: the status change, the audit stamp and the
    ``status_transition`` event commit together or not at all. Raises ``FSMError`` for an
    illegal move or when another writer changed the status first (the race loser).
    """
    expected, to = ExecutionStatus(expected), ExecutionStatus(to)
    check_move(expected, to)
    fields = dict(fields or {})
    unknown = set(fields) - TRANSITION_FIELDS
    if unknown:
        raise ValueError(f"transition cannot set {sorted(unknown)}")
    for name in _MASKED_FIELDS & fields.keys():
        fields[name] = mask_value(fields[name])
    names = sorted(fields)
    assignments = "".join(f",\n    {name} = ${i}" for i, name in enumerate(names, start=8))
    row = await connection.fetchrow(
        TRANSITION.format(extra_assignments=assignments),
        execution_id,
        tenant_id,
        expected.value,
        to.value,
        actor_id,
        to in TERMINAL,
        to in _RETIRING,
        *(fields[name] for name in names),
    )
    if row is None:
        current = await connection.fetchval(
            "SELECT status FROM executions WHERE id = $1 AND tenant_id = $2",
            execution_id,
            tenant_id,
        )
        if current is None:
            raise NotFoundError(f"execution {execution_id} not found")
        raise FSMError(
            f"execution {execution_id} is {current}, not {expected}; it cannot move to {to}",
            extra={"from": current, "expected": expected.value, "to": to.value},
        )
    payload: dict[str, Any] = {"from": expected.value, "to": to.value}
    if actor_id is not None:
        payload["by"] = str(actor_id)
    if reason:
        payload["reason"] = reason
    await append_events(connection, execution_id, [("status_transition", payload), *then])
    return row


FIND_ACTIVE_BY_KEY = """
SELECT * FROM executions
WHERE tenant_id = $1 AND idempotency_key = $2 AND idempotency_active
"""

INSERT_EXECUTION = """
INSERT INTO executions (tenant_id, actor_id, request_id, idempotency_key, plan_hash,
    plan_snapshot, plan_size_bytes, step_count, target_count, execution_mode,
    approval_level, sla_class, timeout_ms, timeout_policy_id, metadata)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_active DO NOTHING
RETURNING *
"""

INSERT_STEPS = """
INSERT INTO execution_steps (execution_id, step_number, step_key, action, target_type,
    target_ref, max_retries, timeout_ms, metadata)
SELECT $1, s.step_number, s.step_key, s.action, s.target_type, s.target_ref, s.max_retries,
    s.timeout_ms, s.metadata
FROM unnest($2::int[], $3::varchar[], $4::varchar[], $5::varchar[], $6::varchar[], $7::int[],
            $8::int[], $9::jsonb[])
    AS s(step_number, step_key, action, target_type, target_ref, max_retries, timeout_ms,
         metadata)
"""


# An immediate run is bounded by its own timeout; one still `running` well past it has
# lost the process that ran it (immediate runs have no lease to expire).
ABANDONED_IMMEDIATE = """
SELECT * FROM executions
WHERE status = 'running' AND execution_mode = 'immediate'
  AND started_at < now() - make_interval(secs => timeout_ms / 1000.0 + $1)
ORDER BY started_at
LIMIT $2
FOR UPDATE SKIP LOCKED
"""


async def lock_abandoned_immediate(
    connection: Connection, grace_s: float, limit: int
) -> list[asyncpg.Record]:
    """Immediate executions still running ``grace_s`` past their timeout, locked."""
    return await connection.fetch(ABANDONED_IMMEDIATE, grace_s, limit)


async def find_active_by_key(
    connection: Connection, tenant_id: UUID, idempotency_key: str
) -> asyncpg.Record | None:
    """The execution currently holding an idempotency key.

    Not locked: duplicates of one plan arrive in bursts (refreshes, client retries) and
    must not queue behind each other. Retiring a key is idempotent and the insert that
    follows is arbitrated by the unique index, so no lock is needed for correctness.
    """
    return await connection.fetchrow(FIND_ACTIVE_BY_KEY, tenant_id, idempotency_key)


async def retire_idempotency_key(connection: Connection, execution_id: UUID) -> None:
    await connection.execute(
        "UPDATE executions SET idempotency_active = false WHERE id = $1 AND idempotency_active",
        execution_id,
    )


async def insert_execution(
    connection: Connection, values: Mapping[str, Any]
) -> asyncpg.Record | None:
    """Insert unless an active execution holds the key (then None: a racing twin won)."""
    return await connection.fetchrow(
        INSERT_EXECUTION,
        values["tenant_id"],
        values["actor_id"],
        values.get("request_id"),
        values["idempotency_key"],
        values["plan_hash"],
        values["plan_snapshot"],
        values["plan_size_bytes"],
        values["step_count"],
        values["target_count"],
        values["execution_mode"],
        values["approval_level"],
        values["sla_class"],
        values["timeout_ms"],
        values["timeout_policy_id"],
        values.get("metadata") or {},
    )


async def insert_steps(
    connection: Connection, execution_id: UUID, steps: Sequence[Mapping[str, Any]]
) -> None:
    """All expanded steps in one statement (a plan may expand to 10 000 of them)."""
    columns = ("step_number", "step_key", "action", "target_type", "target_ref")
    await connection.execute(
        INSERT_STEPS,
        execution_id,
        *([s[c] for s in steps] for c in columns),
        [s["max_retries"] for s in steps],
        [s["timeout_ms"] for s in steps],
        [s.get("metadata") or {} for s in steps],
    )


async def delete_steps(connection: Connection, execution_id: UUID) -> None:
    await connection.execute("DELETE FROM execution_steps WHERE execution_id = $1", execution_id)


# What the engine reads before a run, in one round trip: the execution, its tenant's
# settings and its requester's roles *now* (R-RBAC is checked at the worker too).
RUN_CONTEXT = """
SELECT e.*, t.settings AS run_tenant_settings,
       u.roles AS run_actor_roles, u.disabled AS run_actor_disabled
FROM executions e
JOIN tenants t ON t.id = e.tenant_id
LEFT JOIN users u ON u.id = e.actor_id AND u.tenant_id = e.tenant_id
WHERE e.id = $1 AND e.tenant_id = $2
"""


async def run_context(
    connection: Connection, tenant_id: UUID, execution_id: UUID
) -> asyncpg.Record | None:
    """The execution row plus ``run_tenant_settings``, ``run_actor_roles`` and
    ``run_actor_disabled`` (both None when the requester no longer exists)."""
    return await connection.fetchrow(RUN_CONTEXT, execution_id, tenant_id)


async def hand_over(connection: Connection, execution_id: UUID, worker_id: str) -> bool:
    """Name ``worker_id`` as the worker of a running execution it resumes; False if the
    execution is not running (it ended, or waits at a gate)."""
    moved = await connection.fetchval(
        "UPDATE executions SET worker_id = $2 WHERE id = $1 AND status = 'running' RETURNING id",
        execution_id,
        worker_id,
    )
    return moved is not None


async def get_execution(
    connection: Connection, tenant_id: UUID, execution_id: UUID, *, for_update: bool = False
) -> asyncpg.Record | None:
    lock = " FOR UPDATE" if for_update else ""
    return await connection.fetchrow(
        f"SELECT * FROM executions WHERE id = $1 AND tenant_id = $2{lock}",
        execution_id,
        tenant_id,
    )


async def execution_tenant(connection: Connection, execution_id: UUID) -> UUID | None:
    """The owner of an execution — only to record a cross-tenant probe, never to serve it."""
    tenant_id: UUID | None = await connection.fetchval(
        "SELECT tenant_id FROM executions WHERE id = $1", execution_id
    )
    return tenant_id


async def list_executions(
    connection: Connection,
    tenant_id: UUID,
    *,
    statuses: Sequence[str] | None,
    before: tuple[datetime, UUID] | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Newest first, keyset-paginated on (created_at, id) so pages never shift."""
    return await connection.fetch(
        """SELECT * FROM executions
           WHERE tenant_id = $1
             AND ($2::execution_status[] IS NULL OR status = ANY ($2::execution_status[]))
             AND ($3::timestamptz IS NULL OR (created_at, id) < ($3::timestamptz, $4::uuid))
           ORDER BY created_at DESC, id DESC
           LIMIT $5""",
        tenant_id,
        list(statuses) if statuses else None,
        before[0] if before else None,
        before[1] if before else None,
        limit,
    )


async def step_counts(connection: Connection, execution_id: UUID) -> dict[str, int]:
    rows = await connection.fetch(
        """SELECT status::text, count(*) AS n FROM execution_steps
           WHERE execution_id = $1 GROUP BY status""",
        execution_id,
    )
    return {row["status"]: row["n"] for row in rows}


async def list_steps(connection: Connection, execution_id: UUID) -> list[asyncpg.Record]:
    return await connection.fetch(
        "SELECT * FROM execution_steps WHERE execution_id = $1 ORDER BY step_number",
        execution_id,
    )


async def replace_plan(
    connection: Connection, execution_id: UUID, values: Mapping[str, Any]
) -> asyncpg.Record:
    """Swap in an amended plan and everything derived from it."""
    row = await connection.fetchrow(
        """UPDATE executions
           SET plan_hash = $2, plan_snapshot = $3, plan_size_bytes = $4, step_count = $5,
               target_count = $6, execution_mode = $7, approval_level = $8, sla_class = $9,
               timeout_ms = $10, timeout_policy_id = $11, idempotency_key = $12,
               metadata = metadata || $13
           WHERE id = $1
           RETURNING *""",
        execution_id,
        values["plan_hash"],
        values["plan_snapshot"],
        values["plan_size_bytes"],
        values["step_count"],
        values["target_count"],
        values["execution_mode"],
        values["approval_level"],
        values["sla_class"],
        values["timeout_ms"],
        values["timeout_policy_id"],
        values["idempotency_key"],
        values.get("metadata") or {},
    )
    assert row is not None
    return row
