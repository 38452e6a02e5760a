"""Background workers (R-QUEUE): lease jobs, run them, heartbeat, hand back, give up.

A worker holds ``concurrency`` jobs at most. It wakes when a job becomes runnable (a
signal through LISTEN/NOTIFY or Redis: ``queue/signals.py``) and polls as a safety net,
leases with ``FOR UPDATE SKIP LOCKED``, and runs each job through the same
``ExecutionEngine`` the API uses, with every write fenced by the job's lease token. On
SIGTERM it takes nothing new, lets running steps finish within the grace period, and
hands unfinished jobs straight back (no attempt charged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import asyncpg

from opsexec.config import Settings
from opsexec.engine.runner import HANDED_BACK, ExecutionEngine, Fence
from opsexec.errors import LeaseLostError, ResourceBusyError
from opsexec.fsm import ExecutionStatus
from opsexec.observability.heartbeat import WorkerHeartbeat
from opsexec.observability.logging import bind_log_context
from opsexec.policy import HEARTBEATS_PER_LEASE
from opsexec.queue.reaper import Reaper, dead_letter_job
from opsexec.queue.signals import WorkerSignals
from opsexec.safety.masking import mask_text
from opsexec.store import events, executions, transaction
from opsexec.store import queue as store
from opsexec.store.channels import CANCEL_CHANNEL, DRAIN_CHANNEL, QUEUE_CHANNEL, notify

logger = logging.getLogger("opsexec.worker")
S = ExecutionStatus

BUSY_BACKOFF_CAP_S = 30.0
INTERRUPT_GRACE_S = 10.0
"""After the shutdown grace, interrupted runs get this long to hand their jobs back."""


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class WorkerOptions:
    concurrency: int = 4
    poll_interval_s: float = 1.0
    shutdown_grace_s: float = 30.0
    backoff_unit_s: float = 1.0
    """Seconds per 2^attempt of queue-level backoff; tests shrink it."""
    reaper_interval_s: float = 60.0
    worker_id: str = field(default_factory=default_worker_id)
    heartbeat_interval_s: float = 10.0
    """How often the worker's ``worker_heartbeats`` row is refreshed (readiness, drain)."""
    redis_url: str | None = None
    """Hear signals through the event-bus relay on Redis instead of a LISTEN connection."""
    kill_switch: bool = False
    """``OPSEXEC_KILL_SWITCH``: start no new job (running executions still finish)."""

    @classmethod
    def from_settings(
        cls, settings: Settings, *, concurrency: int, worker_id: str | None = None
    ) -> WorkerOptions:
        """The options every worker (``opsexec worker``, ``serve``'s own) takes from config."""
        return cls(
            concurrency=concurrency,
            worker_id=worker_id or default_worker_id(),
            shutdown_grace_s=settings.shutdown_grace_s,
            reaper_interval_s=settings.reaper_interval_s,
            backoff_unit_s=settings.queue_backoff_unit_s,
            heartbeat_interval_s=settings.worker_heartbeat_s,
            redis_url=settings.redis_url,
            kill_switch=settings.kill_switch,
        )


