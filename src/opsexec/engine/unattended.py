"""Ending executions that no process is running any more.

Normally the engine ends every execution it runs. Two kinds have nobody left to do it:
a dead-lettered background execution that is cancelled (no worker will lease it again),
and an immediate execution whose API process died mid-run (immediate runs have no queue
row, so no lease expires). Both are ended here, in the caller's transaction, the way the
engine would: the status move with its event, steps left ``running`` closed as
``IndeterminateStepOutcome`` (their effect is unknown), steps never started cancelled.
The caller releases the execution's locks after committing, as the engine does.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg

from opsexec.fsm import ExecutionStatus
from opsexec.store import Connection, events, executions
from opsexec.store import steps as step_store

S = ExecutionStatus

INTERRUPTED_STEP = (
    "IndeterminateStepOutcome",
    "the process running this step was lost; whether it took effect is unknown",
)


async def end_unattended(
    connection: Connection,
    execution: asyncpg.Record,
    *,
    to: ExecutionStatus,
    actor_id: UUID | None,
    event_kind: str,
    event_payload: dict[str, Any],
    reason: str | None = None,
    fields: dict[str, Any] | None = None,
) -> asyncpg.Record:
    """Move a ``running`` execution nobody runs to ``to`` and close its steps."""
    row = await executions.transition(
        connection,
        execution["id"],
        execution["tenant_id"],
        expected=S.RUNNING,
        to=to,
        actor_id=actor_id,
        reason=reason,
        fields=fields,
    )
    await step_store.abandon_running(connection, execution["id"], to, *INTERRUPTED_STEP)
    await step_store.skip_unstarted(connection, execution["id"], S.CANCELLED)
    await events.append_event(connection, execution["id"], event_kind, event_payload)
    return row
