"""Users, API keys and tenant settings (administrators only)."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Request, status
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic import ValidationError as PydanticValidationError

from opsexec.api.auth import CurrentPrincipal, Principal, require
from opsexec.errors import ConflictError, NotFoundError, from_pydantic
from opsexec.observability import metrics
from opsexec.safety.rbac import Permission, unknown_roles
from opsexec.store import identity as store
from opsexec.store import transaction
from opsexec.tenancy import TenantSettings

router = APIRouter(prefix="/v1", tags=["administration"])
Admin = Annotated[Principal, Depends(require(Permission.ADMIN))]
logger = logging.getLogger(__name__)


def _roles(roles: list[str]) -> list[str]:
    if bad := unknown_roles(roles):
        raise ValueError(f"unknown roles: {', '.join(bad)}")
    return sorted(set(roles))


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    principal: str = Field(min_length=1, max_length=255, examples=["alice@example.com"])
    roles: list[str] = Field(examples=[["operator"]])
    _check_roles = field_validator("roles")(_roles)


class UserPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    roles: list[str] | None = None
    disabled: bool | None = None

    @field_validator("roles")
    @classmethod
    def _check_roles(cls, roles: list[str] | None) -> list[str] | None:
        return None if roles is None else _roles(roles)


class UserOut(BaseModel):
    id: UUID
    principal: str
    roles: list[str]
    disabled: bool
    created_at: datetime


class ApiKeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: UUID
    name: str | None = Field(default=None, max_length=100)


class ApiKeyCreated(BaseModel):
    id: UUID
    user_id: UUID
    api_key: str = Field(description="Shown once; only its digest is stored.")


class ApiKeyOut(BaseModel):
    id: UUID
    user_id: UUID
    key_prefix: str
    name: str | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def _user(row: Any) -> UserOut:
    return UserOut.model_validate(dict(row))


@router.post("/users", status_code=status.HTTP_201_CREATED, response_model=UserOut)
async def create_user(body: UserIn, request: Request, admin: Admin) -> UserOut:
    async with transaction(request.app.state.db.pool) as connection:
        row = await store.create_user(connection, admin.tenant_id, body.principal, body.roles)
        if row is None:
            raise ConflictError(f"user {body.principal} already exists", pointer="/principal")
        await store.record_audit(
            connection,
            admin.tenant_id,
            "user_created",
            {"user_id": str(row["id"]), "roles": body.roles},
            actor_id=admin.user_id,
        )
    return _user(row)


@router.get("/users", response_model=list[UserOut])
async def list_users(request: Request, admin: Admin) -> list[UserOut]:
    async with request.app.state.db.pool.acquire() as connection:
        return [_user(r) for r in await store.list_users(connection, admin.tenant_id)]


@router.patch("/users/{user_id}", response_model=UserOut)
async def update_user(user_id: UUID, body: UserPatch, request: Request, admin: Admin) -> UserOut:
    async with transaction(request.app.state.db.pool) as connection:
        row = await store.update_user(
            connection, admin.tenant_id, user_id, roles=body.roles, disabled=body.disabled
        )
        if row is None:
            raise NotFoundError(f"user {user_id} not found")
        await store.record_audit(
            connection,
            admin.tenant_id,
            "user_updated",
            {"user_id": str(user_id), **body.model_dump(exclude_none=True)},
            actor_id=admin.user_id,
        )
    return _user(row)


@router.post("/api-keys", status_code=status.HTTP_201_CREATED, response_model=ApiKeyCreated)
async def create_api_key(body: ApiKeyIn, request: Request, admin: Admin) -> ApiKeyCreated:
    async with transaction(request.app.state.db.pool) as connection:
        if await store.get_user(connection, admin.tenant_id, body.user_id) is None:
            raise NotFoundError(f"user {body.user_id} not found", pointer="/user_id")
        key_id, api_key = await store.create_api_key(
            connection, admin.tenant_id, body.user_id, body.name
        )
        await store.record_audit(
            connection,
            admin.tenant_id,
            "api_key_created",
            {"key_id": str(key_id), "user_id": str(body.user_id)},
            actor_id=admin.user_id,
        )
    return ApiKeyCreated(id=key_id, user_id=body.user_id, api_key=api_key)


@router.get("/api-keys", response_model=list[ApiKeyOut])
async def list_api_keys(
    request: Request, admin: Admin, user_id: UUID | None = None
) -> list[ApiKeyOut]:
    async with request.app.state.db.pool.acquire() as connection:
        rows = await store.list_api_keys(connection, admin.tenant_id, user_id)
    return [ApiKeyOut.model_validate(dict(r)) for r in rows]


@router.delete("/api-keys/{key_id}", status_code=status.HTTP_204_NO_CONTENT)
async def revoke_api_key(key_id: UUID, request: Request, admin: Admin) -> None:
    async with transaction(request.app.state.db.pool) as connection:
        if not await store.revoke_api_key(connection, admin.tenant_id, key_id):
            raise NotFoundError(f"API key {key_id} not found")
        await store.record_audit(
            connection,
            admin.tenant_id,
            "api_key_revoked",
            {"key_id": str(key_id)},
            actor_id=admin.user_id,
        )


async def _own_tenant(request: Request, admin: Principal, tenant_id: UUID) -> None:
    """Another tenant's settings are invisible; the probe itself is recorded."""
    if tenant_id == admin.tenant_id:
        return
    async with transaction(request.app.state.db.pool) as connection:
        await store.record_audit(
            connection,
            admin.tenant_id,
            "rbac_violation",
            {"resource": "tenant", "id": str(tenant_id), "principal": admin.principal},
            actor_id=admin.user_id,
            severity="critical",
        )
    metrics.rbac_violation("api")
    logger.warning(
        "rbac_violation: foreign tenant settings requested",
        extra={"tenant_id": str(admin.tenant_id), "target_tenant": str(tenant_id)},
    )
    raise NotFoundError(f"tenant {tenant_id} not found")


