"""Intake: validate → check permissions → classify → persist in one transaction → route.

Everything a submission creates — the execution with its frozen canonical plan, the
expanded steps, the approval request, the events and the queue row — commits together,
so a crash between any two of them can neither lose nor half-create an execution.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol
from uuid import UUID

import asyncpg

from opsexec.actions.registry import ActionRegistry
from opsexec.config import Settings
from opsexec.engine import approvals
from opsexec.engine.actor import Actor
from opsexec.engine.controls import ServiceControls
from opsexec.errors import (
    ApprovalLevelNotEnabledError,
    ConflictError,
    IdempotencyKeyReusedError,
    NotFoundError,
    PermissionDeniedError,
    PlanValidationError,
    ServiceDisabledError,
)
from opsexec.fsm import ExecutionStatus
from opsexec.intake import check_targets, document_size_bytes, load_plan
from opsexec.observability import metrics
from opsexec.observability.fields import execution_fields, outcome_fields
from opsexec.plan import (
    Plan,
    canonical_json,
    canonical_plan,
    derive_idempotency_key,
    json_pointer,
    plan_hash,
)
from opsexec.policy import Classification, ExecutionMode, classify, lease_timeout_ms
from opsexec.store import Connection, events, executions, queue, transaction
from opsexec.store import approvals as approval_store
from opsexec.store.identity import record_audit
from opsexec.store.inventory import assets_by_name

logger = logging.getLogger(__name__)
S = ExecutionStatus

# Request-body fields classification may refuse; every other pointer is inside the plan.
_BODY_POINTERS = frozenset({"/mode", "/priority", "/runbook_url"})
_AMENDABLE = frozenset({S.PENDING, S.AWAITING_APPROVAL})


class ImmediateRunner(Protocol):
    """Runs an approved immediate execution to the end inside the caller's request."""

    async def run_immediate(self, execution_id: UUID, tenant_id: UUID) -> None: ...


@dataclass(frozen=True)
class Submission:
    """A request to run a plan, as the API or CLI received it."""

    plan: Any
    request_id: UUID | None = None
    priority: int | str | None = None
    mode: str | None = None
    runbook_url: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Submitted:
    execution: asyncpg.Record
    created: bool


@dataclass(frozen=True)
class Prepared:
    """A validated, classified plan and the columns it determines."""

    plan: Plan
    classification: Classification
    snapshot: dict[str, Any]
    canonical: str
    hash: str
    size_bytes: int
    runbook_url: str | None
    steps: list[dict[str, Any]]

    def execution_columns(self) -> dict[str, Any]:
        c = self.classification
        return {
            "plan_hash": self.hash,
            "plan_snapshot": self.snapshot,
            "plan_size_bytes": self.size_bytes,
            "step_count": len(self.steps),
            "target_count": len(
                {s["target_ref"] for s in self.steps if s["target_ref"] is not None}
            ),
            "execution_mode": c.mode.value,
            "approval_level": c.approval_level,
            "sla_class": c.sla_class.value,
            "timeout_ms": execution_timeout_ms(c),
            "timeout_policy_id": c.timeout_policy.id,
        }


def execution_timeout_ms(classification: Classification) -> int:
    """The policy's execution timeout, stretched for a plan estimated to need longer.

    A 50-host rolling deploy is estimated at ~620 s against long_deploy's 600 s: holding it
    to the policy would time out every such run by design. The stretch keeps 25 % headroom
    over the estimate; the policy row stays the floor and is still recorded for forensics.
    """
    policy_ms = classification.timeout_policy.execution_timeout_ms
    return max(policy_ms, int(classification.estimated_duration_s * 1250))


def _in_body(error: PlanValidationError) -> PlanValidationError:
    """Plan-relative pointers become request-body pointers (``/plan/...``)."""
    if error.pointer is not None and error.pointer not in _BODY_POINTERS:
        error.pointer = "/plan" + error.pointer
    return error


