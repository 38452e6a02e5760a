"""SQL for tenants, users and API keys."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from opsexec.safety.apikeys import display_prefix, generate_api_key, hash_api_key
from opsexec.safety.masking import mask_value
from opsexec.store import Connection

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


async def ensure_tenant(connection: Connection, name: str) -> UUID:
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


async def tenant_id_by_name(connection: Connection, name: str) -> UUID | None:
    tenant_id: UUID | None = await connection.fetchval(
        "SELECT id FROM tenants WHERE name = $1", name
    )
    return tenant_id


async def system_user_id(connection: Connection, tenant_id: UUID) -> UUID:
    user_id: UUID = await connection.fetchval(
        "SELECT id FROM users WHERE tenant_id = $1 AND principal = $2",
        tenant_id,
        SYSTEM_PRINCIPAL,
    )
    return user_id


async def ensure_user(
    connection: Connection, tenant_id: UUID, principal: str, roles: Sequence[str]
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
    connection: Connection, tenant_id: UUID, user_id: UUID, name: str | None = None
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


async def find_key_owner(connection: Connection, api_key: str) -> KeyOwner | None:
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


async def get_user(connection: Connection, tenant_id: UUID, user_id: UUID) -> asyncpg.Record | None:
    return await connection.fetchrow(
        """SELECT id, tenant_id, principal, roles, disabled, created_at, updated_at
           FROM users WHERE id = $1 AND tenant_id = $2 AND NOT is_system""",
        user_id,
        tenant_id,
    )


async def list_users(connection: Connection, tenant_id: UUID) -> list[asyncpg.Record]:
    return await connection.fetch(
        """SELECT id, tenant_id, principal, roles, disabled, created_at, updated_at
           FROM users WHERE tenant_id = $1 AND NOT is_system ORDER BY principal""",
        tenant_id,
    )


async def create_user(
    connection: Connection, tenant_id: UUID, principal: str, roles: Sequence[str]
) -> asyncpg.Record | None:
    """Insert a user; None if the principal already exists in the tenant."""
    return await connection.fetchrow(
        """INSERT INTO users (tenant_id, principal, roles) VALUES ($1, $2, $3)
           ON CONFLICT (tenant_id, principal) DO NOTHING
           RETURNING id, tenant_id, principal, roles, disabled, created_at, updated_at""",
        tenant_id,
        principal,
        list(roles),
    )


async def update_user(
    connection: Connection,
    tenant_id: UUID,
    user_id: UUID,
    *,
    roles: Sequence[str] | None,
    disabled: bool | None,
) -> asyncpg.Record | None:
    return await connection.fetchrow(
        """UPDATE users
           SET roles = coalesce($3, roles), disabled = coalesce($4, disabled),
               updated_at = now()
           WHERE id = $1 AND tenant_id = $2 AND NOT is_system
           RETURNING id, tenant_id, principal, roles, disabled, created_at, updated_at""",
        user_id,
        tenant_id,
        list(roles) if roles is not None else None,
        disabled,
    )


def effective_roles(roles: list[str] | None, disabled: bool | None) -> tuple[str, ...] | None:
    """A user's roles as permissions see them: None when the user is gone (no row: both
    None) or disabled."""
    if roles is None or disabled is None or disabled:
        return None
    return tuple(roles)


async def list_api_keys(
    connection: Connection, tenant_id: UUID, user_id: UUID | None = None
) -> list[asyncpg.Record]:
    return await connection.fetch(
        """SELECT id, user_id, key_prefix, name, created_at, last_used_at, revoked_at
           FROM api_keys WHERE tenant_id = $1 AND ($2::uuid IS NULL OR user_id = $2)
           ORDER BY created_at""",
        tenant_id,
        user_id,
    )


async def revoke_api_key(connection: Connection, tenant_id: UUID, key_id: UUID) -> bool:
    revoked = await connection.fetchval(
        """UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
           WHERE id = $1 AND tenant_id = $2 RETURNING id""",
        key_id,
        tenant_id,
    )
    return revoked is not None


async def get_tenant(connection: Connection, tenant_id: UUID) -> asyncpg.Record | None:
    return await connection.fetchrow(
        "SELECT id, name, settings, created_at, updated_at FROM tenants WHERE id = $1",
        tenant_id,
    )


async def replace_tenant_settings(
    connection: Connection, tenant_id: UUID, settings: dict[str, Any]
) -> asyncpg.Record:
    row = await connection.fetchrow(
        """UPDATE tenants SET settings = $2, updated_at = now() WHERE id = $1
           RETURNING id, name, settings, created_at, updated_at""",
        tenant_id,
        settings,
    )
    assert row is not None
    return row


async def record_audit(
    connection: Connection,
    tenant_id: UUID,
    kind: str,
    payload: dict[str, Any],
    *,
    actor_id: UUID | None = None,
    severity: str = "info",
) -> None:
    await connection.execute(
        """INSERT INTO audit_log (tenant_id, actor_id, event_kind, severity, payload)
           VALUES ($1, $2, $3, $4, $5)""",
        tenant_id,
        actor_id,
        kind,
        severity,
        mask_value(payload),
    )