class Me(BaseModel):
    user_id: UUID
    principal: str
    roles: list[str]
    permissions: list[str] = Field(description="What those roles allow, for clients to adapt.")
    tenant_id: UUID = Field(description="For /v1/tenants/{tenant_id}/settings.")
    tenant_name: str
    auth_method: str


@router.get("/me", response_model=Me)
async def me(principal: CurrentPrincipal) -> Me:
    """Who the caller's credentials say they are; any authenticated caller may ask."""
    return Me(
        user_id=principal.user_id,
        principal=principal.principal,
        roles=sorted(principal.roles),
        permissions=sorted(p.value for p in Permission if principal.can(p)),
        tenant_id=principal.tenant_id,
        tenant_name=principal.tenant_name,
        auth_method=principal.auth_method,
    )


@router.get("/tenants/{tenant_id}/settings", response_model=TenantSettings)
async def get_tenant_settings(tenant_id: UUID, request: Request, admin: Admin) -> TenantSettings:
    await _own_tenant(request, admin, tenant_id)
    async with request.app.state.db.pool.acquire() as connection:
        row = await store.get_tenant(connection, tenant_id)
    assert row is not None
    return TenantSettings.from_stored(row["settings"])


@router.patch("/tenants/{tenant_id}/settings", response_model=TenantSettings)
async def update_tenant_settings(
    tenant_id: UUID, changes: dict[str, Any], request: Request, admin: Admin
) -> TenantSettings:
    """Merge ``changes`` into the settings; the whole result is validated before saving."""
    await _own_tenant(request, admin, tenant_id)
    async with transaction(request.app.state.db.pool) as connection:
        row = await connection.fetchrow(
            "SELECT settings FROM tenants WHERE id = $1 FOR UPDATE", tenant_id
        )
        assert row is not None, "the caller's own tenant exists"
        before = TenantSettings.from_stored(row["settings"])
        try:
            after = TenantSettings.model_validate({**before.model_dump(), **changes})
        except PydanticValidationError as exc:
            raise from_pydantic(exc) from None
        await store.replace_tenant_settings(connection, tenant_id, after.model_dump())
        await store.record_audit(
            connection,
            tenant_id,
            "settings_changed",
            {"before": before.model_dump(), "after": after.model_dump()},
            actor_id=admin.user_id,
        )
    return after
