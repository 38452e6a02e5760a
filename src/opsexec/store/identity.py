"""SQL for tenants, users and API keys."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from opsexec.safety.apikeys import display_prefix, generate_api_key, hash_api_key

SYSTEM_PRINCIPAL = "system@opsexec"


@dataclass(frozen=True, slots=True)
class KeyOwner:
    """Who an API key belongs to, as read at authentication time."""

    key_id: UUID
    tenant_id: UUID
    tenant_name: str
    tenant_settings: dict[str, Any]
    user_id: UUID
    principal: str
    roles: tuple[str, ...]


async def ensure_tenant(connection: asyncpg.Connection, name: str) -> UUID:
    """Create the tenant (and its system user) unless it exists; return its id."""
    tenant_id: UUID = await connection.fetchval(
        """
        INSERT INTO tenants (name) VALUES ($1)
        ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name
        RETURNING id
        """,
        name,
    )
    # The system user owns what no person did: timeouts, reaper cancellations, expiry.
    await connection.execute(
        """
        INSERT INTO users (tenant_id, principal, roles, is_system)
        VALUES ($1, $2, '{}', true)
        ON CONFLICT (tenant_id, principal) DO NOTHING
        """,
        tenant_id,
        SYSTEM_PRINCIPAL,
    )
    return tenant_id


async def system_user_id(connection: asyncpg.Connection, tenant_id: UUID) -> UUID:
    user_id: UUID = await connection.fetchval(
        "SELECT id FROM users WHERE tenant_id = $1 AND principal = $2",
        tenant_id,
        SYSTEM_PRINCIPAL,
    )
    return user_id


async def ensure_user(
    connection: asyncpg.Connection, tenant_id: UUID, principal: str, roles: Sequence[str]
) -> UUID:
    """Create the user or set its roles; return its id."""
    user_id: UUID = await connection.fetchval(
        """
        INSERT INTO users (tenant_id, principal, roles) VALUES ($1, $2, $3)
        ON CONFLICT (tenant_id, principal)
            DO UPDATE SET roles = EXCLUDED.roles, updated_at = now()
        RETURNING id
        """,
        tenant_id,
        principal,
        list(roles),
    )
    return user_id


async def create_api_key(
    connection: asyncpg.Connection, tenant_id: UUID, user_id: UUID, name: str | None = None
) -> tuple[UUID, str]:
    """Store a new key's digest and return ``(key_id, key)``; the key is never stored."""
    api_key = generate_api_key()
    key_id: UUID = await connection.fetchval(
        """
        INSERT INTO api_keys (tenant_id, user_id, key_prefix, key_hash, name)
        SELECT $1, id, $3, $4, $5 FROM users WHERE id = $2 AND tenant_id = $1
        RETURNING id
        """,
        tenant_id,
        user_id,
        display_prefix(api_key),
        hash_api_key(api_key),
        name,
    )
    if key_id is None:
        raise LookupError(f"user {user_id} not found in tenant {tenant_id}")
    return key_id, api_key


async def find_key_owner(connection: asyncpg.Connection, api_key: str) -> KeyOwner | None:
    """The live owner of a key, or None if the key is unknown, revoked or its user disabled."""
    row = await connection.fetchrow(
        """
        SELECT k.id AS key_id, t.id AS tenant_id, t.name AS tenant_name,
               t.settings AS tenant_settings, u.id AS user_id, u.principal, u.roles
        FROM api_keys k
        JOIN users u ON u.id = k.user_id AND u.tenant_id = k.tenant_id
        JOIN tenants t ON t.id = k.tenant_id
        WHERE k.key_hash = $1 AND k.revoked_at IS NULL AND NOT u.disabled AND NOT u.is_system
        """,
        hash_api_key(api_key),
    )
    if row is None:
        return None
    return KeyOwner(
        key_id=row["key_id"],
        tenant_id=row["tenant_id"],
        tenant_name=row["tenant_name"],
        tenant_settings=row["tenant_settings"],
        user_id=row["user_id"],
        principal=row["principal"],
        roles=tuple(row["roles"]),
    )
