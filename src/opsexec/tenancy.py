"""Per-tenant settings (R-ROLL, R-APPR, R-IDEM-2). Pure: validated on write, read per request."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from opsexec.safety.rbac import unknown_roles


class AutoApprovalPolicy(BaseModel):
    """Members of ``roles`` get their own submissions approved up to ``max_level``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    roles: list[str] = Field(min_length=1)
    max_level: int = Field(ge=0, le=3)

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, roles: list[str]) -> list[str]:
        if bad := unknown_roles(roles):
            raise ValueError(f"unknown roles: {', '.join(bad)}")
        return roles


class TenantSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Off: new submissions get 503.")
    record_only: bool = Field(default=False, description="Record everything, run nothing.")
    max_approval_level: int = Field(
        default=3, ge=0, le=3, description="Plans above this level are refused."
    )
    min_approval_level: int = Field(
        default=0, ge=0, le=3, description="Every plan needs at least this level."
    )
    approval_expiry_s: int = Field(
        default=86_400, gt=0, description="Pending approvals expire after this long."
    )
    replay_window_derived_s: int = Field(
        default=900, ge=0, description="Repeat of a succeeded plan returns it for this long."
    )
    replay_window_client_s: int = Field(
        default=86_400, ge=0, description="Same, for a client-supplied Idempotency-Key."
    )
    auto_approval: list[AutoApprovalPolicy] = Field(default_factory=list)

    @classmethod
    def from_stored(cls, stored: dict[str, Any] | None) -> TenantSettings:
        return cls.model_validate(stored or {})
