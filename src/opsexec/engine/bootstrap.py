"""First start: a tenant, an administrator and the one time their key is shown."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import asyncpg

from opsexec.store import transaction
from opsexec.store.identity import create_api_key, ensure_tenant, ensure_user

DEFAULT_TENANT = "default"
DEFAULT_ADMIN = "admin@localhost"
ADMIN_KEY_FILE = "admin-api-key"
_BOOTSTRAP_LOCK_ID = 0x6F70_7365_7865_6302


@dataclass(frozen=True)
class Bootstrapped:
    tenant_id: UUID
    user_id: UUID
    api_key: str


async def bootstrap_first_admin(pool: asyncpg.Pool) -> Bootstrapped | None:
    """On a database with no people yet, create tenant ``default`` and its admin.

    Returns the new admin's key (to show once) or None when someone already exists, so a
    restart never mints a second key. Serialised by an advisory lock: two processes
    starting together create one admin.
    """
    async with transaction(pool) as connection:
        await connection.execute("SELECT pg_advisory_xact_lock($1)", _BOOTSTRAP_LOCK_ID)
        has_people = await connection.fetchval(
            "SELECT EXISTS (SELECT 1 FROM users WHERE NOT is_system)"
        )
        if has_people:
            return None
        tenant_id = await ensure_tenant(connection, DEFAULT_TENANT)
        user_id = await ensure_user(connection, tenant_id, DEFAULT_ADMIN, ["admin"])
        _, api_key = await create_api_key(connection, tenant_id, user_id, name="bootstrap")
        return Bootstrapped(tenant_id=tenant_id, user_id=user_id, api_key=api_key)


def write_admin_key(data_dir: Path, api_key: str) -> Path:
    """Keep the bootstrap key where only this user can read it (mode 0600)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / ADMIN_KEY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(api_key + "\n")
    os.chmod(path, 0o600)
    return path
