"""Persistence: the asyncpg pool and transaction helper. All SQL lives in this package."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    # What store functions accept: a plain connection or one borrowed from the pool.
    Connection: TypeAlias = (
        "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
    )
else:
    Connection = asyncpg.Connection
Pool = asyncpg.Pool


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


async def _init_connection(connection: asyncpg.Connection) -> None:
    # JSON and JSONB columns travel as Python objects everywhere in opsexec.
    for type_name in ("json", "jsonb"):
        await connection.set_type_codec(
            type_name, schema="pg_catalog", encoder=_dumps, decoder=json.loads
        )


async def connect(dsn: str) -> asyncpg.Connection:
    """A standalone connection with opsexec's codecs (LISTEN, migrations checks, tests)."""
    connection = await asyncpg.connect(dsn)
    await _init_connection(connection)
    return connection


class _PooledConnection(asyncpg.Connection):
    """A pooled connection whose return to the pool costs no extra round trip.

    opsexec keeps no session state on pooled connections — LISTEN runs on dedicated
    connections, advisory locks are transaction-scoped, settings are ``SET LOCAL`` — so
    asyncpg's reset query (unlock all, close cursors, unlisten, reset settings) would only
    add a round trip to every request; measured in ``bench/locks.py``. An open
    transaction is still rolled back: asyncpg does that regardless of the query.
    """

    def get_reset_query(self) -> str:
        return ""


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 20) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        connection_class=_PooledConnection,
    )
    assert pool is not None
    return pool


@asynccontextmanager
async def transaction(pool: asyncpg.Pool) -> AsyncIterator[Connection]:
    """One connection, one transaction: commit on success, roll back on any exception."""
    async with pool.acquire() as connection, connection.transaction():
        yield connection
