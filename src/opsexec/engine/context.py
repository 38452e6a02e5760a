"""What the engine hands a running action: its target, transport, secrets and inventory.

Everything an action can reach goes through ``StepContext``, so the engine scopes it to
the tenant, bounds it by the step timeout, and registers every secret it resolves for
redaction until the step's output has been masked and stored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID

import asyncpg

from opsexec.actions.registry import AssetInfo
from opsexec.actions.transports.base import Transport
from opsexec.actions.transports.local import LocalTransport
from opsexec.actions.transports.ssh import SshTransport
from opsexec.errors import TransportUnavailableError
from opsexec.safety.masking import register_secret, unregister_secret
from opsexec.store import inventory as inventory_store

logger = logging.getLogger("opsexec.engine")


class SecretResolver(Protocol):
    """Fetches a named secret of a tenant just in time (see ``safety/secrets.py``)."""

    async def resolve(self, tenant_id: UUID, name: str) -> Any: ...


def asset_info(row: asyncpg.Record) -> AssetInfo:
    return AssetInfo(
        id=row["id"],
        name=row["name"],
        address=row["address"],
        transport=row["transport"],
        environment=row["environment"],
        port=row["port"],
        tags=tuple(row["tags"]),
        credential_ref=row["credential_ref"],
    )


@dataclass
class TenantInventory:
    """The ``InventoryReader`` of one tenant: actions never see another tenant's assets."""

    pool: asyncpg.Pool
    tenant_id: UUID

    async def list_assets(
        self, *, tags: Sequence[str] = (), environment: str | None = None
    ) -> list[AssetInfo]:
        async with self.pool.acquire() as connection:
            rows = await inventory_store.list_assets(
                connection, self.tenant_id, environment=environment
            )
        wanted = set(tags)
        return [asset_info(r) for r in rows if wanted <= set(r["tags"])]


@dataclass
class StepContext:
    """One invocation's window on the world (implements ``ActionContext``)."""

    pool: asyncpg.Pool
    secrets: SecretResolver
    execution_id: UUID
    tenant_id: UUID
    step_number: int
    attempt: int
    asset: AssetInfo | None
    timeout_s: float
    request_id: str | None
    cancel_flag: Callable[[], bool]
    logger: logging.Logger | logging.LoggerAdapter[Any] = logger
    _secret_values: list[str] = field(default_factory=list)
    _transport: Transport | None = None

    @property
    def inventory(self) -> TenantInventory:
        return TenantInventory(self.pool, self.tenant_id)

    def cancel_requested(self) -> bool:
        return self.cancel_flag()

    async def resolve_secret(self, name: str) -> str:
        resolved = await self.secrets.resolve(self.tenant_id, name)
        value = str(resolved.value)
        if register_secret(value):
            self._secret_values.append(value)
        return value

    async def transport(self) -> Transport:
        if self._transport is None:
            self._transport = await self._open_transport()
        return self._transport

    async def _open_transport(self) -> Transport:
        asset = self.asset
        if asset is None or asset.transport == "local":
            return LocalTransport()
        if asset.transport != "ssh":
            raise TransportUnavailableError(
                f"asset {asset.name} uses the {asset.transport} transport, "
                "which this opsexec does not provide"
            )
        password = private_key = None
        username = "root"
        if asset.credential_ref:
            credential = await self.secrets.resolve(self.tenant_id, asset.credential_ref)
            value = str(credential.value)
            if register_secret(value):
                self._secret_values.append(value)
            username = credential.username or username
            if credential.kind == "ssh_key":
                private_key = value
            else:
                password = value
        async with self.pool.acquire() as connection:
            pinned = await connection.fetchval(
                "SELECT host_key FROM assets WHERE id = $1 AND tenant_id = $2",
                asset.id,
                self.tenant_id,
            )
        return SshTransport(
            asset.address,
            asset.port or 22,
            username,
            password=password,
            private_key=private_key,
            pinned_host_key=pinned,
        )

    async def close(self) -> None:
        """Pin a first-seen host key, close the transport, and forget resolved secrets."""
        transport, self._transport = self._transport, None
        try:
            if isinstance(transport, SshTransport) and transport.observed_host_key:
                assert self.asset is not None
                assert self.asset.id is not None
                async with self.pool.acquire() as connection:
                    await inventory_store.pin_host_key(
                        connection, self.tenant_id, self.asset.id, transport.observed_host_key
                    )
            if transport is not None:
                await transport.close()
        finally:
            for value in self._secret_values:
                unregister_secret(value)
            self._secret_values.clear()
