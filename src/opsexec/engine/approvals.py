"""Approvals (R-APPR): who must approve what, bound to the exact plan that was approved.

Level 0 runs at once. Level 1 needs a confirmation, which the requester may give. Level 2
needs a holder of ``approver`` (or ``senior_approver``) who is not the requester, and a
runbook. Level 3 needs ``senior_approver``, not the requester, a runbook, and a separate
approval before each gated step. Every approval carries the plan hash and the hash of the
stored snapshot; a decision on a snapshot that no longer hashes the same is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg

from opsexec.engine.actor import Actor
from opsexec.errors import (
    ApprovalExpiredError,
    ApprovalInvalidatedError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
)
from opsexec.fsm import ExecutionStatus
from opsexec.observability import metrics
from opsexec.plan import snapshot_hash
from opsexec.safety.rbac import Permission, has_permission
from opsexec.store import Connection, events, executions, queue, transaction
from opsexec.store import approvals as store
from opsexec.store.identity import system_user_id
from opsexec.tenancy import AutoApprovalPolicy, TenantSettings

logger = logging.getLogger(__name__)
S = ExecutionStatus

ROLE_FOR_LEVEL: dict[int, str | None] = {0: None, 1: None, 2: "approver", 3: "senior_approver"}
# A senior approver may approve anything an approver may.
ROLES_SATISFYING: dict[str, frozenset[str]] = {
    "approver": frozenset({"approver", "senior_approver"}),
    "senior_approver": frozenset({"senior_approver"}),
}


def matching_auto_policy(
    settings: TenantSettings, requester_roles: tuple[str, ...], level: int
) -> AutoApprovalPolicy | None:
    """The first tenant policy that lets this requester's roles skip approval at ``level``."""
    for policy in settings.auto_approval:
        if level <= policy.max_level and set(policy.roles) & set(requester_roles):
            return policy
    return None


def check_may_decide(
    actor: Actor, *, requester_id: UUID, level: int, required_role: str | None
) -> None:
    """Raise ``PermissionDeniedError`` unless ``actor`` may decide this approval."""
    is_requester = actor.user_id == requester_id
    if level <= 1:
        if is_requester or has_permission(actor.roles, Permission.EXECUTION_APPROVE):
            return
        raise PermissionDeniedError(
            "a level-1 plan is confirmed by its requester or an approver",
            extra={"required_role": "approver"},
        )
    if is_requester:
        raise PermissionDeniedError(
            f"a level-{level} plan needs a second person: requesters cannot approve their own",
            extra={"reason": "four_eyes"},
        )
    role = required_role or ROLE_FOR_LEVEL[level]
    assert role is not None
    if not set(actor.roles) & ROLES_SATISFYING[role]:
        raise PermissionDeniedError(
            f"a level-{level} approval needs the {role} role", extra={"required_role": role}
        )


async def _open_approval(
    connection: Connection,
    execution: asyncpg.Record,
    settings: TenantSettings,
    *,
    level: int,
    runbook_url: str | None,
    step_number: int | None = None,
) -> asyncpg.Record:
    approval = await store.request_approval(
        connection,
        execution["id"],
        level=level,
        required_role=ROLE_FOR_LEVEL[level],
        plan_hash=execution["plan_hash"],
        snapshot_hash=snapshot_hash(execution["plan_snapshot"]),
        runbook_url=runbook_url,
        expires_in=timedelta(seconds=settings.approval_expiry_s),
        step_number=step_number,
    )
    await events.append_event(
        connection, execution["id"], "approval_requested", approval_view(approval)
    )
    return approval


async def request_plan_approval(
    connection: Connection,
    execution: asyncpg.Record,
    settings: TenantSettings,
    *,
    runbook_url: str | None,
) -> asyncpg.Record:
    """Open the plan-level approval and move the execution to awaiting_approval."""
    await executions.transition(
        connection,
        execution["id"],
        execution["tenant_id"],
        expected=execution["status"],
        to=S.AWAITING_APPROVAL,
        actor_id=execution["actor_id"],
    )
    return await _open_approval(
        connection,
        execution,
        settings,
        level=execution["approval_level"],
        runbook_url=runbook_url,
    )


async def request_fresh_approval(
    connection: Connection,
    execution: asyncpg.Record,
    settings: TenantSettings,
    *,
    runbook_url: str | None,
) -> asyncpg.Record:
    """A new plan-level request for an execution already waiting (its plan was amended)."""
    return await _open_approval(
        connection,
        execution,
        settings,
        level=execution["approval_level"],
        runbook_url=runbook_url,
    )


