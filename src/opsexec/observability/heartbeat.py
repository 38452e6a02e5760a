"""A worker's heartbeat row: presence for ``/readyz`` and ``/metrics``, and the drain ear.

The worker registers when it starts, refreshes ``worker_heartbeats.last_seen_at`` every
``interval_s`` and says goodbye (``stopped_at``) when it exits, so readiness can tell a
live fleet from rows left by a dead one. Each beat also reads back whether an operator
asked this worker to drain; that is the safety net under the NOTIFY the API sends, so a
lost announcement delays a drain by one interval at most.

Database trouble never stops the worker: a failed beat is logged and retried at the
next one, and a row that vanished is re-registered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from typing import Final

import asyncpg

from opsexec.store import transaction
from opsexec.store import workers as store

logger = logging.getLogger("opsexec.worker")

_DATABASE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)

STALE_AFTER_BEATS: Final = 3
"""A worker that missed this many heartbeats (and never said goodbye) is presumed dead."""


def stale_after_s(interval_s: float) -> float:
    """How old a heartbeat may be before its worker counts as stale."""
    return STALE_AFTER_BEATS * interval_s


class WorkerHeartbeat:
    def __init__(
        self,
        pool: asyncpg.Pool,
        worker_id: str,
        *,
        concurrency: int,
        interval_s: float,
        running_jobs: Callable[[], int],
        on_drain_requested: Callable[[], None],
    ) -> None:
        self.pool = pool
        self.worker_id = worker_id
        self.concurrency = concurrency
        self.interval_s = interval_s
        self._running_jobs = running_jobs
        self._on_drain_requested = on_drain_requested

    async def run(self) -> None:
        """Register, then beat every ``interval_s`` until cancelled."""
        registered = await self._register()
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                if not registered:
                    registered = await self._register()
                    continue
                async with transaction(self.pool) as connection:
                    exists, drain = await store.beat(
                        connection, self.worker_id, self._running_jobs()
                    )
            except _DATABASE_ERRORS:
                logger.warning(
                    "worker heartbeat failed", exc_info=True, extra={"worker_id": self.worker_id}
                )
                continue
            registered = exists
            if drain:
                self._on_drain_requested()

    async def stopped(self) -> None:
        """Say goodbye, so readiness does not count this worker as stale (best effort)."""
        try:
            async with transaction(self.pool) as connection:
                await store.mark_stopped(connection, self.worker_id)
        except _DATABASE_ERRORS:
            logger.warning(
                "could not record the worker's exit", extra={"worker_id": self.worker_id}
            )

    async def _register(self) -> bool:
        try:
            async with transaction(self.pool) as connection:
                await store.register(
                    connection,
                    self.worker_id,
                    hostname=socket.gethostname(),
                    pid=os.getpid(),
                    concurrency=self.concurrency,
                )
        except _DATABASE_ERRORS:
            logger.warning(
                "worker registration failed", exc_info=True, extra={"worker_id": self.worker_id}
            )
            return False
        return True
