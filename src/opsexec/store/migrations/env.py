"""Alembic environment: runs our SQL revisions over asyncpg under an advisory lock.

The lock makes ``opsexec migrate`` safe when several processes start at once (two
``serve`` replicas, a worker and a CI job): the second waits, then finds the schema at
head and does nothing.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from opsexec.store.migrate import MIGRATION_LOCK_ID, sqlalchemy_url

config = context.config


def _run(connection: Connection) -> None:
    context.configure(connection=connection)
    with context.begin_transaction():
        # Taken before Alembic reads alembic_version, released at commit: a waiting
        # process then sees the schema the first one committed.
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        context.run_migrations()


async def _run_online() -> None:
    engine = create_async_engine(sqlalchemy_url(config.attributes["dsn"]), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("opsexec migrations run online only (they need the advisory lock)")
asyncio.run(_run_online())