async def request_step_approval(
    connection: Connection,
    execution: asyncpg.Record,
    settings: TenantSettings,
    *,
    step_number: int,
    runbook_url: str | None,
) -> asyncpg.Record:
    """Park a running execution before a level-3 gated step until a senior approver says go."""
    await executions.transition(
        connection,
        execution["id"],
        execution["tenant_id"],
        expected=S.RUNNING,
        to=S.AWAITING_APPROVAL,
        actor_id=execution["actor_id"],
        reason=f"step {step_number} needs approval",
    )
    return await _open_approval(
        connection,
        execution,
        settings,
        level=3,
        runbook_url=runbook_url,
        step_number=step_number,
    )


def approval_view(approval: asyncpg.Record) -> dict[str, Any]:
    """An approval as JSON: the API's representation and the events' payload."""
    view: dict[str, Any] = {"approval_id": str(approval["id"])}
    for name in (
        "execution_id",
        "step_number",
        "approval_level",
        "required_role",
        "plan_hash",
        "plan_snapshot_hash",
        "state",
        "approver_id",
        "approver_principal",
        "auth_method",
        "source_ip",
        "reason",
        "runbook_url",
        "auto_approved",
        "auto_approval_policy",
        "created_at",
        "decided_at",
        "expires_at",
        "invalidated_at",
    ):
        value = approval[name]
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, UUID):
            value = str(value)
        view[name] = value
    return view


async def record_auto_approval(
    connection: Connection,
    execution: asyncpg.Record,
    policy: AutoApprovalPolicy,
    *,
    requester_principal: str,
    runbook_url: str | None,
) -> asyncpg.Record:
    approval = await store.record_auto_approval(
        connection,
        execution["id"],
        level=execution["approval_level"],
        plan_hash=execution["plan_hash"],
        snapshot_hash=snapshot_hash(execution["plan_snapshot"]),
        runbook_url=runbook_url,
        policy_name=policy.name,
        requester_principal=requester_principal,
    )
    await events.append_event(
        connection, execution["id"], "approval_approved", approval_view(approval)
    )
    return approval


@dataclass(frozen=True, slots=True)
class Decision:
    execution: asyncpg.Record
    approval: asyncpg.Record


async def decide(
    connection: Connection,
    actor: Actor,
    execution_id: UUID,
    *,
    approve: bool,
    reason: str | None,
    step_number: int | None,
) -> Decision:
    """Approve or reject the open approval of an execution, in the caller's transaction.

    On approval of the last required decision the execution moves to ``approved`` and its
    queued job (if any) is released; on rejection it ends as ``rejected``.
    """
    execution = await executions.get_execution(
        connection, actor.tenant_id, execution_id, for_update=True
    )
    if execution is None:
        raise NotFoundError(f"execution {execution_id} not found")
    if execution["status"] != S.AWAITING_APPROVAL:
        raise ConflictError(
            f"execution {execution_id} is {execution['status']}, not awaiting approval",
            extra={"status": execution["status"]},
        )
    approval = await store.pending_approval(connection, execution_id, step_number)
    if approval is None:
        where = f" for step {step_number}" if step_number is not None else ""
        raise ConflictError(f"execution {execution_id} has no pending approval{where}")
    if approval["expires_at"] is not None and approval["expires_at"] <= await connection.fetchval(
        "SELECT now()"
    ):
        raise ApprovalExpiredError(f"the approval of execution {execution_id} has expired")
    check_may_decide(
        actor,
        requester_id=execution["actor_id"],
        level=approval["approval_level"],
        required_role=approval["required_role"],
    )
    current_hash = snapshot_hash(execution["plan_snapshot"])
    if (
        current_hash != approval["plan_snapshot_hash"]
        or approval["plan_hash"] != execution["plan_hash"]
    ):
        raise ApprovalInvalidatedError(
            "the stored plan no longer matches the plan this approval was requested for",
            extra={"expected_hash": approval["plan_snapshot_hash"], "actual_hash": current_hash},
        )
    decided = await store.record_decision(
        connection,
        approval["id"],
        state="approved" if approve else "rejected",
        approver_id=actor.user_id,
        approver_principal=actor.principal,
        auth_method=actor.auth_method,
        source_ip=actor.source_ip,
        reason=reason,
    )
    payload = approval_view(decided)
    await events.append_event(
        connection, execution_id, "approval_approved" if approve else "approval_rejected", payload
    )
    if approve:
        updated = await executions.transition(
            connection,
            execution_id,
            actor.tenant_id,
            expected=S.AWAITING_APPROVAL,
            to=S.APPROVED,
            actor_id=actor.user_id,
            reason=reason,
        )
        await events.append_event(
            connection, execution_id, "execution_approved", {"approver": actor.principal}
        )
        if updated["execution_mode"] == "background":
            await queue.release(connection, execution_id)
    else:
        updated = await executions.transition(
            connection,
            execution_id,
            actor.tenant_id,
            expected=S.AWAITING_APPROVAL,
            to=S.REJECTED,
            actor_id=actor.user_id,
            reason=reason,
        )
        await queue.close_unrun(connection, execution_id, "rejected")
    return Decision(execution=updated, approval=decided)


