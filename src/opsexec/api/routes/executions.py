"""Executions: submit, read, amend, approve and reject."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

import asyncpg
from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field

from opsexec.api.auth import CurrentPrincipal, Principal, require
from opsexec.engine.approvals import approval_view, decide_approval
from opsexec.engine.executor import Executor, Submission
from opsexec.errors import NotFoundError, ValidationError
from opsexec.fsm import ExecutionStatus
from opsexec.safety.cancellation import request_cancel
from opsexec.safety.rbac import Permission
from opsexec.store import Connection
from opsexec.store import approvals as approval_store
from opsexec.store import executions as store
from opsexec.store.steps import artifact_for_step

router = APIRouter(prefix="/v1", tags=["executions"])
Reader = Annotated[Principal, Depends(require(Permission.EXECUTION_READ))]
Canceller = Annotated[Principal, Depends(require(Permission.EXECUTION_CANCEL))]

COUNT_ASSETS_EXAMPLE = {
    "plan": {
        "steps": [
            {
                "id": "count",
                "action": "inventory.count",
                "targets": [],
                "inputs": {"group_by": "tags"},
                "estimated_duration_s": 1,
            }
        ]
    }
}


class ExecutionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: dict[str, Any] = Field(
        description="A native plan (R-PLAN-1) or an upstream PlanV1 document, unchanged."
    )
    request_id: UUID | None = Field(default=None, description="Your correlation id.")
    priority: int | Literal["urgent", "normal", "bulk"] | None = None
    mode: Literal["immediate", "background"] | None = None
    runbook_url: str | None = Field(default=None, max_length=2000)
    metadata: dict[str, Any] = Field(default_factory=dict)


class AmendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    plan: dict[str, Any]
    runbook_url: str | None = Field(default=None, max_length=2000)


class DecisionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(default=None, max_length=2000)
    step_number: int | None = Field(default=None, ge=1)


class RejectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000)
    step_number: int | None = Field(default=None, ge=1)


class CancelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(default=None, max_length=2000)
    force: bool = Field(
        default=False, description="Also interrupt the running step (its process is killed)."
    )


class StepCounts(BaseModel):
    total: int
    pending: int
    running: int
    succeeded: int
    failed: int
    cancelled: int


class ExecutionOut(BaseModel):
    id: UUID
    status: ExecutionStatus
    execution_mode: str
    approval_level: int
    sla_class: str
    plan_hash: str
    timeout_policy_id: str | None
    timeout_ms: int | None
    request_id: UUID | None
    actor_id: UUID
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    duration_ms: int | None
    queue_wait_ms: int | None
    steps: StepCounts
    result_summary: dict[str, Any] | None
    error_class: str | None
    error_message: str | None
    cancelled_by: UUID | None
    cancelled_at: datetime | None
    cancellation_reason: str | None
    timed_out: bool
    retries_total: int
    worker_id: str | None
    lease_renewals: int
    cancel_checks_performed: int
    last_transition_at: datetime | None
    last_transition_from: str | None
    estimated_duration_s: float | None
    gated_step_ids: list[str]
    runbook_url: str | None
    links: dict[str, str]


class ExecutionDetail(ExecutionOut):
    plan: dict[str, Any]
    approvals: list[dict[str, Any]]


class ExecutionPage(BaseModel):
    items: list[ExecutionOut]
    next_cursor: str | None


class StepOut(BaseModel):
    step_number: int
    step_key: str
    action: str
    target_ref: str | None
    status: ExecutionStatus
    attempt: int
    max_retries: int
    started_at: datetime | None
    ended_at: datetime | None
    duration_ms: int | None
    timeout_ms: int | None
    timed_out: bool
    output_summary: Any
    output_size_bytes: int | None
    error_class: str | None
    error_message: str | None


def executor(request: Request) -> Executor:
    return request.app.state.executor  # type: ignore[no-any-return]


def _counts(raw: dict[str, int]) -> StepCounts:
    return StepCounts(
        total=sum(raw.values()),
        pending=raw.get("pending", 0) + raw.get("approved", 0) + raw.get("awaiting_approval", 0),
        running=raw.get("running", 0),
        succeeded=raw.get("succeeded", 0),
        failed=raw.get("failed", 0),
        cancelled=raw.get("cancelled", 0) + raw.get("rejected", 0),
    )


async def execution_view(connection: Connection, row: asyncpg.Record) -> ExecutionOut:
    metadata = row["metadata"]
    base = f"/v1/executions/{row['id']}"
    return ExecutionOut(
        **{name: row[name] for name in ExecutionOut.model_fields if name in row},
        steps=_counts(await store.step_counts(connection, row["id"])),
        estimated_duration_s=metadata.get("estimated_duration_s"),
        gated_step_ids=metadata.get("gated_step_ids", []),
        runbook_url=metadata.get("runbook_url"),
        links={
            "self": base,
            "steps": f"{base}/steps",
            "events": f"{base}/events",
            "approve": f"{base}/approve",
            "reject": f"{base}/reject",
            "cancel": f"{base}/cancel",
        },
    )


async def _detail(request: Request, row: asyncpg.Record) -> ExecutionDetail:
    async with request.app.state.db.pool.acquire() as connection:
        view = await execution_view(connection, row)
        approvals = await approval_store.list_for_execution(connection, row["id"])
    return ExecutionDetail(
        **view.model_dump(),
        plan=row["plan_snapshot"],
        approvals=[approval_view(a) for a in approvals],
    )


@router.post(
    "/executions",
    response_model=ExecutionDetail,
    status_code=status.HTTP_201_CREATED,
    responses={200: {"description": "A duplicate of a live execution: that execution."}},
)
async def submit_execution(
    request: Request,
    response: Response,
    principal: CurrentPrincipal,
    body: Annotated[ExecutionRequest, Body(examples=[COUNT_ASSETS_EXAMPLE])],
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> ExecutionDetail:
    """Submit a plan. A repeat of a live submission returns that execution with 200.

    Immediate level-0 plans answer with the finished execution.
    """
    submitted = await executor(request).submit(
        principal,
        Submission(
            plan=body.plan,
            request_id=body.request_id,
            priority=body.priority,
            mode=body.mode,
            runbook_url=body.runbook_url,
            metadata=body.metadata,
            idempotency_key=idempotency_key or None,
        ),
    )
    response.status_code = status.HTTP_201_CREATED if submitted.created else status.HTTP_200_OK
    response.headers["Location"] = f"/v1/executions/{submitted.execution['id']}"
    return await _detail(request, submitted.execution)


def _decode_cursor(cursor: str | None) -> tuple[datetime, UUID] | None:
    if not cursor:
        return None
    try:
        created_at, execution_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(created_at), UUID(execution_id)
    except (ValueError, TypeError, binascii.Error):
        raise ValidationError("cursor is not one this API issued", pointer="/cursor") from None


def _encode_cursor(row: asyncpg.Record) -> str:
    raw = json.dumps([row["created_at"].isoformat(), str(row["id"])])
    return base64.urlsafe_b64encode(raw.encode()).decode()


@router.get("/executions", response_model=ExecutionPage)
async def list_executions(
    request: Request,
    principal: Reader,
    status_filter: Annotated[list[ExecutionStatus] | None, Query(alias="status")] = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> ExecutionPage:
    """Newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
    async with request.app.state.db.pool.acquire() as connection:
        rows = await store.list_executions(
            connection,
            principal.tenant_id,
            statuses=[s.value for s in status_filter] if status_filter else None,
            before=_decode_cursor(cursor),
            limit=limit + 1,
        )
        items = [await execution_view(connection, r) for r in rows[:limit]]
    return ExecutionPage(
        items=items, next_cursor=_encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    )


