"""Cancellation (R-CANCEL): a request the engine honours at the next step boundary.

Cancel is idempotent: a repeat answers with the same ``cancelled_by``/``cancelled_at``.
An execution that is not running stops at once; a running one keeps its current step
(unless ``force`` interrupts it) and never starts another.
"""

from __future__ import annotations

from collections.abc import Callable
from uuid import UUID

import asyncpg

from opsexec.engine.actor import Actor
from opsexec.engine.unattended import end_unattended
from opsexec.errors import ConflictError, NotFoundError
from opsexec.fsm import TERMINAL, ExecutionStatus
from opsexec.observability import metrics
from opsexec.safety.mutex import release_execution_locks
from opsexec.store import Connection, events, executions, queue, transaction
from opsexec.store import steps as step_store
from opsexec.store.channels import CANCEL_CHANNEL, notify

S = ExecutionStatus


class ExecutionFinishedError(ConflictError):
    code = "execution_finished"
    title = "Execution already finished"


async def request_cancel(
    pool: asyncpg.Pool,
    actor: Actor,
    execution_id: UUID,
    *,
    reason: str | None,
    force: bool,
    interrupt: Callable[[UUID], bool] | None = None,
) -> asyncpg.Record:
    """Record the cancel and stop what can be stopped; returns the execution row."""
    async with transaction(pool) as connection:
        execution = await executions.get_execution(
            connection, actor.tenant_id, execution_id, for_update=True
        )
        if execution is None:
            raise NotFoundError(f"execution {execution_id} not found")
        status = ExecutionStatus(execution["status"])
        if status == S.CANCELLED or (status == S.RUNNING and execution["cancelled_at"]):
            cancelled = execution
        elif status in TERMINAL:
            raise ExecutionFinishedError(
                f"execution {execution_id} already {status.value}; there is nothing to cancel",
                extra={"status": status.value},
            )
        else:
            cancelled = await _cancel(connection, actor, execution, reason)
        if force and cancelled["status"] == S.RUNNING:
            # Whichever worker process runs it hears this at commit and kills the step.
            await notify(connection, CANCEL_CHANNEL, str(execution_id))
    if cancelled["status"] == S.RUNNING and cancelled["execution_mode"] == "background":
        cancelled = await _end_if_dead_lettered(pool, actor, cancelled)
    if cancelled is not execution and cancelled["status"] == S.CANCELLED:
        metrics.execution_finished(cancelled)  # not running anywhere; the engine ends the rest
    if force and cancelled["status"] == S.RUNNING and interrupt is not None:
        interrupt(execution_id)
    return cancelled


async def _end_if_dead_lettered(
    pool: asyncpg.Pool, actor: Actor, execution: asyncpg.Record
) -> asyncpg.Record:
    """A dead-lettered execution has no worker to notice its cancel: end it here.

    Its job is locked first, so a concurrent requeue or lease waits and then finds the
    execution cancelled.
    """
    execution_id = execution["id"]
    async with transaction(pool) as connection:
        if await queue.lock_dead_lettered_job(connection, execution_id) is None:
            return execution
        closed = await queue.close_dead_letters(connection, execution_id, "cancelled")
        row = await end_unattended(
            connection,
            execution,
            to=S.CANCELLED,
            actor_id=actor.user_id,
            reason=execution["cancellation_reason"],
            event_kind="execution_cancelled",
            event_payload={"by": actor.principal, "dead_letters_closed": closed},
        )
    await release_execution_locks(pool, tenant_id=actor.tenant_id, execution_id=execution_id)
    return row


async def _cancel(
    connection: Connection,
    actor: Actor,
    execution: asyncpg.Record,
    reason: str | None,
) -> asyncpg.Record:
    execution_id = execution["id"]
    stamp = await connection.fetchval("SELECT clock_timestamp()")
    fields = {"cancelled_by": actor.user_id, "cancelled_at": stamp, "cancellation_reason": reason}
    await events.append_event(
        connection,
        execution_id,
        "cancellation_requested",
        {"by": actor.principal, "reason": reason, "status": execution["status"]},
    )
    if execution["status"] == S.RUNNING:
        # The engine sees cancelled_at at its next boundary and finishes the move itself.
        row = await connection.fetchrow(
            """UPDATE executions
               SET cancelled_by = $2, cancelled_at = $3, cancellation_reason = $4
               WHERE id = $1 RETURNING *""",
            execution_id,
            actor.user_id,
            stamp,
            reason,
        )
        assert row is not None
        return row
    row = await executions.transition(
        connection,
        execution_id,
        actor.tenant_id,
        expected=execution["status"],
        to=S.CANCELLED,
        actor_id=actor.user_id,
        reason=reason,
        fields=fields,
    )
    await step_store.skip_unstarted(connection, execution_id, S.CANCELLED)
    await queue.close_unrun(connection, execution_id, "cancelled")
    await queue.close_dead_letters(connection, execution_id, "cancelled")
    await events.append_event(
        connection, execution_id, "execution_cancelled", {"by": actor.principal}
    )
    return row
