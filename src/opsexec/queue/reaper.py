"""The reaper (R-QUEUE): expired leases, expired locks, expired approvals.

Any number of workers run it periodically; a transaction-scoped advisory lock lets one
pass run at a time across hosts, and ``SKIP LOCKED`` keeps it off rows in use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

from opsexec.engine.approvals import expire_due_approvals
from opsexec.safety.mutex import reap_expired_locks
from opsexec.store import Connection, events, transaction
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
    logger.warning(
        "job dead-lettered", extra={"exec_id": str(job["execution_id"]), "dlq_id": str(dlq_id)}
    )


@dataclass
class ReapReport:
    leases: int = 0
    dead_lettered: int = 0
    locks: int = 0
    approvals: int = 0
    skipped: bool = False


class Reaper:
    def __init__(self, pool: asyncpg.Pool, *, backoff_unit_s: float = 1.0) -> None:
        self.pool = pool
        self.backoff_unit_s = backoff_unit_s

    async def reap_once(self, limit: int = 200) -> ReapReport:
        report = ReapReport()
        async with transaction(self.pool) as connection:
            if not await connection.fetchval(
                "SELECT pg_try_advisory_xact_lock($1)", _REAPER_LOCK_ID
            ):
                report.skipped = True
                return report
            for job in await store.expired_leases(connection, limit):
                error = f"lease held by {job['leased_by']} expired"
                await events.append_event(
                    connection,
                    job["execution_id"],
                    "lease_expired",
                    {"worker_id": job["leased_by"], "attempt": job["attempt"] + 1},
                )
                row = await store.fail_attempt(connection, job["id"], error, self.backoff_unit_s)
                report.leases += 1
                if row is not None and row["status"] == "failed":
                    await dead_letter_job(connection, row, error)
                    report.dead_lettered += 1
        report.locks = await reap_expired_locks(self.pool)
        report.approvals = await expire_due_approvals(self.pool)
        if report.leases or report.locks or report.approvals:
            logger.info(
                "reaper pass",
                extra={
                    "leases": report.leases,
                    "locks": report.locks,
                    "approvals": report.approvals,
                    "dead_lettered": report.dead_lettered,
                },
            )
        return report
