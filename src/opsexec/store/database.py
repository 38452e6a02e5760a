"""Opening the database a process runs against: the configured server or the embedded one."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from opsexec.config import Settings
from opsexec.store import Connection, create_pool, migrate
from opsexec.store.embedded import EmbeddedPostgres


@dataclass
class Database:
    dsn: str
    pool: asyncpg.Pool
    embedded: EmbeddedPostgres | None = None

    async def close(self) -> None:
        await self.pool.close()
        if self.embedded is not None:
            await self.embedded.stop()


async def resolve_dsn(settings: Settings) -> tuple[str, EmbeddedPostgres | None]:
    if settings.database_url:
        return settings.database_url, None
    embedded = await EmbeddedPostgres.start(settings.data_dir)
    return embedded.dsn, embedded


async def open_database(settings: Settings, *, run_migrations: bool = True) -> Database:
    """Connect (starting the embedded server if no URL is set) and migrate to head."""
    dsn, embedded = await resolve_dsn(settings)
    try:
        if run_migrations:
            await migrate.upgrade(dsn)
        pool = await create_pool(dsn, min_size=settings.db_pool_min, max_size=settings.db_pool_max)
    except BaseException:
        if embedded is not None:
            await embedded.stop()
        raise
    return Database(dsn=dsn, pool=pool, embedded=embedded)


async def schema_revision(connection: Connection) -> str | None:
    """The applied Alembic revision, or None on an empty database."""
    exists = await connection.fetchval("SELECT to_regclass('alembic_version') IS NOT NULL")
    if not exists:
        return None
    revision: str | None = await connection.fetchval("SELECT version_num FROM alembic_version")
    return revision
