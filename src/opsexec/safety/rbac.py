"""Roles and permissions (R-RBAC). Pure: the engine and the API both ask these questions."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Permission(StrEnum):
    ASSET_READ = "asset:read"
    AUTOMATION_EXECUTE = "automation:execute"
    AUTOMATION_DEPLOY = "automation:deploy"
    EXECUTION_READ = "execution:read"
    EXECUTION_CANCEL = "execution:cancel"
    EXECUTION_APPROVE = "execution:approve"
    ADMIN = "admin"


P = Permission

ROLE_PERMISSIONS: dict[str, frozenset[Permission]] = {
    "viewer": frozenset({P.ASSET_READ, P.EXECUTION_READ}),
    "operator": frozenset(
        {P.ASSET_READ, P.EXECUTION_READ, P.AUTOMATION_EXECUTE, P.EXECUTION_CANCEL}
    ),
    "deployer": frozenset(
        {
            P.ASSET_READ,
            P.EXECUTION_READ,
            P.AUTOMATION_EXECUTE,
            P.AUTOMATION_DEPLOY,
            P.EXECUTION_CANCEL,
        }
    ),
    "approver": frozenset({P.ASSET_READ, P.EXECUTION_READ, P.EXECUTION_APPROVE}),
    "senior_approver": frozenset({P.ASSET_READ, P.EXECUTION_READ, P.EXECUTION_APPROVE}),
    "admin": frozenset(Permission),
}

KNOWN_ROLES = frozenset(ROLE_PERMISSIONS)


def permissions_for(roles: Iterable[str]) -> frozenset[Permission]:
    granted: set[Permission] = set()
    for role in roles:
        granted |= ROLE_PERMISSIONS.get(role, frozenset())
    return frozenset(granted)


def has_permission(roles: Iterable[str], permission: Permission | str) -> bool:
    return Permission(permission) in permissions_for(roles)


def unknown_roles(roles: Iterable[str]) -> list[str]:
    return sorted(set(roles) - KNOWN_ROLES)