def _expand_steps(plan: Plan, classification: Classification) -> list[dict[str, Any]]:
    """One execution step per (plan step, target), targets in sorted order (R-ENGINE)."""
    rows: list[dict[str, Any]] = []
    for step, info in zip(plan.steps, classification.steps, strict=True):
        targets: list[str | None] = [*sorted(set(step.targets))] or [None]
        for target in targets:
            rows.append(
                {
                    "step_number": len(rows) + 1,
                    "step_key": step.id,
                    "action": step.action,
                    "target_type": "asset" if target is not None else None,
                    "target_ref": target,
                    # Only idempotent actions are ever retried; 0 keeps attempt at 1.
                    "max_retries": 3 if info.idempotent else 0,
                    "timeout_ms": info.step_timeout_ms,
                    "metadata": {"plan_step_index": info.index, "gated": info.gated},
                }
            )
    return rows


class Executor:
    """Turns submissions into executions; one instance per process."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        registry: ActionRegistry,
        settings: Settings,
        runner: ImmediateRunner | None = None,
    ) -> None:
        self.pool = pool
        self.registry = registry
        self.settings = settings
        self.runner = runner
        self.controls = ServiceControls(pool, settings)

    # --- preparation (no writes) -------------------------------------------------------

    def load(self, actor: Actor, document: Any) -> tuple[Plan, int]:
        """Parse, validate and permission-check a plan document; no I/O."""
        size = document_size_bytes(document)
        try:
            plan = load_plan(document, self.registry, document_size_bytes=size)
        except PlanValidationError as error:
            raise _in_body(error) from None
        self._check_permissions(actor, plan)
        return plan, size

    async def prepare(
        self,
        connection: Connection,
        actor: Actor,
        plan: Plan,
        size: int,
        *,
        mode: str | None,
        priority: int | str | None,
        runbook_url: str | None,
    ) -> Prepared:
        """Resolve targets in the tenant's inventory and classify (R-CLASS)."""
        names = {target for step in plan.steps for target in step.targets}
        assets = await assets_by_name(connection, actor.tenant_id, names)
        try:
            check_targets(plan, assets.keys())
            classification = classify(
                plan,
                self.registry,
                target_environments={n: a["environment"] for n, a in assets.items()},
                tenant_min_level=actor.tenant_settings.min_approval_level,
                requested_mode=mode,
                priority=priority,
            )
        except PlanValidationError as error:
            raise _in_body(error) from None
        level = classification.approval_level
        if level > actor.tenant_settings.max_approval_level:
            raise ApprovalLevelNotEnabledError(
                f"this plan needs approval level {level}; tenant {actor.tenant_name} runs "
                f"plans up to level {actor.tenant_settings.max_approval_level}",
                extra={
                    "approval_level": level,
                    "max_approval_level": actor.tenant_settings.max_approval_level,
                },
            )
        runbook = runbook_url or plan.runbook_url
        if level >= 2 and not runbook:
            raise PlanValidationError(
                "runbook_required",
                f"a level-{level} plan needs a runbook URL for its reviewers",
                pointer="/runbook_url",
            )
        return Prepared(
            plan=plan,
            classification=classification,
            snapshot=canonical_plan(plan),
            canonical=canonical_json(plan),
            hash=plan_hash(plan),
            size_bytes=size,
            runbook_url=runbook,
            steps=_expand_steps(plan, classification),
        )

    def _check_permissions(self, actor: Actor, plan: Plan) -> None:
        for index, step in enumerate(plan.steps):
            permission = self.registry.require(step.action).permission
            if not actor.can(permission):
                raise PermissionDeniedError(
                    f"{actor.principal} lacks {permission}, needed by step {step.id!r}",
                    pointer="/plan" + plan.document_pointer(json_pointer("steps", index, "action")),
                    extra={"permission": permission},
                )

    async def ensure_enabled(self, actor: Actor) -> None:
        """Refuse (503) what would start new work while the service or tenant is off."""
        kill_switch = await self.controls.kill_switch()
        if kill_switch.engaged:
            raise ServiceDisabledError(
                "execution is switched off on this service (kill switch)",
                extra={"reason": "kill_switch", "source": kill_switch.source},
            )
        if not actor.tenant_settings.enabled:
            raise ServiceDisabledError(
                f"execution is switched off for tenant {actor.tenant_name}",
                extra={"reason": "tenant_disabled"},
            )

    # --- submit ------------------------------------------------------------------------

    async def submit(self, actor: Actor, submission: Submission) -> Submitted:
        """Create an execution, or return the live one this submission duplicates."""
        await self.ensure_enabled(actor)
        plan, size = self.load(actor, submission.plan)
        key = submission.idempotency_key or derive_idempotency_key(
            canonical_json(plan), actor.tenant_id, actor.user_id
        )
        # Duplicates (refreshes, client retries) are answered before any classification
        # or transaction: one indexed lookup.
        async with self.pool.acquire() as connection:
            existing = await self._live_duplicate(
                connection, actor, key, plan_hash(plan), submission
            )
        if existing is not None:
            metrics.idempotent_hit()
            return Submitted(existing, created=False)
        async with transaction(self.pool) as connection:
            prepared = await self.prepare(
                connection,
                actor,
                plan,
                size,
                mode=submission.mode,
                priority=submission.priority,
                runbook_url=submission.runbook_url,
            )
            row = await executions.insert_execution(
                connection,
                prepared.execution_columns()
                | {
                    "tenant_id": actor.tenant_id,
                    "actor_id": actor.user_id,
                    "request_id": submission.request_id,
                    "idempotency_key": key,
                    "metadata": self._metadata(prepared, submission)
                    | ({"request_id": actor.request_id} if actor.request_id else {}),
                },
            )
            if row is None:
                # A concurrent twin committed first; the unique index made us wait for it.
                twin = await executions.find_active_by_key(connection, actor.tenant_id, key)
                assert twin is not None
                metrics.idempotent_hit()
                return Submitted(twin, created=False)
            await executions.insert_steps(connection, row["id"], prepared.steps)
            await events.append_event(
                connection, row["id"], "execution_started", self._started_payload(row, prepared)
            )
            row = await self._route_approval(connection, actor, row, prepared)
            await _enqueue_background(connection, row, prepared)
        logger.info(
            "execution submitted",
            extra=execution_fields(row, prepared.plan, self.registry) | outcome_fields(row),
        )
        return Submitted(await self.after_approval(row), created=True)

    async def _live_duplicate(
        self,
        connection: Connection,
        actor: Actor,
        key: str,
        new_plan_hash: str,
        submission: Submission,
    ) -> asyncpg.Record | None:
        """The execution this submission repeats (R-IDEM-2), retiring one past its window."""
        existing = await executions.find_active_by_key(connection, actor.tenant_id, key)
        if existing is None:
            return None
        if submission.idempotency_key and existing["plan_hash"] != new_plan_hash:
            raise IdempotencyKeyReusedError(
                "this Idempotency-Key was already used for a different plan",
                extra={"execution_id": str(existing["id"])},
            )
        if existing["status"] == S.SUCCEEDED:
            settings = actor.tenant_settings
            window = (
                settings.replay_window_client_s
                if submission.idempotency_key
                else settings.replay_window_derived_s
            )
            expired = await connection.fetchval(
                "SELECT $1::timestamptz + $2::interval < now()",
                existing["ended_at"],
                timedelta(seconds=window),
            )
            if expired:
                await executions.retire_idempotency_key(connection, existing["id"])
                return None
        return existing

    def _metadata(self, prepared: Prepared, submission: Submission) -> dict[str, Any]:
        c = prepared.classification
        return {
            "idempotency_source": "client" if submission.idempotency_key else "derived",
            "priority": c.priority,
            "action_class": c.action_class.value,
            "estimated_duration_s": c.estimated_duration_s,
            "gated_step_ids": list(c.gated_step_ids),
            "runbook_url": prepared.runbook_url,
            "classification_reasons": list(c.reasons),
            "warnings": list(c.warnings),
            "client": dict(submission.metadata),
        }

    @staticmethod
    def _started_payload(row: asyncpg.Record, prepared: Prepared) -> dict[str, Any]:
        return {
            "plan_hash": prepared.hash,
            "approval_level": row["approval_level"],
            "sla_class": row["sla_class"],
            "execution_mode": row["execution_mode"],
            "timeout_policy_id": row["timeout_policy_id"],
            "step_count": row["step_count"],
            "target_count": row["target_count"],
        }

    async def _route_approval(
        self,
        connection: Connection,
        actor: Actor,
        row: asyncpg.Record,
        prepared: Prepared,
    ) -> asyncpg.Record:
        """Level 0 and auto-approved plans are approved now; others ask for approval."""
        level = row["approval_level"]
        policy = approvals.matching_auto_policy(actor.tenant_settings, actor.roles, level)
        if level == 0 or policy is not None:
            if policy is not None and level > 0:
                await approvals.record_auto_approval(
                    connection,
                    row,
                    policy,
                    requester_principal=actor.principal,
                    runbook_url=prepared.runbook_url,
                )
            approved = await executions.transition(
                connection,
                row["id"],
                actor.tenant_id,
                expected=row["status"],
                to=S.APPROVED,
                actor_id=actor.user_id,
                reason=f"auto-approved ({policy.name})"
                if policy and level
                else "no approval needed",
            )
            await events.append_event(
                connection,
                row["id"],
                "execution_approved",
                {"auto_approval_policy": policy.name if policy else None, "level": level},
            )
            return approved
        await approvals.request_plan_approval(
            connection, row, actor.tenant_settings, runbook_url=prepared.runbook_url
        )
        current = await executions.get_execution(connection, actor.tenant_id, row["id"])
        assert current is not None
        return current

    async def after_approval(self, execution: asyncpg.Record) -> asyncpg.Record:
        """Run an approved immediate execution now, if a runner is attached."""
        if (
            self.runner is None
            or execution["status"] != S.APPROVED
            or execution["execution_mode"] != ExecutionMode.IMMEDIATE
        ):
            return execution
        await self.runner.run_immediate(execution["id"], execution["tenant_id"])
        async with self.pool.acquire() as connection:
            refreshed = await executions.get_execution(
                connection, execution["tenant_id"], execution["id"]
            )
        assert refreshed is not None
        return refreshed

    # --- amend ---------------------------------------------------------------------------

    async def amend(
        self, actor: Actor, execution_id: UUID, document: Any, *, runbook_url: str | None
    ) -> asyncpg.Record:
        """Replace the plan of an execution still waiting; its approvals are voided."""
        await self.ensure_enabled(actor)
        async with transaction(self.pool) as connection:
            current = await self.get(connection, actor, execution_id, for_update=True)
            if current["status"] not in _AMENDABLE:
                raise ConflictError(
                    f"execution {execution_id} is {current['status']}; only pending or "
                    "awaiting-approval executions can be amended",
                    extra={"status": current["status"]},
                )
            if current["actor_id"] != actor.user_id and not actor.can("admin"):
                raise PermissionDeniedError("only the requester or an admin can amend a plan")
            metadata = current["metadata"]
            plan, size = self.load(actor, document)
            prepared = await self.prepare(
                connection,
                actor,
                plan,
                size,
                mode=None,
                priority=metadata.get("priority"),
                runbook_url=runbook_url,
            )
            key = (
                current["idempotency_key"]
                if metadata.get("idempotency_source") == "client"
                else derive_idempotency_key(prepared.canonical, actor.tenant_id, actor.user_id)
            )
            try:
                async with connection.transaction():
                    row = await executions.replace_plan(
                        connection,
                        execution_id,
                        prepared.execution_columns()
                        | {"idempotency_key": key, "metadata": self._metadata_update(prepared)},
                    )
            except asyncpg.UniqueViolationError:
                raise ConflictError(
                    "an identical plan is already running or waiting as another execution"
                ) from None
            await executions.delete_steps(connection, execution_id)
            await executions.insert_steps(connection, execution_id, prepared.steps)
            voided = await approval_store.invalidate_all(connection, execution_id, "plan amended")
            await events.append_event(
                connection,
                execution_id,
                "plan_amended",
                {
                    "old_plan_hash": current["plan_hash"],
                    "new_plan_hash": prepared.hash,
                    "approvals_voided": voided,
                    "approval_level": row["approval_level"],
                },
            )
            await queue.close_unrun(connection, execution_id, "plan amended")
            row = await self._reroute_after_amend(connection, actor, row, prepared)
        return await self.after_approval(row)

    def _metadata_update(self, prepared: Prepared) -> dict[str, Any]:
        c = prepared.classification
        return {
            "action_class": c.action_class.value,
            "estimated_duration_s": c.estimated_duration_s,
            "gated_step_ids": list(c.gated_step_ids),
            "runbook_url": prepared.runbook_url,
            "classification_reasons": list(c.reasons),
            "warnings": list(c.warnings),
        }

    async def _reroute_after_amend(
        self,
        connection: Connection,
        actor: Actor,
        row: asyncpg.Record,
        prepared: Prepared,
    ) -> asyncpg.Record:
        if row["status"] == S.AWAITING_APPROVAL and (
            row["approval_level"] > 0
            and approvals.matching_auto_policy(
                actor.tenant_settings, actor.roles, row["approval_level"]
            )
            is None
        ):
            # Still waiting: a fresh request for the new plan, bound to its hash.
            await approvals.request_fresh_approval(
                connection, row, actor.tenant_settings, runbook_url=prepared.runbook_url
            )
        else:
            row = await self._route_approval(connection, actor, row, prepared)
        await _enqueue_background(connection, row, prepared)
        return row

    # --- reads ---------------------------------------------------------------------------

    async def get(
        self,
        connection: Connection,
        actor: Actor,
        execution_id: UUID,
        *,
        for_update: bool = False,
    ) -> asyncpg.Record:
        """A tenant's execution; another tenant's is reported missing and the probe recorded."""
        row = await executions.get_execution(
            connection, actor.tenant_id, execution_id, for_update=for_update
        )
        if row is None:
            await record_foreign_probe(self.pool, actor, "execution", execution_id)
            raise NotFoundError(f"execution {execution_id} not found")
        return row


