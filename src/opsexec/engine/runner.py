"""The execution engine (R-ENGINE): run an approved execution's steps safely to the end.

One run, in order: re-hash the stored plan against its approval, re-check the actor's
*current* permissions, move to ``running``, take every exclusive lock up front (sorted,
all or nothing), then run plan steps in dependency order — each step's targets with at
most ``max_concurrency`` in flight, stopping after ``max_failures`` — checking for
cancellation at every boundary, with step and execution timeouts and retries for
transient failures of idempotent actions. Locks are released in ``finally`` on every
path. Steps that already succeeded are skipped, so the same call resumes a parked or
re-leased execution.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import asyncpg
from pydantic import ValidationError as PydanticValidationError

from opsexec.actions.registry import ActionRegistry, ActionResult, AssetInfo
from opsexec.config import Settings
from opsexec.engine import approvals
from opsexec.engine.context import SecretResolver, StepContext, asset_info
from opsexec.engine.results import execution_result, prepare_output, store_artifact
from opsexec.errors import (
    IndeterminateStepOutcome,
    LeaseLostError,
    OpsexecError,
    PermissionRevokedError,
    ResourceBusyError,
    StepTimeoutError,
    TransportError,
)
from opsexec.fsm import ExecutionStatus
from opsexec.observability import metrics
from opsexec.observability.fields import (
    execution_fields,
    execution_request_id,
    outcome_fields,
    primary_action,
)
from opsexec.observability.logging import bind_log_context
from opsexec.plan import Plan, PlanStep, plan_from_snapshot, snapshot_hash
from opsexec.policy import DEFAULT_MAX_CONCURRENCY
from opsexec.safety import mutex
from opsexec.safety.masking import mask_text, mask_value
from opsexec.safety.rbac import has_permission
from opsexec.store import Connection, events, executions, transaction
from opsexec.store import approvals as approval_store
from opsexec.store import queue as queue_store
from opsexec.store import steps as step_store
from opsexec.store.identity import effective_roles, record_audit, system_user_id
from opsexec.store.inventory import assets_by_name
from opsexec.tenancy import TenantSettings

logger = logging.getLogger("opsexec.engine")
S = ExecutionStatus
LOCK_BUFFER_S = 30.0


class _Cancelled(Exception):
    """A cancel request was seen at a step boundary."""


class _HandBack(Exception):
    """The worker is draining: stop at this boundary and give the job back unfinished."""


@dataclass
class Fence:
    """A worker's lease on the job of a background run.

    ``check`` runs inside every write transaction of the run and raises ``LeaseLostError``
    once the lease is gone, so a worker that lost its job cannot write to it. The run's
    final transaction also ``complete``s the job, so ending an execution and retiring its
    job commit together and cost one transaction, not two.
    """

    execution_id: UUID
    queue_id: UUID
    token: UUID
    completed: bool = False

    async def check(self, connection: Connection) -> None:
        if not await queue_store.lease_is_held(connection, self.execution_id, self.token):
            raise LeaseLostError(f"the lease on execution {self.execution_id} is no longer ours")

    async def complete(self, connection: Connection) -> None:
        self.completed = await queue_store.complete(connection, self.queue_id, self.token)


HANDED_BACK = "handed_back"

INFRASTRUCTURE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)
"""What a background run raises to its worker instead of failing the execution: the
database or the network let the run down, and the queue's attempts and DLQ handle that."""


@dataclass
class _RunState:
    """What one run accumulates while its steps execute."""

    execution: asyncpg.Record
    plan: Plan
    assets: dict[str, AssetInfo]
    settings: TenantSettings
    record_only: bool
    retries: int = 0
    cancel_checks: int = 0
    answers: list[str] = field(default_factory=list)
    parked: bool = False
    handed_back: bool = False
    fence: Fence | None = None

    @property
    def id(self) -> UUID:
        execution_id: UUID = self.execution["id"]
        return execution_id

    @property
    def tenant_id(self) -> UUID:
        tenant_id: UUID = self.execution["tenant_id"]
        return tenant_id


