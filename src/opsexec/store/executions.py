"""SQL for the ``executions`` table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

import asyncpg

from opsexec.errors import FSMError, NotFoundError
from opsexec.fsm import TERMINAL, ExecutionStatus, check_move
from opsexec.safety.masking import mask_value
from opsexec.store.events import append_event

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
    connection: asyncpg.Connection,
    execution_id: UUID,
    tenant_id: UUID,
    *,
    expected: ExecutionStatus | str,
    to: ExecutionStatus | str,
    actor_id: UUID | None,
    reason: str | None = None,
    fields: Mapping[str, Any] | None = None,
) -> asyncpg.Record:
    """Move an execution ``expected → to`` as a compare-and-set, with its audit event.

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
    await append_event(connection, execution_id, "status_transition", payload)
    return row