async def _enqueue_background(
    connection: Connection, row: asyncpg.Record, prepared: Prepared
) -> None:
    """Background executions get their queue row in the transaction that made them."""
    if row["execution_mode"] != ExecutionMode.BACKGROUND:
        return
    c = prepared.classification
    runnable = row["status"] == S.APPROVED
    await queue.enqueue(
        connection,
        row["id"],
        priority=c.priority,
        max_attempts=c.max_attempts,
        runnable=runnable,
        lease_ms=lease_timeout_ms(
            c.timeout_policy,
            execution_timeout_ms=execution_timeout_ms(c),
            max_renewals=c.max_lease_renewals,
        ),
        max_lease_renewals=c.max_lease_renewals,
    )
    if runnable:
        await queue.release(connection, row["id"])


async def record_foreign_probe(
    pool: asyncpg.Pool, actor: Actor, resource: str, execution_id: UUID
) -> None:
    """If ``execution_id`` exists in another tenant, write an ``rbac_violation`` event on it.

    Runs in its own transaction so the record survives the 404 that follows.
    """
    async with transaction(pool) as connection:
        owner = await executions.execution_tenant(connection, execution_id)
        if owner is None or owner == actor.tenant_id:
            return
        payload = {
            "severity": "critical",
            "resource": resource,
            "actor_tenant_id": str(actor.tenant_id),
            "actor_id": str(actor.user_id),
            "principal": actor.principal,
            "source_ip": actor.source_ip,
        }
        await events.append_event(connection, execution_id, "rbac_violation", payload)
        await record_audit(
            connection,
            actor.tenant_id,
            "rbac_violation",
            {"resource": resource, "id": str(execution_id), "principal": actor.principal},
            actor_id=actor.user_id,
            severity="critical",
        )
    metrics.rbac_violation("api")
    logger.warning(
        "rbac_violation: foreign %s requested",
        resource,
        extra={"tenant_id": str(actor.tenant_id), "exec_id": str(execution_id)},
    )
