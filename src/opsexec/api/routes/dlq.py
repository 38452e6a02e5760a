"""The dead-letter queue: jobs whose attempts are spent, kept for a person to decide."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from opsexec.api.auth import Principal, require
from opsexec.errors import NotFoundError
from opsexec.safety.rbac import Permission
from opsexec.store import events, transaction
from opsexec.store import queue as store

router = APIRouter(prefix="/v1/dlq", tags=["dead-letter queue"])
Admin = Annotated[Principal, Depends(require(Permission.ADMIN))]


class DeadLetter(BaseModel):
    id: UUID
    execution_id: UUID
    original_queue_id: UUID | None
    failed_at: datetime
    attempt_count: int
    last_error: str | None
    requeued_at: datetime | None
    closed_at: datetime | None
    closed_reason: str | None = Field(
        description="Why the entry was closed without a requeue: its execution was cancelled."
    )
    execution_context: dict[str, Any]


@router.get("", response_model=list[DeadLetter])
async def list_dead_letters(
    request: Request, principal: Admin, limit: Annotated[int, Query(ge=1, le=500)] = 100
) -> list[DeadLetter]:
    """Newest first, with the context needed to retry by hand."""
    async with request.app.state.db.pool.acquire() as connection:
        rows = await store.list_dlq(connection, principal.tenant_id, limit)
    return [DeadLetter.model_validate(dict(r)) for r in rows]


@router.post("/{dlq_id}/requeue", response_model=DeadLetter)
async def requeue(dlq_id: UUID, request: Request, principal: Admin) -> DeadLetter:
    """Put the job back in the queue with fresh attempts; workers are woken at once."""
    async with transaction(request.app.state.db.pool) as connection:
        entry = await store.requeue_dead_letter(connection, principal.tenant_id, dlq_id)
        if entry is None:
            raise NotFoundError(f"no open dead letter {dlq_id} waiting to be requeued")
        await events.append_event(
            connection,
            entry["execution_id"],
            "requeued",
            {"dlq_id": str(dlq_id), "by": principal.principal},
        )
        row = await store.get_dead_letter(connection, dlq_id)
    assert row is not None
    return DeadLetter.model_validate(dict(row))
