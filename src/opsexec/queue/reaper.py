"""The reaper (R-QUEUE): expired leases, expired locks, expired approvals.

Any number of workers run it periodically; a transaction-scoped advisory lock lets one
pass run at a time across hosts, and ``SKIP LOCKED`` keeps it off rows in use (a worker's
fenced write holds its job row, so a lease being written under is never reaped mid-write).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

from opsexec.engine.approvals import expire_due_approvals
from opsexec.engine.unattended import end_unattended
from opsexec.fsm import ExecutionStatus
from opsexec.observability import metrics
from opsexec.safety.mutex import reap_expired_locks, release_execution_locks
from opsexec.store import Connection, events, executions, transaction
from opsexec.store import queue as store

logger = logging.getLogger("opsexec.reaper")
_REAPER_LOCK_ID = 0x6F70_7365_7865_6303


async def dead_letter_job(connection: Connection, job: asyncpg.Record, error: str) -> None:
    """Attempts are spent: keep the job, its plan and context in the DLQ for a person."""
    dlq_id = await store.dead_letter(connection, job, error)
    await events.append_event(
        connection,
        job["execution_id"],
        "dead_lettered",
        {"dlq_id": str(dlq_id), "attempts": job["attempt"], "error": error},
    )
    metrics.dead_lettered()
    logger.warning(
        "job dead-lettered", extra={"exec_id": str(job["execution_id"]), "dlq_id": str(dlq_id)}
    )


ABANDONED_GRACE_S = 60.0
"""How long past its timeout an immediate execution may stay running before it is ended:
the engine's own timeout handling needs seconds, not a minute."""
ABANDONED_ERROR = "ExecutionAbandoned"


@dataclass
class ReapReport:
    leases: int = 0
    dead_lettered: int = 0
    locks: int = 0
    approvals: int = 0
    abandoned: int = 0
    skipped: bool = False


class Reaper:
    def __init__(self, pool: asyncpg.Pool, *, backoff_unit_s: float = 1.0) -> None:
        self.pool = pool
        self.backoff_unit_s = backoff_unit_s

    async def reap_once(self, limit: int = 200) -> ReapReport:
        """One pass over leases, locks and approvals, unless another reaper is mid-pass.

        A guard transaction holds the advisory lock for the whole pass, so "one at a time"
        covers locks and approvals too. It touches no rows: the work runs in transactions
        of its own, which may then write events on the same executions without waiting
        on the guard. (Advisory locks stay transaction-scoped: pooled connections skip
        asyncpg's reset query, so a session lock could outlive a failed unlock.)
        """
        report = ReapReport()
        async with self.pool.acquire() as guard, guard.transaction():
            if not await guard.fetchval("SELECT pg_try_advisory_xact_lock($1)", _REAPER_LOCK_ID):
                report.skipped = True
                metrics.reaper_pass(skipped=True, leases_expired=0)
                return report
            async with transaction(self.pool) as connection:
                await self._reap_leases(connection, limit, report)
            report.abandoned = await self._end_abandoned(limit)
            report.locks = await reap_expired_locks(self.pool)
            report.approvals = await expire_due_approvals(self.pool)
        metrics.reaper_pass(skipped=False, leases_expired=report.leases)
        if report.leases or report.locks or report.approvals or report.abandoned:
            logger.info(
                "reaper pass",
                extra={
                    "abandoned": report.abandoned,
                    "leases": report.leases,
                    "locks": report.locks,
                    "approvals": report.approvals,
                    "dead_lettered": report.dead_lettered,
                },
            )
        return report

    async def _end_abandoned(self, limit: int) -> int:
        """Fail immediate executions whose API process died mid-run (``engine/unattended``)."""
        async with transaction(self.pool) as connection:
            ended = [
                await end_unattended(
                    connection,
                    execution,
                    to=ExecutionStatus.FAILED,
                    actor_id=None,
                    event_kind="execution_failed",
                    event_payload={"status": "failed", "error_class": ABANDONED_ERROR},
                    reason="abandoned: its process stopped mid-run",
                    fields={
                        "error_class": ABANDONED_ERROR,
                        "error_message": "the process running this immediate execution "
                        "stopped; it was still running long past its timeout",
                    },
                )
                for execution in await executions.lock_abandoned_immediate(
                    connection, ABANDONED_GRACE_S, limit
                )
            ]
        for row in ended:
            await release_execution_locks(
                self.pool, tenant_id=row["tenant_id"], execution_id=row["id"]
            )
            metrics.execution_finished(row)
            logger.warning(
                "abandoned execution ended",
                extra={"exec_id": str(row["id"]), "tenant_id": str(row["tenant_id"])},
            )
        return len(ended)

    async def _reap_leases(self, connection: Connection, limit: int, report: ReapReport) -> None:
        """A job whose worker stopped heartbeating is charged an attempt and retried later."""
        for job in await store.expired_leases(connection, limit):
            error = f"lease held by {job['leased_by']} expired"
            row = await store.fail_attempt(connection, job["id"], error, self.backoff_unit_s)
            if row is None:  # locked FOR UPDATE above: cannot happen, but never guess
                continue
            report.leases += 1
            await events.append_event(
                connection,
                job["execution_id"],
                "lease_expired",
                {
                    "worker_id": job["leased_by"],
                    "attempt": row["attempt"],
                    "max_attempts": row["max_attempts"],
                    **store.retry_fields(row),
                },
            )
            if row["status"] == "failed":
                await dead_letter_job(connection, row, error)
                report.dead_lettered += 1