class Worker:
    def __init__(
        self, pool: asyncpg.Pool, dsn: str, engine: ExecutionEngine, options: WorkerOptions
    ) -> None:
        self.pool = pool
        self.dsn = dsn
        self.engine = engine
        self.options = options
        self.id = options.worker_id
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._jobs: dict[asyncio.Task[None], UUID] = {}
        self.signals = WorkerSignals(
            dsn,
            {
                QUEUE_CHANNEL: self._on_queue,
                CANCEL_CHANNEL: engine.on_cancel_signal,
                DRAIN_CHANNEL: self._on_drain,
            },
            redis_url=options.redis_url,
            on_gap=self._wake.set,
        )
        self.reaper = Reaper(pool, backoff_unit_s=options.backoff_unit_s)
        self._finish_jobs = False
        self.presence = WorkerHeartbeat(
            pool,
            self.id,
            concurrency=options.concurrency,
            interval_s=options.heartbeat_interval_s,
            running_jobs=lambda: len(self._jobs),
            on_drain_requested=self.drain,
        )

    # --- lifecycle -----------------------------------------------------------------------

    def stop(self) -> None:
        """Take no new jobs; running ones stop at their next step boundary."""
        if not self._stopping.is_set() or self._finish_jobs:  # also cuts a drain() short
            logger.info("worker draining", extra={"worker_id": self.id})
            self._finish_jobs = False
            self._stopping.set()
            self.engine.drain()
            self._wake.set()

    def drain(self) -> None:
        """Operator drain (R-ROLL): lease nothing new, finish the jobs in hand, then return.

        Unlike ``stop()`` the running executions are not handed back: they run to their
        end, however long that takes. A ``stop()`` (SIGTERM) meanwhile still applies its
        grace period.
        """
        if not self._stopping.is_set():
            logger.info("worker drain requested", extra={"worker_id": self.id})
            self._finish_jobs = True
            self._stopping.set()
            self._wake.set()

    async def run(self) -> None:
        """Work until ``stop()``; then wait for (or hand back) the jobs in flight."""
        await self.signals.start()
        reaper = asyncio.create_task(self._reap_periodically())
        presence = asyncio.create_task(self.presence.run())
        try:
            while not self._stopping.is_set():
                free = self.options.concurrency - len(self._jobs)
                if free > 0:
                    for job in await self._lease(free):
                        task = asyncio.create_task(self._process(job))
                        self._jobs[task] = job["execution_id"]
                        task.add_done_callback(self._finished)
                    if len(self._jobs) < self.options.concurrency and not self._wake.is_set():
                        await self._sleep()
                else:
                    await self._sleep()
            await self._drain()
        finally:
            reaper.cancel()
            presence.cancel()
            await asyncio.gather(reaper, presence, return_exceptions=True)
            await self.presence.stopped()
            await self.signals.stop()

    def _finished(self, task: asyncio.Task[None]) -> None:
        execution_id = self._jobs.pop(task, None)
        if not task.cancelled() and (error := task.exception()) is not None:
            # The database was gone even for settling the job: its lease will expire and
            # the reaper charges the attempt instead.
            logger.error(
                "could not settle a job",
                exc_info=error,
                extra={"worker_id": self.id, "exec_id": str(execution_id)},
            )
        self._wake.set()

    async def _sleep(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.options.poll_interval_s)
        self._wake.clear()

    async def _drain(self) -> None:
        """Runs stop at their next step boundary; past the grace period, steps are stopped.

        An interrupted run hands its job back at once (no attempt charged); the step it
        was in is then ``running`` in the database, so the next worker re-runs it only if
        its action is idempotent. Cancelling the job's task is the last resort, for a run
        that does not even come back from an interrupt.
        """
        while self._finish_jobs and self._jobs:  # drain(): whole jobs, until a stop()
            await asyncio.wait(set(self._jobs), timeout=self.options.poll_interval_s)
        if not self._jobs:
            return
        _, pending = await asyncio.wait(set(self._jobs), timeout=self.options.shutdown_grace_s)
        if not pending:
            return
        for task in pending:
            self.engine.interrupt(self._jobs[task])
        _, stuck = await asyncio.wait(pending, timeout=INTERRUPT_GRACE_S)
        for task in stuck:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _on_queue(self, _execution_id: str) -> None:
        self._wake.set()

    def _on_drain(self, worker_id: str) -> None:
        if worker_id == self.id:
            self.drain()

    async def _reap_periodically(self) -> None:
        """A pass at start (a restarted worker recovers what its predecessor left at once),
        then one per interval; passes running elsewhere make these skip."""
        while True:
            try:
                await self.reaper.reap_once()
            except Exception:  # the reaper must never take the worker down
                logger.exception("reaper pass failed", extra={"worker_id": self.id})
            await asyncio.sleep(self.options.reaper_interval_s)

    async def _lease(self, limit: int) -> list[asyncpg.Record]:
        try:
            async with transaction(self.pool) as connection:
                return await store.dequeue(
                    connection, self.id, limit, kill_switch=self.options.kill_switch
                )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            logger.exception("could not lease jobs", extra={"worker_id": self.id})
            return []

    # --- one job -------------------------------------------------------------------------

    async def _process(self, job: asyncpg.Record) -> None:
        token: UUID = job["lease_token"]
        execution_id: UUID = job["execution_id"]
        log = {
            "exec_id": str(execution_id),
            "tenant_id": str(job["tenant_id"]),
            "worker_id": self.id,
            "queue_id": str(job["id"]),
        }
        bind_log_context(**log)  # this job's own task: the binding ends with it
        fence = Fence(execution_id, job["id"], token)
        lost = asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat(job, lost))
        try:
            if job["lease_count"] > 1:
                await self._record_resumption(job, fence)
            status = await self.engine.run(
                execution_id,
                job["tenant_id"],
                worker_id=self.id,
                queue_wait_ms=_queue_wait_ms(job),
                defer_when_busy=True,
                fence=fence,
            )
            await self._settle(job, status, fence)
        except LeaseLostError:
            logger.warning("lease lost; leaving the job to its new owner", extra=log)
        except ResourceBusyError as busy:
            await self._defer_busy(job, busy)
        except asyncio.CancelledError:
            # Shutdown past the grace period: give the job back for another worker.
            await asyncio.shield(self._hand_back(job, available_in_s=0.0, reason="shutdown"))
            raise
        except Exception as exc:  # an infrastructure failure: charge an attempt
            logger.exception("job failed at the queue level", extra=log)
            await self._fail_attempt(job, f"{type(exc).__name__}: {exc}")
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)

    async def _record_resumption(self, job: asyncpg.Record, fence: Fence) -> None:
        """A running execution changes hands (its worker died or left): say who has it now.

        ``worker_id`` names the worker that runs the execution last; the events keep every
        hand-over (``lease_expired``, ``attempt_failed``, ``execution_resumed``).
        """
        async with transaction(self.pool) as connection:
            await fence.check(connection)
            if await executions.hand_over(connection, job["execution_id"], self.id):
                await events.append_event(
                    connection,
                    job["execution_id"],
                    "execution_resumed",
                    {
                        "worker_id": self.id,
                        "lease_count": job["lease_count"],
                        "attempt": job["attempt"] + 1,
                    },
                )

    async def _settle(self, job: asyncpg.Record, status: str, fence: Fence) -> None:
        if fence.completed:
            return  # the run's final transaction retired the job with the execution
        if status == HANDED_BACK:
            await self._hand_back(job, available_in_s=0.0, reason="worker shutting down")
        elif status == S.AWAITING_APPROVAL:
            # Parked at a level-3 gate: the approval releases the job again.
            async with transaction(self.pool) as connection:
                await store.park(connection, job["id"], job["lease_token"], job["execution_id"])
        else:
            async with transaction(self.pool) as connection:
                await store.complete(connection, job["id"], job["lease_token"])

    async def _hand_back(
        self,
        job: asyncpg.Record,
        *,
        available_in_s: float | None,
        reason: str,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        async with transaction(self.pool) as connection:
            await store.hand_back(
                connection,
                job["id"],
                job["lease_token"],
                available_in_s=available_in_s,
                reason=reason,
                metadata=metadata,
            )
            if available_in_s == 0.0:
                await notify(connection, QUEUE_CHANNEL, str(job["execution_id"]))

    async def _defer_busy(self, job: asyncpg.Record, busy: ResourceBusyError) -> None:
        """A target is locked: wait with backoff, uncharged, within the lock-wait budget."""
        metadata = job["metadata"]
        started = metadata.get("lock_wait_started") or time.time()
        deferrals = int(metadata.get("lock_deferrals", 0)) + 1
        async with self.pool.acquire() as connection:
            execution = await executions.get_execution(
                connection, job["tenant_id"], job["execution_id"]
            )
        assert execution is not None, "a queued job's execution exists"
        budget_ms = execution["timeout_ms"]
        if (time.time() - started) * 1000 >= budget_ms:
            await self.engine.fail_busy(job["execution_id"], job["tenant_id"], busy)
            async with transaction(self.pool) as connection:
                await store.complete(connection, job["id"], job["lease_token"])
            return
        delay = min(BUSY_BACKOFF_CAP_S, self.options.backoff_unit_s * 2 ** (deferrals - 1))
        await self._hand_back(
            job,
            available_in_s=delay,
            reason=f"waiting for lock {busy.extra.get('lock_key', '')}",
            metadata={"lock_wait_started": started, "lock_deferrals": deferrals},
        )

    async def _fail_attempt(self, job: asyncpg.Record, error: str) -> None:
        """Charge an attempt (only while the lease is still ours), back off or dead-letter."""
        async with transaction(self.pool) as connection:
            row = await store.fail_attempt(
                connection,
                job["id"],
                error,
                self.options.backoff_unit_s,
                token=job["lease_token"],
            )
            if row is None:
                return
            await events.append_event(
                connection,
                job["execution_id"],
                "attempt_failed",
                {
                    "worker_id": self.id,
                    "attempt": row["attempt"],
                    "max_attempts": row["max_attempts"],
                    "error": mask_text(error),
                    **store.retry_fields(row),
                },
            )
            if row["status"] == "failed":
                await dead_letter_job(connection, row, mask_text(error))

    async def _heartbeat(self, job: asyncpg.Record, lost: asyncio.Event) -> None:
        """Renew the lease every ``1 / HEARTBEATS_PER_LEASE`` of it, up to the SLA's cap."""
        lease_s = float(job["metadata"].get("lease_ms", store.DEFAULT_LEASE_MS)) / 1000
        cap = int(job["metadata"].get("max_lease_renewals", 3))
        renewals = 0
        while renewals < cap:
            await asyncio.sleep(lease_s / HEARTBEATS_PER_LEASE)
            try:
                async with self.pool.acquire() as connection:
                    held = await store.heartbeat(connection, job["id"], job["lease_token"])
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                # A blip must not end the heartbeats: try again at the next beat. If the
                # database stays away, the lease runs out and the fence stops our writes.
                logger.warning("heartbeat failed", exc_info=True, extra={"worker_id": self.id})
                continue
            if not held:
                lost.set()
                self.engine.interrupt(job["execution_id"])
                return
            renewals += 1


def _queue_wait_ms(job: asyncpg.Record) -> int | None:
    """Time from enqueue (or release after approval) to the first lease."""
    if job["lease_count"] != 1:
        return None
    waited = job["leased_at"] - max(job["queued_at"], job["available_at"])
    return max(0, int(waited.total_seconds() * 1000))
