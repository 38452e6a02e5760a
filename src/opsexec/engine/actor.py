"""Who is acting: the authenticated caller as the engine sees it (API, CLI or worker)."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from opsexec.safety.rbac import Permission, has_permission
from opsexec.tenancy import TenantSettings


@dataclass(frozen=True, slots=True)
class Actor:
    """A person acting through opsexec, with what approvals and audit records keep."""

    tenant_id: UUID
    tenant_name: str
    tenant_settings: TenantSettings
    user_id: UUID
    principal: str
    roles: tuple[str, ...]
    auth_method: str
    source_ip: str | None = None
    request_id: str | None = None

    def can(self, permission: Permission | str) -> bool:
        return has_permission(self.roles, permission)