async def load_execution(request: Request, principal: Principal, execution_id: UUID) -> Any:
    async with request.app.state.db.pool.acquire() as connection:
        return await executor(request).get(connection, principal, execution_id)


@router.get("/executions/{execution_id}", response_model=ExecutionDetail)
async def get_execution(execution_id: UUID, request: Request, principal: Reader) -> ExecutionDetail:
    return await _detail(request, await load_execution(request, principal, execution_id))


@router.get("/executions/{execution_id}/steps", response_model=list[StepOut])
async def list_steps(execution_id: UUID, request: Request, principal: Reader) -> list[StepOut]:
    await load_execution(request, principal, execution_id)
    async with request.app.state.db.pool.acquire() as connection:
        rows = await store.list_steps(connection, execution_id)
    return [StepOut.model_validate(dict(r)) for r in rows]


@router.put("/executions/{execution_id}/plan", response_model=ExecutionDetail)
async def amend_plan(
    execution_id: UUID, body: AmendRequest, request: Request, principal: CurrentPrincipal
) -> ExecutionDetail:
    """Replace the plan while the execution waits; its approvals are voided."""
    row = await executor(request).amend(
        principal, execution_id, body.plan, runbook_url=body.runbook_url
    )
    return await _detail(request, row)


async def _decide(
    request: Request,
    principal: Principal,
    execution_id: UUID,
    *,
    approve: bool,
    reason: str | None,
    step_number: int | None,
) -> ExecutionDetail:
    # Visibility first: a foreign execution is a 404 (and recorded) before any role check.
    await load_execution(request, principal, execution_id)
    if approve:  # an approval starts work; a rejection only ever stops it
        await executor(request).ensure_enabled(principal)
    decision = await decide_approval(
        request.app.state.db.pool,
        principal,
        execution_id,
        principal.tenant_settings,
        approve=approve,
        reason=reason,
        step_number=step_number,
    )
    execution = await executor(request).after_approval(decision.execution)
    return await _detail(request, execution)


