"""The engine's parts, assembled once per process (API server, worker, or both)."""

from __future__ import annotations

from dataclasses import dataclass

from opsexec.actions.registry import ActionRegistry, default_registry
from opsexec.config import Settings
from opsexec.engine.executor import Executor
from opsexec.engine.runner import ExecutionEngine
from opsexec.safety.secrets import (
    ChainedSecretBackend,
    MasterKey,
    default_secret_backend,
    load_master_key,
)
from opsexec.store.database import Database, open_database


@dataclass
class Services:
    settings: Settings
    db: Database
    registry: ActionRegistry
    master_key: MasterKey
    secrets: ChainedSecretBackend
    engine: ExecutionEngine
    executor: Executor

    async def close(self) -> None:
        await self.db.close()


async def open_services(settings: Settings, *, retry_backoff_s: float = 1.0) -> Services:
    """Database (migrated), secrets, registry with built-ins and entry points, engine."""
    db = await open_database(settings)
    try:
        registry = default_registry()
        registry.load_entry_points()
        master_key = load_master_key(settings)
        secrets = default_secret_backend(db.pool, master_key)
        engine = ExecutionEngine(
            db.pool, registry, settings, secrets, retry_backoff_s=retry_backoff_s
        )
        executor = Executor(db.pool, registry, settings, runner=engine)
    except BaseException:
        await db.close()
        raise
    return Services(settings, db, registry, master_key, secrets, engine, executor)
