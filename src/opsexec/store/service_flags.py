"""SQL for service-wide flags (``service_flags``): switches every process reads.

Only the runtime kill switch lives here today. A flag is a JSON value under a name, so a
new switch needs no migration.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg

from opsexec.store import Connection

KILL_SWITCH = "kill_switch"


async def get_flag(connection: Connection, name: str) -> asyncpg.Record | None:
    return await connection.fetchrow(
        "SELECT name, value, updated_at, updated_by FROM service_flags WHERE name = $1", name
    )


async def set_flag(
    connection: Connection, name: str, value: dict[str, Any], updated_by: UUID | None
) -> asyncpg.Record:
    row = await connection.fetchrow(
        """INSERT INTO service_flags (name, value, updated_by) VALUES ($1, $2, $3)
           ON CONFLICT (name) DO UPDATE
           SET value = EXCLUDED.value, updated_by = EXCLUDED.updated_by, updated_at = now()
           RETURNING name, value, updated_at, updated_by""",
        name,
        value,
        updated_by,
    )
    assert row is not None
    return row
