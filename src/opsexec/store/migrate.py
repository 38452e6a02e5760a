"""Schema migrations: Alembic revisions written as SQL, applied under an advisory lock."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

# Any fixed 64-bit number; shared by every opsexec process that migrates.
MIGRATION_LOCK_ID = 0x6F70_7365_7865_6301

_MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Alembic keeps its migration context in module globals, so one process runs one
# migration at a time; across processes the advisory lock in env.py takes over.
_ALEMBIC_LOCK = threading.Lock()


def sqlalchemy_url(dsn: str) -> str:
    """Alembic speaks SQLAlchemy; route it through asyncpg so we ship one driver."""
    scheme, sep, rest = dsn.partition("://")
    if not sep or scheme not in {"postgres", "postgresql", "postgresql+asyncpg"}:
        raise ValueError("database URL must start with postgresql://")
    return f"postgresql+asyncpg://{rest}"


def alembic_config(dsn: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS_DIR))
    config.attributes["dsn"] = dsn
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("postgresql://unused")).get_current_head()
    assert head is not None, "no migrations found"
    return head


def known_revisions() -> frozenset[str]:
    """Every revision this code ships; a database at any other one was migrated by newer code."""
    scripts = ScriptDirectory.from_config(alembic_config("postgresql://unused"))
    return frozenset(script.revision for script in scripts.walk_revisions())


async def upgrade(dsn: str, revision: str = "head") -> None:
    """Bring the schema to ``revision``; safe to call from many processes at once."""
    # Alembic's env.py runs its own event loop, so it gets a thread of its own.
    await asyncio.to_thread(_locked, command.upgrade, dsn, revision)


async def downgrade(dsn: str, revision: str = "base") -> None:
    await asyncio.to_thread(_locked, command.downgrade, dsn, revision)


def _locked(alembic_command: Callable[[Config, str], None], dsn: str, revision: str) -> None:
    with _ALEMBIC_LOCK:
        alembic_command(alembic_config(dsn), revision)


def execute_script(sql: str) -> None:
    """Run a multi-statement SQL script inside the current migration's transaction.

    SQLAlchemy's asyncpg adapter prepares every statement, and PostgreSQL refuses to
    prepare several commands at once; asyncpg's own ``execute`` without arguments uses the
    simple-query protocol, which accepts a whole script. ``await_only`` is SQLAlchemy's
    documented bridge to driver coroutines from inside ``run_sync``.
    """
    from alembic import op
    from sqlalchemy.util import await_only

    driver_connection = op.get_bind().connection.driver_connection
    assert driver_connection is not None
    await_only(driver_connection.execute(sql))
