"""Who is calling: ``Authorization: Bearer <api key>`` → a ``Principal``, and permission checks."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request

from opsexec.engine.actor import Actor
from opsexec.errors import AuthenticationError, PermissionDeniedError
from opsexec.safety.rbac import Permission
from opsexec.store.identity import find_key_owner
from opsexec.tenancy import TenantSettings

logger = logging.getLogger(__name__)


Principal = Actor


def _bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("send an API key as 'Authorization: Bearer <key>'")
    return token.strip()


def _client_ip(request: Request) -> str | None:
    host = request.client.host if request.client else None
    try:
        return str(ipaddress.ip_address(host)) if host else None
    except ValueError:  # test clients report names such as "testclient"
        return None


async def authenticate(request: Request) -> Principal:
    token = _bearer_token(request)
    async with request.app.state.db.pool.acquire() as connection:
        owner = await find_key_owner(connection, token)
    if owner is None:
        raise AuthenticationError("the API key is unknown, revoked, or its user is disabled")
    return Principal(
        tenant_id=owner.tenant_id,
        tenant_name=owner.tenant_name,
        tenant_settings=TenantSettings.from_stored(owner.tenant_settings),
        user_id=owner.user_id,
        principal=owner.principal,
        roles=owner.roles,
        auth_method="api_key",
        source_ip=_client_ip(request),
        request_id=request.headers.get("x-request-id"),
    )


CurrentPrincipal = Annotated[Principal, Depends(authenticate)]


def require(permission: Permission) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency that admits only principals holding ``permission``."""

    async def dependency(principal: CurrentPrincipal) -> Principal:
        if not principal.can(permission):
            raise PermissionDeniedError(
                f"{principal.principal} lacks the {permission.value} permission",
                extra={"permission": permission.value},
            )
        return principal

    return dependency
