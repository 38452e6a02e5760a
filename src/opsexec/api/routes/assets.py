"""The tenant's inventory: assets that plans name as targets."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

import asyncpg
from fastapi import APIRouter, Body, Depends, Request, status
from pydantic import BaseModel, ConfigDict, TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from opsexec.api.auth import Principal, require
from opsexec.engine.inventory import AssetSpec
from opsexec.errors import ConflictError, NotFoundError, from_pydantic
from opsexec.observability import metrics
from opsexec.safety.rbac import Permission
from opsexec.store import inventory as store
from opsexec.store import transaction
from opsexec.store.identity import record_audit

router = APIRouter(prefix="/v1/assets", tags=["inventory"])
Reader = Annotated[Principal, Depends(require(Permission.ASSET_READ))]
Admin = Annotated[Principal, Depends(require(Permission.ADMIN))]
logger = logging.getLogger(__name__)


class AssetOut(AssetSpec):
    model_config = ConfigDict(extra="ignore")

    id: UUID
    host_key: str | None = None
    created_at: datetime
    updated_at: datetime


class AssetsWritten(BaseModel):
    created: int
    updated: int
    assets: list[AssetOut]


def _asset(row: Any) -> AssetOut:
    return AssetOut.model_validate({k: v for k, v in dict(row).items() if k != "tenant_id"})


async def _not_found(request: Request, principal: Principal, asset_id: UUID) -> NotFoundError:
    """Absent and foreign look the same to the caller; a foreign probe is recorded."""
    async with transaction(request.app.state.db.pool) as connection:
        owner = await store.asset_tenant(connection, asset_id)
        if owner is not None and owner != principal.tenant_id:
            await record_audit(
                connection,
                principal.tenant_id,
                "rbac_violation",
                {"resource": "asset", "id": str(asset_id), "principal": principal.principal},
                actor_id=principal.user_id,
                severity="critical",
            )
            metrics.rbac_violation("api")
            logger.warning(
                "rbac_violation: foreign asset requested",
                extra={"tenant_id": str(principal.tenant_id), "asset_id": str(asset_id)},
            )
    return NotFoundError(f"asset {asset_id} not found")


@router.get("", response_model=list[AssetOut])
async def list_assets(
    request: Request,
    principal: Reader,
    environment: str | None = None,
    tag: str | None = None,
) -> list[AssetOut]:
    async with request.app.state.db.pool.acquire() as connection:
        rows = await store.list_assets(
            connection, principal.tenant_id, environment=environment, tag=tag
        )
    return [_asset(r) for r in rows]


_ASSET_LIST = TypeAdapter(list[AssetSpec])
_EXAMPLE_ASSET = {
    "name": "web-01",
    "address": "10.0.1.11",
    "transport": "ssh",
    "port": 22,
    "environment": "staging",
    "tags": ["linux", "nginx"],
    "credential_ref": "ssh-deploy",
}


@router.post(
    "",
    response_model=AssetsWritten,
    status_code=status.HTTP_201_CREATED,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "oneOf": [
                            {"$ref": "#/components/schemas/AssetSpec"},
                            {"type": "array", "items": {"$ref": "#/components/schemas/AssetSpec"}},
                        ]
                    },
                    "example": [_EXAMPLE_ASSET],
                }
            },
        }
    },
)
async def upsert_assets(
    request: Request, principal: Admin, body: Annotated[Any, Body(include_in_schema=False)]
) -> AssetsWritten:
    """Create or replace one asset or a list of them, matched by name."""
    try:
        if isinstance(body, list):
            specs = _ASSET_LIST.validate_python(body)
        else:
            specs = [AssetSpec.model_validate(body)]
    except PydanticValidationError as exc:
        raise from_pydantic(exc) from None
    async with transaction(request.app.state.db.pool) as connection:
        rows = await store.upsert_assets(
            connection, principal.tenant_id, [s.model_dump() for s in specs]
        )
    created = sum(1 for r in rows if r["created"])
    return AssetsWritten(
        created=created, updated=len(rows) - created, assets=[_asset(r) for r in rows]
    )


@router.get("/{asset_id}", response_model=AssetOut)
async def get_asset(asset_id: UUID, request: Request, principal: Reader) -> AssetOut:
    async with request.app.state.db.pool.acquire() as connection:
        row = await store.get_asset(connection, principal.tenant_id, asset_id)
    if row is None:
        raise await _not_found(request, principal, asset_id)
    return _asset(row)


@router.put("/{asset_id}", response_model=AssetOut)
async def replace_asset(
    asset_id: UUID, spec: AssetSpec, request: Request, principal: Admin
) -> AssetOut:
    try:
        async with transaction(request.app.state.db.pool) as connection:
            row = await store.replace_asset(
                connection, principal.tenant_id, asset_id, spec.model_dump()
            )
    except asyncpg.UniqueViolationError:
        raise ConflictError(f"another asset is named {spec.name}", pointer="/name") from None
    if row is None:
        raise await _not_found(request, principal, asset_id)
    return _asset(row)


@router.delete("/{asset_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_asset(asset_id: UUID, request: Request, principal: Admin) -> None:
    async with transaction(request.app.state.db.pool) as connection:
        deleted = await store.delete_asset(connection, principal.tenant_id, asset_id)
    if not deleted:
        raise await _not_found(request, principal, asset_id)
