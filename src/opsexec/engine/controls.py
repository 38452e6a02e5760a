"""Service-wide rollout controls (R-ROLL): the kill switch every process obeys, and
worker drain.

Two ways to pull it, both refusing every new execution with 503 ``service_disabled``
while work already running finishes:

* ``OPSEXEC_KILL_SWITCH=true`` — configuration; takes a restart, and nothing at runtime
  can release it (the environment is the operator's last word);
* the runtime switch — a row in ``service_flags`` set through ``PUT
  /v1/admin/kill-switch``, audited, seen by every API process within
  ``KILL_SWITCH_CACHE_S`` (the process that flips it sees it at once).

The runtime state is cached for a second so the hot submit path does not pay a database
round trip for a switch that changes a few times a year.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal
from uuid import UUID

import asyncpg

from opsexec.config import Settings
from opsexec.engine.actor import Actor
from opsexec.store import service_flags, transaction
from opsexec.store import workers as worker_store
from opsexec.store.identity import record_audit

KILL_SWITCH_CACHE_S: Final = 1.0

KillSwitchSource = Literal["environment", "runtime"]


@dataclass(frozen=True, slots=True)
class KillSwitchState:
    """Whether new executions are refused, and who or what says so."""

    environment: bool
    runtime: bool
    reason: str | None = None
    changed_at: datetime | None = None
    changed_by: UUID | None = None

    @property
    def engaged(self) -> bool:
        return self.environment or self.runtime

    @property
    def source(self) -> KillSwitchSource | None:
        if self.environment:
            return "environment"
        return "runtime" if self.runtime else None


class ServiceControls:
    """Reads (cached) and flips (audited) the service-wide switches; one per process."""

    def __init__(
        self, pool: asyncpg.Pool, settings: Settings, *, cache_s: float = KILL_SWITCH_CACHE_S
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.cache_s = cache_s
        self._cached: tuple[float, KillSwitchState] | None = None

    async def kill_switch(self, *, fresh: bool = False) -> KillSwitchState:
        """The switch as this process should obey it now (at most ``cache_s`` old)."""
        now = time.monotonic()
        if not fresh and self._cached is not None and now - self._cached[0] < self.cache_s:
            return self._cached[1]
        async with self.pool.acquire() as connection:
            row = await service_flags.get_flag(connection, service_flags.KILL_SWITCH)
        state = self._state(row)
        self._cached = (now, state)
        return state

    async def set_kill_switch(
        self, actor: Actor, *, engaged: bool, reason: str | None
    ) -> KillSwitchState:
        """Flip the runtime switch for every process, and audit who did it and why."""
        async with transaction(self.pool) as connection:
            before = self._state(
                await service_flags.get_flag(connection, service_flags.KILL_SWITCH)
            )
            row = await service_flags.set_flag(
                connection,
                service_flags.KILL_SWITCH,
                {"engaged": engaged, "reason": reason, "by": actor.principal},
                actor.user_id,
            )
            await record_audit(
                connection,
                actor.tenant_id,
                "kill_switch_changed",
                {
                    "before": before.runtime,
                    "after": engaged,
                    "reason": reason,
                    "environment": self.settings.kill_switch,
                    "principal": actor.principal,
                },
                actor_id=actor.user_id,
                severity="warning" if engaged else "info",
            )
        state = self._state(row)
        self._cached = (time.monotonic(), state)
        return state

    def _state(self, row: asyncpg.Record | None) -> KillSwitchState:
        value: dict[str, Any] = row["value"] if row is not None else {}
        return KillSwitchState(
            environment=self.settings.kill_switch,
            runtime=bool(value.get("engaged", False)),
            reason=value.get("reason"),
            changed_at=row["updated_at"] if row is not None else None,
            changed_by=row["updated_by"] if row is not None else None,
        )


@dataclass(frozen=True, slots=True)
class DrainRequested:
    """``worker`` is the heartbeat row after the request; ``already_stopped`` if it had exited."""

    worker: asyncpg.Record
    already_stopped: bool


async def request_worker_drain(
    pool: asyncpg.Pool,
    worker_id: str,
    *,
    audit_tenant_id: UUID | None,
    actor_id: UUID | None,
    reason: str | None,
    fresh_within_s: float,
) -> DrainRequested | None:
    """Ask one worker to lease nothing new, finish its jobs and exit; None if unknown.

    The request is a column write plus a NOTIFY (the worker's heartbeat re-reads the column,
    so a lost signal delays the drain by one beat), audited under ``audit_tenant_id``.
    """
    async with transaction(pool) as connection:
        requested = await worker_store.request_drain(connection, worker_id, actor_id)
        if requested is not None and audit_tenant_id is not None:
            await record_audit(
                connection,
                audit_tenant_id,
                "worker_drain_requested",
                {"worker_id": worker_id, "reason": reason},
                actor_id=actor_id,
            )
        current = await worker_store.get_worker(
            connection, worker_id, fresh_within_s=fresh_within_s
        )
    if current is None:
        return None
    return DrainRequested(worker=current, already_stopped=requested is None)
