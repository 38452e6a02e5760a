"""SQL for worker heartbeats: presence for /readyz and /metrics, and drain requests.

A worker registers when it starts, refreshes ``last_seen_at`` while it runs (reading any
drain request back in the same round trip), and stamps ``stopped_at`` when it exits. An
operator's drain request is a column write plus a NOTIFY, so the worker hears it at once
and the periodic heartbeat is the safety net when the announcement is lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from opsexec.store import Connection
from opsexec.store.channels import DRAIN_CHANNEL, notify

FORGET_AFTER_DAYS = 7
"""Rows of workers unseen for this long are deleted when any worker starts."""

REGISTER = """
INSERT INTO worker_heartbeats (worker_id, hostname, pid, concurrency, metadata)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (worker_id) DO UPDATE
SET hostname = EXCLUDED.hostname, pid = EXCLUDED.pid, concurrency = EXCLUDED.concurrency,
    running_jobs = 0, started_at = now(), last_seen_at = now(), drain_requested_at = NULL,
    drain_requested_by = NULL, stopped_at = NULL, metadata = EXCLUDED.metadata
"""

BEAT = """
UPDATE worker_heartbeats SET last_seen_at = now(), running_jobs = $2
WHERE worker_id = $1 AND stopped_at IS NULL
RETURNING drain_requested_at
"""

STOPPED = """
UPDATE worker_heartbeats SET stopped_at = now(), last_seen_at = now(), running_jobs = 0
WHERE worker_id = $1 AND stopped_at IS NULL
"""

REQUEST_DRAIN = """
UPDATE worker_heartbeats
SET drain_requested_at = coalesce(drain_requested_at, now()),
    drain_requested_by = coalesce(drain_requested_by, $2)
WHERE worker_id = $1 AND stopped_at IS NULL
RETURNING *
"""

SUMMARY = """
SELECT count(*) FILTER (WHERE fresh AND drain_requested_at IS NULL) AS running,
       count(*) FILTER (WHERE fresh AND drain_requested_at IS NOT NULL) AS draining,
       count(*) FILTER (WHERE NOT fresh) AS stale,
       extract(epoch FROM now() - max(last_seen_at)) AS newest_age_s
FROM (SELECT *, last_seen_at > now() - make_interval(secs => $1) AS fresh
      FROM worker_heartbeats WHERE stopped_at IS NULL) AS live
"""


@dataclass(frozen=True, slots=True)
class WorkerSummary:
    """Worker processes that have not said goodbye, by how recently they spoke."""

    running: int
    draining: int
    stale: int
    newest_age_s: float | None

    @property
    def fresh(self) -> int:
        return self.running + self.draining


async def register(
    connection: Connection,
    worker_id: str,
    *,
    hostname: str,
    pid: int,
    concurrency: int,
    metadata: dict[str, Any] | None = None,
) -> None:
    """(Re)start a worker's row: a restarted worker of the same id is a new incarnation."""
    await connection.execute(
        "DELETE FROM worker_heartbeats WHERE last_seen_at < now() - make_interval(days => $1)",
        FORGET_AFTER_DAYS,
    )
    await connection.execute(REGISTER, worker_id, hostname, pid, concurrency, metadata or {})


async def beat(connection: Connection, worker_id: str, running_jobs: int) -> tuple[bool, bool]:
    """Refresh ``last_seen_at``: ``(row_exists, drain_requested)``."""
    row = await connection.fetchrow(BEAT, worker_id, running_jobs)
    if row is None:
        return False, False
    return True, row["drain_requested_at"] is not None


async def mark_stopped(connection: Connection, worker_id: str) -> None:
    await connection.execute(STOPPED, worker_id)


async def request_drain(
    connection: Connection, worker_id: str, requested_by: UUID | None
) -> asyncpg.Record | None:
    """Flag a live worker for draining and announce it; None if no such live worker."""
    row = await connection.fetchrow(REQUEST_DRAIN, worker_id, requested_by)
    if row is not None:
        await notify(connection, DRAIN_CHANNEL, worker_id)
    return row


async def list_workers(connection: Connection, *, fresh_within_s: float) -> list[asyncpg.Record]:
    """Every known worker, newest first, with ``fresh`` computed by the database clock."""
    return await connection.fetch(
        """SELECT *, stopped_at IS NULL AND last_seen_at > now() - make_interval(secs => $1)
                  AS fresh
           FROM worker_heartbeats ORDER BY stopped_at IS NOT NULL, last_seen_at DESC""",
        fresh_within_s,
    )


async def get_worker(
    connection: Connection, worker_id: str, *, fresh_within_s: float
) -> asyncpg.Record | None:
    return await connection.fetchrow(
        """SELECT *, stopped_at IS NULL AND last_seen_at > now() - make_interval(secs => $2)
                  AS fresh
           FROM worker_heartbeats WHERE worker_id = $1""",
        worker_id,
        fresh_within_s,
    )


async def summary(connection: Connection, *, fresh_within_s: float) -> WorkerSummary:
    row = await connection.fetchrow(SUMMARY, fresh_within_s)
    assert row is not None
    age = row["newest_age_s"]
    return WorkerSummary(
        running=row["running"],
        draining=row["draining"],
        stale=row["stale"],
        newest_age_s=float(age) if age is not None else None,
    )