async def decide_approval(
    pool: asyncpg.Pool,
    actor: Actor,
    execution_id: UUID,
    settings: TenantSettings,
    *,
    approve: bool,
    reason: str | None,
    step_number: int | None,
) -> Decision:
    """``decide`` in its own transaction, with the side effects a refusal must keep.

    A refused decision rolls its transaction back, yet an expired approval must still be
    recorded as expired and a tampered plan must still void its approvals: those writes
    happen in a second transaction before the error reaches the caller.
    """
    try:
        async with transaction(pool) as connection:
            decision = await decide(
                connection,
                actor,
                execution_id,
                approve=approve,
                reason=reason,
                step_number=step_number,
            )
        if decision.execution["status"] == S.REJECTED:
            metrics.execution_finished(decision.execution)
        return decision
    except ApprovalExpiredError:
        await expire_due_approvals(pool)
        raise
    except ApprovalInvalidatedError:
        async with transaction(pool) as connection:
            execution = await executions.get_execution(
                connection, actor.tenant_id, execution_id, for_update=True
            )
            # Re-checked under the row lock: a concurrent refusal may have voided it already.
            if (
                execution is not None
                and snapshot_hash(execution["plan_snapshot"]) != execution["plan_hash"]
            ):
                await invalidate_tampered(connection, execution, settings)
        raise


async def invalidate_tampered(
    connection: Connection, execution: asyncpg.Record, settings: TenantSettings
) -> None:
    """The snapshot changed behind the API's back: void what was approved and ask again.

    The stored row is now the only plan there is, so its hash becomes the plan hash and a
    fresh approval is requested for it; the event keeps both hashes for forensics.
    """
    new_hash = snapshot_hash(execution["plan_snapshot"])
    voided = await store.invalidate_all(connection, execution["id"], "plan snapshot changed")
    await connection.execute(
        "UPDATE executions SET plan_hash = $2 WHERE id = $1", execution["id"], new_hash
    )
    await events.append_event(
        connection,
        execution["id"],
        "approval_invalidated",
        {"old_plan_hash": execution["plan_hash"], "new_plan_hash": new_hash, "voided": voided},
    )
    logger.warning(
        "approval invalidated: stored plan changed",
        extra={"exec_id": str(execution["id"]), "tenant_id": str(execution["tenant_id"])},
    )
    refreshed = await executions.get_execution(connection, execution["tenant_id"], execution["id"])
    assert refreshed is not None
    await _open_approval(
        connection,
        refreshed,
        settings,
        level=execution["approval_level"],
        runbook_url=execution["metadata"].get("runbook_url"),
    )


async def expire_due_approvals(pool: asyncpg.Pool, *, limit: int = 100) -> int:
    """Expire pending approvals past their deadline; their executions end as rejected."""
    expired = 0
    rejected: list[asyncpg.Record] = []
    async with pool.acquire() as connection, connection.transaction():
        for row in await store.due_for_expiry(connection, limit):
            await store.expire(connection, row["id"])
            await events.append_event(
                connection,
                row["execution_id"],
                "approval_expired",
                {"approval_id": str(row["id"]), "step_number": row["step_number"]},
            )
            if row["status"] == S.AWAITING_APPROVAL:
                final = await executions.transition(
                    connection,
                    row["execution_id"],
                    row["tenant_id"],
                    expected=S.AWAITING_APPROVAL,
                    to=S.REJECTED,
                    actor_id=await system_user_id(connection, row["tenant_id"]),
                    reason="approval expired",
                )
                await queue.close_unrun(connection, row["execution_id"], "approval expired")
                rejected.append(final)
            expired += 1
    for final in rejected:
        metrics.execution_finished(final)
    return expired
