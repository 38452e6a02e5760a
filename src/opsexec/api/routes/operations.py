"""Service-wide rollout controls (R-ROLL): the runtime kill switch and worker drain.

These act on every tenant at once, so they belong to the service's operators — the
administrators of ``OPSEXEC_OPERATOR_TENANT`` (``default``, the tenant ``serve``
creates on first start) — not to every tenant's admins. Each change is audited in
``audit_log`` under the operator's tenant.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

import asyncpg
from fastapi import APIRouter, Depends, Request, status
from pydantic import BaseModel, ConfigDict, Field

from opsexec.api.auth import Principal, require
from opsexec.engine.controls import (
    KillSwitchSource,
    KillSwitchState,
    ServiceControls,
    request_worker_drain,
)
from opsexec.errors import ConflictError, NotFoundError, PermissionDeniedError
from opsexec.observability.heartbeat import stale_after_s
from opsexec.safety.rbac import Permission
from opsexec.store import workers as store

router = APIRouter(prefix="/v1/admin", tags=["operations"])
logger = logging.getLogger(__name__)
Admin = Annotated[Principal, Depends(require(Permission.ADMIN))]


async def operator(request: Request, admin: Admin) -> Principal:
    """An admin of the operator tenant; other tenants' admins are refused (403)."""
    operator_tenant: str = request.app.state.settings.operator_tenant
    if admin.tenant_name != operator_tenant:
        raise PermissionDeniedError(
            f"service-wide controls belong to the administrators of tenant {operator_tenant}",
            extra={"permission": "admin", "operator_tenant": operator_tenant},
        )
    return admin


Operator = Annotated[Principal, Depends(operator)]


class KillSwitchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    engaged: bool = Field(description="true: refuse every new execution with 503.")
    reason: str | None = Field(default=None, max_length=2000, examples=["rollback of 7.0.0"])


class KillSwitchOut(BaseModel):
    engaged: bool = Field(description="New executions are refused (either switch).")
    source: KillSwitchSource | None
    environment: bool = Field(description="OPSEXEC_KILL_SWITCH; only a restart releases it.")
    runtime: bool = Field(description="The switch this endpoint sets, shared by all processes.")
    reason: str | None
    changed_at: datetime | None
    changed_by: UUID | None


class DrainIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(default=None, max_length=2000)


WorkerState = Literal["running", "draining", "stale", "stopped"]


class WorkerOut(BaseModel):
    worker_id: str
    state: WorkerState = Field(
        description="stale: no heartbeat for three intervals and no goodbye (probably dead)."
    )
    hostname: str | None
    pid: int | None
    concurrency: int
    running_jobs: int
    started_at: datetime
    last_seen_at: datetime
    drain_requested_at: datetime | None
    stopped_at: datetime | None


def _controls(request: Request) -> ServiceControls:
    controls: ServiceControls = request.app.state.executor.controls
    return controls


def _kill_switch(state: KillSwitchState) -> KillSwitchOut:
    return KillSwitchOut(
        engaged=state.engaged,
        source=state.source,
        environment=state.environment,
        runtime=state.runtime,
        reason=state.reason,
        changed_at=state.changed_at,
        changed_by=state.changed_by,
    )


def _worker(row: asyncpg.Record) -> WorkerOut:
    state: WorkerState
    if row["stopped_at"] is not None:
        state = "stopped"
    elif not row["fresh"]:
        state = "stale"
    else:
        state = "draining" if row["drain_requested_at"] is not None else "running"
    fields = {name: row[name] for name in WorkerOut.model_fields if name != "state"}
    return WorkerOut(state=state, **fields)


def _fresh_within_s(request: Request) -> float:
    return stale_after_s(request.app.state.settings.worker_heartbeat_s)


@router.get("/kill-switch", response_model=KillSwitchOut)
async def get_kill_switch(request: Request, _: Operator) -> KillSwitchOut:
    return _kill_switch(await _controls(request).kill_switch(fresh=True))


@router.put("/kill-switch", response_model=KillSwitchOut)
async def set_kill_switch(
    body: KillSwitchIn, request: Request, principal: Operator
) -> KillSwitchOut:
    """Engage or release the runtime kill switch for every process (audited).

    Engaged, every new submission gets 503 ``service_disabled`` (``reason: kill_switch``)
    within a second on every API process; executions already running finish. Releasing
    it cannot override ``OPSEXEC_KILL_SWITCH=true``.
    """
    state = await _controls(request).set_kill_switch(
        principal, engaged=body.engaged, reason=body.reason
    )
    logger.warning(
        "kill switch %s",
        "engaged" if body.engaged else "released",
        extra={"principal": principal.principal, "reason": body.reason},
    )
    return _kill_switch(state)


@router.get("/workers", response_model=list[WorkerOut])
async def list_workers(request: Request, _: Operator) -> list[WorkerOut]:
    """Every worker process that heartbeats (or did within a week), live ones first."""
    async with request.app.state.db.pool.acquire() as connection:
        rows = await store.list_workers(connection, fresh_within_s=_fresh_within_s(request))
    return [_worker(row) for row in rows]


@router.get("/workers/{worker_id}", response_model=WorkerOut)
async def get_worker(worker_id: str, request: Request, _: Operator) -> WorkerOut:
    async with request.app.state.db.pool.acquire() as connection:
        row = await store.get_worker(connection, worker_id, fresh_within_s=_fresh_within_s(request))
    if row is None:
        raise NotFoundError(f"worker {worker_id} not found")
    return _worker(row)


@router.post(
    "/workers/{worker_id}/drain",
    response_model=WorkerOut,
    status_code=status.HTTP_202_ACCEPTED,
)
async def drain_worker(
    worker_id: str, request: Request, principal: Operator, body: DrainIn | None = None
) -> WorkerOut:
    """Ask one worker to lease nothing new, finish the jobs it holds, and exit (audited).

    Accepted, not done: poll ``GET /v1/admin/workers/{worker_id}`` until ``stopped``.
    Asking again is harmless.
    """
    drained = await request_worker_drain(
        request.app.state.db.pool,
        worker_id,
        audit_tenant_id=principal.tenant_id,
        actor_id=principal.user_id,
        reason=body.reason if body else None,
        fresh_within_s=_fresh_within_s(request),
    )
    if drained is None:
        raise NotFoundError(f"worker {worker_id} not found")
    if drained.already_stopped:
        raise ConflictError(
            f"worker {worker_id} already stopped",
            extra={"stopped_at": str(drained.worker["stopped_at"])},
        )
    logger.info("worker drain requested", extra={"target_worker": worker_id})
    return _worker(drained.worker)