@router.post("/executions/{execution_id}/approve", response_model=ExecutionDetail)
async def approve(
    execution_id: UUID,
    request: Request,
    principal: CurrentPrincipal,
    body: DecisionRequest | None = None,
) -> ExecutionDetail:
    """Approve the pending (plan or gated-step) approval; a fast plan then runs at once."""
    body = body or DecisionRequest()
    return await _decide(
        request,
        principal,
        execution_id,
        approve=True,
        reason=body.reason,
        step_number=body.step_number,
    )


@router.post("/executions/{execution_id}/reject", response_model=ExecutionDetail)
async def reject(
    execution_id: UUID, body: RejectRequest, request: Request, principal: CurrentPrincipal
) -> ExecutionDetail:
    return await _decide(
        request,
        principal,
        execution_id,
        approve=False,
        reason=body.reason,
        step_number=body.step_number,
    )


@router.post("/executions/{execution_id}/cancel", response_model=ExecutionDetail)
async def cancel(
    execution_id: UUID,
    request: Request,
    principal: Canceller,
    body: CancelRequest | None = None,
) -> ExecutionDetail:
    """Cancel; idempotent. A running execution stops at its next step boundary."""
    body = body or CancelRequest()
    await load_execution(request, principal, execution_id)
    engine = getattr(request.app.state, "engine", None)
    row = await request_cancel(
        request.app.state.db.pool,
        principal,
        execution_id,
        reason=body.reason,
        force=body.force,
        interrupt=engine.interrupt if engine is not None else None,
    )
    return await _detail(request, row)


@router.get(
    "/executions/{execution_id}/steps/{step_number}/output",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def step_output(
    execution_id: UUID, step_number: int, request: Request, principal: Reader
) -> Response:
    """The full (masked) output of one step, with its content type."""
    await load_execution(request, principal, execution_id)
    async with request.app.state.db.pool.acquire() as connection:
        artifact = await artifact_for_step(
            connection, principal.tenant_id, execution_id, step_number
        )
    if artifact is None:
        raise NotFoundError(f"step {step_number} of execution {execution_id} has no output")
    return Response(
        content=bytes(artifact["content"]),
        media_type=artifact["content_type"],
        headers={"X-Output-Size": str(artifact["size_bytes"])},
    )


@router.get("/approvals", tags=["approvals"])
async def list_approvals(
    request: Request,
    principal: Reader,
    state: Literal["pending"] = "pending",
) -> list[dict[str, Any]]:
    """Open approval requests of the tenant, oldest first, with what they approve."""
    async with request.app.state.db.pool.acquire() as connection:
        rows = await approval_store.list_pending(connection, principal.tenant_id)
    return [
        approval_view(r)
        | {"requester_id": str(r["requester_id"]), "execution_status": r["execution_status"]}
        for r in rows
    ]