class ExecutionEngine:
    """Runs executions; one per process, shared by the API (immediate) and workers."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        registry: ActionRegistry,
        settings: Settings,
        secrets: SecretResolver,
        *,
        retry_backoff_s: float = 1.0,
    ) -> None:
        self.pool = pool
        self.registry = registry
        self.settings = settings
        self.secrets = secrets
        self.retry_backoff_s = retry_backoff_s
        self._running: dict[UUID, asyncio.Task[None]] = {}
        self._draining = False
        self._system_users: dict[UUID, UUID] = {}

    # --- entry points ------------------------------------------------------------------

    async def run_immediate(self, execution_id: UUID, tenant_id: UUID) -> None:
        await self.run(execution_id, tenant_id)

    def interrupt(self, execution_id: UUID) -> bool:
        """Forced cancel: stop the steps running here now (their processes are killed)."""
        task = self._running.get(execution_id)
        if task is None or task.done():
            return False
        task.cancel()
        return True

    def on_cancel_signal(self, payload: str) -> None:
        """A forced cancel announced to every process (``CANCEL_CHANNEL``): ours if it runs here."""
        try:
            execution_id = UUID(payload)
        except ValueError:
            logger.warning("ignored a malformed cancel signal")
            return
        self.interrupt(execution_id)

    async def run(
        self,
        execution_id: UUID,
        tenant_id: UUID,
        *,
        worker_id: str | None = None,
        queue_wait_ms: int | None = None,
        defer_when_busy: bool = False,
        fence: Fence | None = None,
    ) -> str:
        """Run (or resume) an execution; returns its status afterwards.

        With ``defer_when_busy`` (background work) a held lock raises
        ``ResourceBusyError`` before anything changes, so the worker can retry later;
        otherwise (immediate) the execution fails and the error reaches the caller (409).
        Every line logged during the run carries the execution's R-OBS fields.
        """
        bound = {"worker_id": worker_id} if worker_id else {}
        with bind_log_context(exec_id=str(execution_id), tenant_id=str(tenant_id), **bound):
            return await self._run(
                execution_id,
                tenant_id,
                worker_id=worker_id,
                queue_wait_ms=queue_wait_ms,
                defer_when_busy=defer_when_busy,
                fence=fence,
            )

    async def _run(
        self,
        execution_id: UUID,
        tenant_id: UUID,
        *,
        worker_id: str | None,
        queue_wait_ms: int | None,
        defer_when_busy: bool,
        fence: Fence | None,
    ) -> str:
        state = await self._prepare(execution_id, tenant_id, fence)
        if state is None:
            return await self._status(execution_id, tenant_id)
        lock_keys = self._lock_keys(state)
        try:
            await mutex.acquire_execution_locks(
                self.pool,
                tenant_id=tenant_id,
                execution_id=execution_id,
                keys=lock_keys,
                ttl_s=state.execution["timeout_ms"] / 1000 + LOCK_BUFFER_S,
            )
        except ResourceBusyError as busy:
            if not defer_when_busy:
                await self._finish(state, S.FAILED, error=busy)
            raise
        outcome: str = S.FAILED
        error: BaseException | None = None
        timed_out = False
        try:
            await self._begin(state, worker_id, queue_wait_ms)
            steps_task = asyncio.create_task(self._run_plan(state))
            self._running[execution_id] = steps_task
            try:
                await asyncio.wait_for(asyncio.shield(steps_task), self._remaining_s(state))
                outcome = S.SUCCEEDED
            except TimeoutError:
                steps_task.cancel()
                await asyncio.gather(steps_task, return_exceptions=True)
                timed_out = True
        except _Cancelled:
            outcome = S.CANCELLED
        except asyncio.CancelledError:
            # A forced cancel interrupts the steps; so does a draining worker whose grace
            # period ran out, and that job goes back to the queue instead of ending.
            if self._draining and fence is not None:
                state.handed_back = True
            else:
                outcome = S.CANCELLED
        except _HandBack:
            state.handed_back = True
        except LeaseLostError:
            raise
        except Exception as exc:  # an infrastructure failure inside the run: record it
            if fence is not None and isinstance(exc, INFRASTRUCTURE_ERRORS):
                # Background: the database or network failed, not the plan. The worker
                # charges a queue attempt and retries with backoff (then the DLQ).
                raise
            logger.exception("execution run failed", extra={"exec_id": str(execution_id)})
            error = exc
        finally:
            running = self._running.pop(execution_id, None)
            if running is not None and not running.done():
                # This run itself was cancelled: its steps must not go on without it.
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
            # Locks belong to the execution; once another worker holds its lease they are
            # that worker's to release, not ours. A plan that locks nothing has none.
            if lock_keys and await self._holds_lease(state):
                await mutex.release_execution_locks(
                    self.pool, tenant_id=tenant_id, execution_id=execution_id
                )
        if state.parked:
            return S.AWAITING_APPROVAL
        if state.handed_back:
            return HANDED_BACK
        return await self._finish(state, outcome, error=error, timed_out=timed_out)

    @asynccontextmanager
    async def _tx(self, state: _RunState) -> AsyncIterator[Connection]:
        """A write transaction of this run, fenced by the worker's lease when there is one."""
        async with transaction(self.pool) as connection:
            if state.fence is not None:
                await state.fence.check(connection)
            yield connection

    async def _holds_lease(self, state: _RunState) -> bool:
        if state.fence is None:
            return True
        try:
            async with self._tx(state):
                return True
        except LeaseLostError:
            return False

    def drain(self) -> None:
        """Graceful shutdown: runs stop at their next step boundary and are handed back."""
        self._draining = True

    async def fail_busy(self, execution_id: UUID, tenant_id: UUID, busy: ResourceBusyError) -> None:
        """A background job waited out its lock budget: end it with ``ResourceBusyError``."""
        state = await self._prepare(execution_id, tenant_id)
        if state is not None:
            await self._finish(state, S.FAILED, error=busy)

    async def _status(self, execution_id: UUID, tenant_id: UUID) -> str:
        async with self.pool.acquire() as connection:
            execution = await executions.get_execution(connection, tenant_id, execution_id)
        assert execution is not None, "executions are never deleted while they run"
        status: str = execution["status"]
        return status

    # --- start ---------------------------------------------------------------------------

    async def _prepare(
        self, execution_id: UUID, tenant_id: UUID, fence: Fence | None = None
    ) -> _RunState | None:
        """The checks before anything runs; None when there is nothing to run now.

        Plain reads, no transaction: nothing is written unless the stored plan was
        tampered with, and that path re-reads under a row lock before it writes.
        """
        async with self.pool.acquire() as connection:
            execution = await executions.run_context(connection, tenant_id, execution_id)
            if execution is None or execution["status"] not in (S.APPROVED, S.RUNNING):
                return None
            settings = TenantSettings.from_stored(execution["run_tenant_settings"])
            tampered = snapshot_hash(execution["plan_snapshot"]) != execution["plan_hash"]
            if not tampered:
                plan = plan_from_snapshot(execution["plan_snapshot"])
                names = {t for step in plan.steps for t in step.targets}
                found = await assets_by_name(connection, tenant_id, names) if names else {}
                assets = {n: asset_info(r) for n, r in found.items()}
        if tampered:
            await self._park_tampered(execution_id, tenant_id, settings, fence)
            return None
        state = _RunState(
            execution=execution,
            plan=plan,
            assets=assets,
            settings=settings,
            record_only=self.settings.record_only or settings.record_only,
            fence=fence,
        )
        # Undone by run()'s binding when it returns (fail_busy: with the worker's job task).
        bind_log_context(**execution_fields(execution, plan, self.registry))
        roles = effective_roles(execution["run_actor_roles"], execution["run_actor_disabled"])
        denied = await self._permission_denied(state, roles)
        if denied:
            await self._finish(state, S.FAILED, error=denied)
            return None
        return state

    async def _begin(
        self, state: _RunState, worker_id: str | None, queue_wait_ms: int | None
    ) -> None:
        """``approved → running`` (a resumed execution is running already)."""
        if state.execution["status"] != S.APPROVED:
            return
        fields: dict[str, Any] = {}
        if worker_id:
            fields["worker_id"] = worker_id
        if queue_wait_ms is not None:
            fields["queue_wait_ms"] = queue_wait_ms
        async with self._tx(state) as connection:
            state.execution = await executions.transition(
                connection,
                state.id,
                state.tenant_id,
                expected=S.APPROVED,
                to=S.RUNNING,
                actor_id=state.execution["actor_id"],
                fields=fields or None,
                then=[("execution_running", {"worker_id": worker_id})],
            )

    async def _system_user(self, connection: Connection, tenant_id: UUID) -> UUID:
        """The tenant's system user (it never changes once created: cached per process)."""
        user_id = self._system_users.get(tenant_id)
        if user_id is None:
            user_id = self._system_users[tenant_id] = await system_user_id(connection, tenant_id)
        return user_id

    async def _park_tampered(
        self, execution_id: UUID, tenant_id: UUID, settings: TenantSettings, fence: Fence | None
    ) -> None:
        async with transaction(self.pool) as connection:
            if fence is not None:
                await fence.check(connection)
            execution = await executions.get_execution(
                connection, tenant_id, execution_id, for_update=True
            )
            if (
                execution is not None
                and execution["status"] in (S.APPROVED, S.RUNNING)
                and snapshot_hash(execution["plan_snapshot"]) != execution["plan_hash"]
            ):
                await self._park_for_reapproval(connection, execution, settings)

    async def _park_for_reapproval(
        self, connection: Connection, execution: asyncpg.Record, settings: TenantSettings
    ) -> None:
        """The stored plan changed after approval: it must be approved again (R-APPR)."""
        if execution["status"] == S.APPROVED:
            execution = await executions.transition(
                connection,
                execution["id"],
                execution["tenant_id"],
                expected=S.APPROVED,
                to=S.RUNNING,
                actor_id=None,
            )
        await executions.transition(
            connection,
            execution["id"],
            execution["tenant_id"],
            expected=S.RUNNING,
            to=S.AWAITING_APPROVAL,
            actor_id=None,
            reason="ApprovalInvalidatedError: the stored plan changed after approval",
        )
        await approvals.invalidate_tampered(connection, execution, settings)

    async def _permission_denied(
        self, state: _RunState, roles: tuple[str, ...] | None
    ) -> OpsexecError | None:
        """R-RBAC at the worker: the actor's roles *now* (read with the execution), not at
        submit time."""
        needed = {self.registry.require(step.action).permission for step in state.plan.steps}
        missing = sorted(p for p in needed if roles is None or not has_permission(roles, p))
        if not missing:
            return None
        why = "the requester is disabled" if roles is None else f"missing {', '.join(missing)}"
        async with self._tx(state) as connection:
            await events.append_event(
                connection,
                state.id,
                "rbac_violation",
                {"severity": "critical", "reason": why, "at": "engine"},
            )
            await record_audit(
                connection,
                state.tenant_id,
                "rbac_violation",
                {"at": "engine", "reason": why, "execution_id": str(state.id)},
                actor_id=state.execution["actor_id"],
                severity="critical",
            )
        metrics.rbac_violation("engine")
        logger.warning("permission revoked before run", extra={"exec_id": str(state.id)})
        return PermissionRevokedError(f"permission re-check failed: {why}")

    def _lock_keys(self, state: _RunState) -> list[str]:
        wanted: list[tuple[str, str]] = []
        for step in state.plan.steps:
            spec = self.registry.require(step.action)
            scope = spec.lock_scope_for(step.inputs)
            if scope is not None:
                wanted.extend((target, scope) for target in step.targets)
        return sorted({mutex.lock_key(state.tenant_id, t, scope) for t, scope in wanted})

    def _remaining_s(self, state: _RunState) -> float:
        started = state.execution["started_at"]
        elapsed = time.time() - started.timestamp() if started else 0.0
        timeout_s: float = state.execution["timeout_ms"] / 1000
        return max(0.1, timeout_s - elapsed)

    # --- plan steps ------------------------------------------------------------------------

    async def _run_plan(self, state: _RunState) -> None:
        rows = await self._step_rows(state.id)
        gated = set(state.execution["metadata"].get("gated_step_ids", []))
        for step in _dependency_order(state.plan):
            targets = [r for r in rows if r["step_key"] == step.id]
            pending = [r for r in targets if r["status"] != S.SUCCEEDED]
            if not pending:
                continue
            if step.id in gated:
                # Every target checks for a cancel before it starts; a gate checks first so
                # a cancelled execution ends instead of asking for an approval.
                await self._check_cancel(state)
                if not await self._gate_passed(state, targets[0]["step_number"]):
                    await self._park_at_gate(state, targets[0]["step_number"])
                    return
            failures = await self._run_targets(state, step, pending)
            if failures:
                return

    async def _step_rows(self, execution_id: UUID) -> list[asyncpg.Record]:
        async with self.pool.acquire() as connection:
            return await step_store.steps_of(connection, execution_id)

    async def _check_cancel(self, state: _RunState) -> None:
        # Only background runs (fenced by a lease) can be handed back; an immediate run in
        # a draining `serve` has no queue row and must finish where it is.
        if self._draining and state.fence is not None:
            raise _HandBack
        state.cancel_checks += 1
        async with self.pool.acquire() as connection:
            if await step_store.cancellation_requested(connection, state.id):
                raise _Cancelled

    async def _gate_passed(self, state: _RunState, step_number: int) -> bool:
        async with self.pool.acquire() as connection:
            return await approval_store.step_approved(connection, state.id, step_number)

    async def _park_at_gate(self, state: _RunState, step_number: int) -> None:
        """Level-3 gate: hand the worker back until a senior approver releases the step."""
        async with self._tx(state) as connection:
            execution = await executions.get_execution(
                connection, state.tenant_id, state.id, for_update=True
            )
            assert execution is not None
            await approvals.request_step_approval(
                connection,
                execution,
                state.settings,
                step_number=step_number,
                runbook_url=execution["metadata"].get("runbook_url"),
            )
        state.parked = True

    async def _run_targets(
        self, state: _RunState, step: PlanStep, rows: list[asyncpg.Record]
    ) -> int:
        """Rolling execution: bounded concurrency, stop scheduling past ``max_failures``."""
        limit = asyncio.Semaphore(step.max_concurrency or DEFAULT_MAX_CONCURRENCY)
        allowed_failures = step.max_failures or 0
        failures = 0
        stop = asyncio.Event()

        async def one(row: asyncpg.Record) -> None:
            nonlocal failures
            async with limit:
                if stop.is_set():
                    return
                await self._check_cancel(state)
                with bind_log_context(
                    action=step.action, target=row["target_ref"], step_number=row["step_number"]
                ):
                    ok = await self._run_target(state, step, row)
                if not ok:
                    failures += 1
                    if failures > allowed_failures:
                        stop.set()

        await asyncio.gather(*(one(row) for row in rows))
        return failures

    async def _run_target(self, state: _RunState, step: PlanStep, row: asyncpg.Record) -> bool:
        spec = self.registry.require(step.action)
        action = self.registry.implementation(step.action)
        asset = state.assets.get(row["target_ref"]) if row["target_ref"] else None
        idempotent = spec.is_idempotent(step.inputs)
        attempt = row["attempt"] if row["status"] == S.RUNNING else 1
        if row["status"] == S.RUNNING and not idempotent:
            # It was mid-flight when its worker died: it may or may not have acted.
            return await self._record_step(
                state,
                row,
                ActionResult.failure(
                    error_class=IndeterminateStepOutcome.__name__,
                    error_message=(
                        f"step {row['step_number']} was interrupted mid-flight and "
                        f"{step.action} is not idempotent; a person must decide"
                    ),
                ),
                False,
            )
        while True:
            async with self._tx(state) as connection:
                started = await step_store.start_step(connection, row["id"], attempt)
                await events.append_event(
                    connection,
                    state.id,
                    "step_started",
                    {
                        "step_number": row["step_number"],
                        "target": row["target_ref"],
                        "action": step.action,
                        "attempt": attempt,
                    },
                    step_id=row["id"],
                )
            context = StepContext(
                pool=self.pool,
                secrets=self.secrets,
                execution_id=state.id,
                tenant_id=state.tenant_id,
                step_number=row["step_number"],
                attempt=attempt,
                asset=asset,
                timeout_s=started["timeout_ms"] / 1000,
                request_id=execution_request_id(state.execution),
                cancel_flag=lambda: False,
            )
            try:
                result, timed_out = await self._invoke(state, step, spec, action, context, asset)
                retry = (
                    not result.ok
                    and result.retryable
                    and idempotent
                    and attempt <= row["max_retries"]
                )
                if not retry:
                    return await self._record_step(state, row, result, timed_out)
            finally:
                await context.close()
            state.retries += 1
            async with self._tx(state) as connection:
                await events.append_event(
                    connection,
                    state.id,
                    "step_retrying",
                    {
                        "step_number": row["step_number"],
                        "attempt": attempt,
                        "error_class": result.error_class,
                        "error": mask_text(result.error_message or ""),
                    },
                    step_id=row["id"],
                )
            await asyncio.sleep(
                self.retry_backoff_s * 2 ** (attempt - 1) * random.uniform(0.8, 1.2)
            )
            attempt += 1

    async def _invoke(
        self,
        state: _RunState,
        step: PlanStep,
        spec: Any,
        action: Any,
        context: StepContext,
        asset: AssetInfo | None,
    ) -> tuple[ActionResult, bool]:
        """Run one action with the step timeout; failures become results, never raise."""
        if state.record_only:
            would = {
                "would_run": step.action,
                "target": asset.name if asset else None,
                "inputs": mask_value(step.inputs),
            }
            return ActionResult.success(
                would, summary=f"record-only: would run {step.action}"
            ), False
        if action is None:
            return ActionResult.failure(
                error_class="ActionUnavailable",
                error_message=f"no implementation of {step.action} is installed",
            ), False
        try:
            inputs = spec.parse_inputs(step.inputs)
            result = await asyncio.wait_for(
                action.run(context, asset, inputs), timeout=context.timeout_s + 2
            )
            return result, False
        except (TimeoutError, StepTimeoutError):
            return ActionResult.failure(
                error_class="TimeoutError",
                error_message=f"step exceeded its timeout of {context.timeout_s:g} s",
                retryable=True,
            ), True
        except TransportError as exc:
            return ActionResult.failure(
                error_class=type(exc).__name__,
                error_message=exc.detail,
                retryable=bool(getattr(exc, "retryable", False)),
            ), False
        except OpsexecError as exc:
            return ActionResult.failure(
                error_class=type(exc).__name__, error_message=exc.detail
            ), False
        except PydanticValidationError as exc:
            return ActionResult.failure(
                error_class="ValidationError", error_message=str(exc)
            ), False

    async def _record_step(
        self, state: _RunState, row: asyncpg.Record, result: ActionResult, timed_out: bool
    ) -> bool:
        output = prepare_output(result)
        status = S.SUCCEEDED if result.ok else S.FAILED
        async with self._tx(state) as connection:
            output_ref = await store_artifact(
                connection,
                tenant_id=state.tenant_id,
                execution_id=state.id,
                step_id=row["id"],
                output=output,
            )
            await step_store.finish_step(
                connection,
                row["id"],
                status=status,
                timed_out=timed_out,
                output_summary=output.summary,
                output_size_bytes=output.size_bytes,
                output_ref=output_ref,
                error_class=result.error_class,
                error_message=result.error_message,
            )
            await events.append_event(
                connection,
                state.id,
                "step_completed" if result.ok else "step_failed",
                {
                    "step_number": row["step_number"],
                    "target": row["target_ref"],
                    "status": status.value,
                    "timed_out": timed_out,
                    "summary": output.summary.get("answer"),
                    "error_class": result.error_class,
                },
                step_id=row["id"],
            )
        if result.ok and result.summary:
            state.answers.append(result.summary)
        return result.ok

    # --- the end ---------------------------------------------------------------------------

    async def _finish(
        self,
        state: _RunState,
        outcome: str,
        *,
        error: BaseException | None = None,
        timed_out: bool = False,
    ) -> str:
        async with self._tx(state) as connection:
            # Steps that never started did not fail: they were not run.
            await step_store.skip_unstarted(connection, state.id, S.CANCELLED)
            rows = await step_store.steps_of(connection, state.id)
            failed = [r for r in rows if r["status"] == S.FAILED]
            if outcome == S.SUCCEEDED and (failed or any(r["status"] != S.SUCCEEDED for r in rows)):
                outcome = S.FAILED
            summary = execution_result([dict(r) for r in rows], state.answers)
            # Counters are written once, by the run that ends the execution; a worker that
            # died mid-run never wrote its own, so the stored values plus ours are the total.
            fields: dict[str, Any] = {
                "result_summary": summary,
                "retries_total": state.execution["retries_total"] + state.retries,
                "cancel_checks_performed": (
                    state.execution["cancel_checks_performed"] + state.cancel_checks
                ),
            }
            kind = "execution_completed"
            if outcome == S.FAILED:
                kind = "execution_failed"
                fields |= self._failure_fields(state, error, timed_out, failed)
            elif outcome == S.CANCELLED:
                kind = "execution_cancelled"
            # Ended before it began (refused at the worker, locks busy): the FSM passes
            # through running. A concurrent writer makes either transition fail (CAS).
            if state.execution["status"] == S.APPROVED:
                await executions.transition(
                    connection,
                    state.id,
                    state.tenant_id,
                    expected=S.APPROVED,
                    to=S.RUNNING,
                    actor_id=None,
                )
            actor = await self._system_user(connection, state.tenant_id)
            closing: list[tuple[str, dict[str, Any]]] = []
            if timed_out:
                closing.append(
                    (
                        "execution_timed_out",
                        {
                            "timeout_ms": state.execution["timeout_ms"],
                            "timeout_policy_id": state.execution["timeout_policy_id"],
                        },
                    )
                )
            closing.append((kind, {"status": outcome, "answer": summary["answer"]}))
            final = await executions.transition(
                connection,
                state.id,
                state.tenant_id,
                expected=S.RUNNING,
                to=outcome,
                actor_id=actor,
                fields=fields,
                then=closing,
            )
            if state.fence is not None:
                await state.fence.complete(connection)
        action = primary_action(state.plan, self.registry)
        metrics.execution_finished(final, action)
        logger.info(
            "execution finished",
            extra=execution_fields(final, state.plan, self.registry) | outcome_fields(final),
        )
        return outcome

    def _failure_fields(
        self,
        state: _RunState,
        error: BaseException | None,
        timed_out: bool,
        failed: list[asyncpg.Record],
    ) -> dict[str, Any]:
        if timed_out:
            return {
                "timed_out": True,
                "error_class": "TimeoutError",
                "error_message": (
                    f"execution exceeded {state.execution['timeout_ms']} ms "
                    f"(policy {state.execution['timeout_policy_id']})"
                ),
            }
        if isinstance(error, OpsexecError):
            return {"error_class": error.recorded_as(), "error_message": error.detail}
        if error is not None:
            return {"error_class": type(error).__name__, "error_message": str(error)}
        if failed:
            first = failed[0]
            error_class = first["error_class"] or "StepFailed"
            return {
                "error_class": error_class,
                "error_message": (
                    f"step {first['step_number']} ({first['step_key']} on "
                    f"{first['target_ref'] or '-'}) failed: {first['error_message'] or ''}"
                ).strip(),
                "timed_out": bool(first["timed_out"]) and error_class == "TimeoutError",
            }
        return {"error_class": "StepFailed", "error_message": "a step did not complete"}


def _dependency_order(plan: Plan) -> list[PlanStep]:
    """Steps in an order that respects ``depends_on``, otherwise keeping plan order."""
    done: set[str] = set()
    ordered: list[PlanStep] = []
    remaining = list(plan.steps)
    while remaining:
        for step in remaining:
            if set(step.depends_on) <= done:
                ordered.append(step)
                done.add(step.id)
                remaining.remove(step)
                break
        else:  # validate_plan refuses cycles; a stored plan has none
            raise RuntimeError("dependency cycle in a stored plan")
    return ordered
