"""SQL for assets, the tenant's inventory of targets."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any
from uuid import UUID

import asyncpg

from opsexec.store import Connection

ASSET_COLUMNS = """id, tenant_id, name, address, transport, port, environment, tags,
    credential_ref, host_key, metadata, created_at, updated_at"""

UPSERT_ASSET = f"""
INSERT INTO assets (tenant_id, name, address, transport, port, environment, tags,
                    credential_ref, metadata)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (tenant_id, name) DO UPDATE SET
    address = EXCLUDED.address,
    transport = EXCLUDED.transport,
    port = EXCLUDED.port,
    environment = EXCLUDED.environment,
    tags = EXCLUDED.tags,
    credential_ref = EXCLUDED.credential_ref,
    metadata = EXCLUDED.metadata,
    -- A new address is a new machine: its pinned host key no longer applies.
    host_key = CASE WHEN assets.address = EXCLUDED.address AND assets.port
                         IS NOT DISTINCT FROM EXCLUDED.port
                    THEN assets.host_key END,
    updated_at = now()
RETURNING {ASSET_COLUMNS}, (xmax = 0) AS created
"""


async def upsert_assets(
    connection: Connection, tenant_id: UUID, assets: Sequence[Mapping[str, Any]]
) -> list[asyncpg.Record]:
    """Create or replace assets by name; each row says whether it was ``created``."""
    rows: list[asyncpg.Record] = []
    for asset in assets:
        row = await connection.fetchrow(
            UPSERT_ASSET,
            tenant_id,
            asset["name"],
            asset["address"],
            asset["transport"],
            asset.get("port"),
            asset["environment"],
            list(asset.get("tags") or []),
            asset.get("credential_ref"),
            dict(asset.get("metadata") or {}),
        )
        assert row is not None
        rows.append(row)
    return rows


async def list_assets(
    connection: Connection,
    tenant_id: UUID,
    *,
    environment: str | None = None,
    tag: str | None = None,
) -> list[asyncpg.Record]:
    return await connection.fetch(
        f"""SELECT {ASSET_COLUMNS} FROM assets
            WHERE tenant_id = $1
              AND ($2::text IS NULL OR environment = $2)
              AND ($3::text IS NULL OR $3 = ANY (tags))
            ORDER BY name""",
        tenant_id,
        environment,
        tag,
    )


async def get_asset(
    connection: Connection, tenant_id: UUID, asset_id: UUID
) -> asyncpg.Record | None:
    return await connection.fetchrow(
        f"SELECT {ASSET_COLUMNS} FROM assets WHERE id = $1 AND tenant_id = $2",
        asset_id,
        tenant_id,
    )


async def asset_tenant(connection: Connection, asset_id: UUID) -> UUID | None:
    """Which tenant owns an asset — only to record a cross-tenant probe, never to serve it."""
    tenant_id: UUID | None = await connection.fetchval(
        "SELECT tenant_id FROM assets WHERE id = $1", asset_id
    )
    return tenant_id


async def assets_by_name(
    connection: Connection, tenant_id: UUID, names: Collection[str]
) -> dict[str, asyncpg.Record]:
    rows = await connection.fetch(
        f"SELECT {ASSET_COLUMNS} FROM assets WHERE tenant_id = $1 AND name = ANY ($2::text[])",
        tenant_id,
        list(names),
    )
    return {row["name"]: row for row in rows}


async def delete_asset(connection: Connection, tenant_id: UUID, asset_id: UUID) -> bool:
    deleted = await connection.fetchval(
        "DELETE FROM assets WHERE id = $1 AND tenant_id = $2 RETURNING id", asset_id, tenant_id
    )
    return deleted is not None


async def pin_host_key(
    connection: Connection, tenant_id: UUID, asset_id: UUID, host_key: str
) -> None:
    """Trust on first use: record the key only if none is pinned yet."""
    await connection.execute(
        """UPDATE assets SET host_key = $3, updated_at = now()
           WHERE id = $1 AND tenant_id = $2 AND host_key IS NULL""",
        asset_id,
        tenant_id,
        host_key,
    )


async def replace_asset(
    connection: Connection, tenant_id: UUID, asset_id: UUID, asset: Mapping[str, Any]
) -> asyncpg.Record | None:
    return await connection.fetchrow(
        f"""UPDATE assets SET name = $3, address = $4::varchar, transport = $5,
                port = $6::int, environment = $7, tags = $8, credential_ref = $9,
                metadata = $10,
                host_key = CASE WHEN address = $4::varchar AND port IS NOT DISTINCT FROM $6::int
                                THEN host_key END,
                updated_at = now()
            WHERE id = $1 AND tenant_id = $2
            RETURNING {ASSET_COLUMNS}""",
        asset_id,
        tenant_id,
        asset["name"],
        asset["address"],
        asset["transport"],
        asset.get("port"),
        asset["environment"],
        list(asset.get("tags") or []),
        asset.get("credential_ref"),
        dict(asset.get("metadata") or {}),
    )
