"""SQL for the ``credentials`` table: encrypted values in, metadata out.

This module stores and returns ciphertext; it never sees a plaintext value and never
encrypts or decrypts (that is ``safety/secrets.py``), so nothing here can leak one.
Metadata queries never select ``nonce`` or ``ciphertext``: the columns a listing returns
cannot carry what a listing must not show.

Every query is scoped to one tenant, except the two that key rotation needs
(:func:`count_credentials_by_key`, :func:`lock_credentials_not_under_key`) and the
re-encryption write (:func:`update_credential_encryption`): rotation re-encrypts every
tenant's rows under the new master key, and each row keeps its own ``tenant_id``, which
the ciphertext is bound to.
"""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

import asyncpg

from opsexec.store import Connection

__all__ = [
    "METADATA_COLUMNS",
    "ReEncryptedRow",
    "count_credentials_by_key",
    "delete_credential",
    "get_credential",
    "get_credential_metadata",
    "list_credentials",
    "lock_credentials_not_under_key",
    "update_credential_encryption",
    "upsert_credential",
]

METADATA_COLUMNS = "id, tenant_id, name, kind, username, key_id, created_at, updated_at"
"""What may leave the store for display: everything except ``nonce`` and ``ciphertext``."""

ReEncryptedRow = tuple[UUID, bytes, bytes, str]
"""``(id, nonce, ciphertext, key_id)`` of one row re-encrypted by key rotation."""


async def upsert_credential(
    connection: Connection,
    tenant_id: UUID,
    *,
    name: str,
    kind: str,
    username: str | None,
    nonce: bytes,
    ciphertext: bytes,
    key_id: str,
) -> tuple[asyncpg.Record, bool]:
    """Create the credential, or replace kind, username and value of the one so named.

    Returns its metadata and whether it was created. ``xmax = 0`` holds only for a row
    this statement inserted, which tells the two cases apart in one round trip.
    """
    row = await connection.fetchrow(
        f"""INSERT INTO credentials (tenant_id, name, kind, username, nonce, ciphertext, key_id)
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            ON CONFLICT (tenant_id, name) DO UPDATE
               SET kind = EXCLUDED.kind,
                   username = EXCLUDED.username,
                   nonce = EXCLUDED.nonce,
                   ciphertext = EXCLUDED.ciphertext,
                   key_id = EXCLUDED.key_id,
                   updated_at = now()
            RETURNING {METADATA_COLUMNS}, (xmax = 0) AS created""",
        tenant_id,
        name,
        kind,
        username,
        nonce,
        ciphertext,
        key_id,
    )
    assert row is not None
    return row, bool(row["created"])


async def get_credential(
    connection: Connection, tenant_id: UUID, name: str
) -> asyncpg.Record | None:
    """The full row, ciphertext included: only the secret backend should call this."""
    return await connection.fetchrow(
        f"""SELECT {METADATA_COLUMNS}, nonce, ciphertext
              FROM credentials
             WHERE tenant_id = $1 AND name = $2""",
        tenant_id,
        name,
    )


async def get_credential_metadata(
    connection: Connection, tenant_id: UUID, name: str
) -> asyncpg.Record | None:
    return await connection.fetchrow(
        f"SELECT {METADATA_COLUMNS} FROM credentials WHERE tenant_id = $1 AND name = $2",
        tenant_id,
        name,
    )


async def list_credentials(connection: Connection, tenant_id: UUID) -> list[asyncpg.Record]:
    return await connection.fetch(
        f"SELECT {METADATA_COLUMNS} FROM credentials WHERE tenant_id = $1 ORDER BY name",
        tenant_id,
    )


async def delete_credential(
    connection: Connection, tenant_id: UUID, name: str
) -> asyncpg.Record | None:
    """Delete and return the deleted row's metadata (for the audit record), or None."""
    return await connection.fetchrow(
        f"""DELETE FROM credentials WHERE tenant_id = $1 AND name = $2
            RETURNING {METADATA_COLUMNS}""",
        tenant_id,
        name,
    )


async def count_credentials_by_key(connection: Connection) -> dict[str, int]:
    """How many rows each master key id encrypted, over all tenants (rotation pre-check)."""
    rows = await connection.fetch(
        "SELECT key_id, count(*) AS n FROM credentials GROUP BY key_id ORDER BY key_id"
    )
    return {row["key_id"]: int(row["n"]) for row in rows}


async def lock_credentials_not_under_key(
    connection: Connection, key_id: str, limit: int
) -> list[asyncpg.Record]:
    """Up to ``limit`` rows of any tenant not yet under ``key_id``, locked for update.

    Call inside a transaction. The lock makes a concurrent replace through the API wait
    until this batch commits, so rotation never overwrites a newer value with an older one.
    """
    return await connection.fetch(
        """SELECT id, tenant_id, name, kind, nonce, ciphertext, key_id
             FROM credentials
            WHERE key_id <> $1
            ORDER BY id
            LIMIT $2
              FOR UPDATE""",
        key_id,
        limit,
    )


async def update_credential_encryption(
    connection: Connection, rows: Sequence[ReEncryptedRow]
) -> None:
    """Store re-encrypted values; ``updated_at`` stays, as the value itself did not change."""
    await connection.executemany(
        "UPDATE credentials SET nonce = $2, ciphertext = $3, key_id = $4 WHERE id = $1",
        rows,
    )
