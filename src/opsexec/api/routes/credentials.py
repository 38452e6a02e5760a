"""Stored credentials (administrators only). Values are write-only.

``POST`` takes a value and answers with metadata; nothing reads a value back over HTTP.
A value is encrypted before it reaches the database (``safety/secrets.py``) and is
resolved only by the engine, just before a step that references it runs.

``POST`` on a name that exists **replaces** it (200; 201 when created): rotating a
password is the common reason to write a credential again, and the replace is audited
as ``credential_replaced`` so it is not silent. The request model is a ``SecretStr`` so
the value does not appear in a ``repr`` of the request, and validation errors carry only
a message and a pointer (``api/problems.py``), never the input.

The master key and the secret backend are taken from ``app.state.secret_master_key`` /
``app.state.secret_backend`` when the lifespan put them there; otherwise they are built
on first use from ``app.state.settings`` and ``app.state.db.pool`` and cached on
``app.state`` (:func:`secret_services`).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, FastAPI, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from opsexec.api.auth import Principal, require
from opsexec.errors import NotFoundError
from opsexec.plan import SECRET_NAME_PATTERN
from opsexec.safety.masking import MIN_SECRET_LENGTH
from opsexec.safety.rbac import Permission
from opsexec.safety.secrets import (
    RESERVED_SCHEMES,
    CredentialKind,
    MasterKey,
    SecretBackend,
    default_secret_backend,
    load_master_key,
    save_credential,
)
from opsexec.store import secrets as store
from opsexec.store import transaction
from opsexec.store.identity import record_audit

router = APIRouter(prefix="/v1/credentials", tags=["credentials"])
Admin = Annotated[Principal, Depends(require(Permission.ADMIN))]
logger = logging.getLogger(__name__)

MAX_VALUE_BYTES = 64 * 1024
"""Room for an RSA-4096 private key with a certificate chain; more is not a credential."""


async def secret_services(app: FastAPI) -> tuple[MasterKey, SecretBackend]:
    """The app's master key and secret backend, built once and cached on ``app.state``.

    Loading may create the key file, which is blocking file I/O, so it runs in a thread.
    Two first requests racing here both load the same key: the key file is created
    atomically and exclusively.
    """
    state = app.state
    master_key: MasterKey | None = getattr(state, "secret_master_key", None)
    if master_key is None:
        master_key = await asyncio.to_thread(load_master_key, state.settings)
        state.secret_master_key = master_key
    backend: SecretBackend | None = getattr(state, "secret_backend", None)
    if backend is None:
        backend = default_secret_backend(state.db.pool, master_key)
        state.secret_backend = backend
    return master_key, backend


class CredentialIn(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    name: str = Field(
        min_length=1,
        max_length=255,
        pattern=SECRET_NAME_PATTERN,
        description='What plans reference as {"$secret": "<name>"}.',
        examples=["ssh-deploy"],
    )
    kind: CredentialKind
    value: SecretStr = Field(
        description=f"The secret itself: {MIN_SECRET_LENGTH} characters to "
        f"{MAX_VALUE_BYTES} bytes. Write-only: never returned, logged or stored unencrypted.",
    )
    username: str | None = Field(default=None, max_length=255)

    @field_validator("name")
    @classmethod
    def _not_a_backend_scheme(cls, name: str) -> str:
        scheme, colon, _ = name.partition(":")
        if colon and scheme in RESERVED_SCHEMES:
            raise ValueError(
                f"names starting with '{scheme}:' are resolved by the {scheme} backend; "
                "choose another name"
            )
        return name

    @field_validator("value")
    @classmethod
    def _redactable_and_bounded(cls, value: SecretStr) -> SecretStr:
        # Messages state the limits only; the value is never part of an error.
        text = value.get_secret_value()
        if len(text) < MIN_SECRET_LENGTH:
            raise ValueError(
                f"must be at least {MIN_SECRET_LENGTH} characters: a shorter value could "
                "not be redacted from output"
            )
        if len(text.encode("utf-8")) > MAX_VALUE_BYTES:
            raise ValueError(f"must be at most {MAX_VALUE_BYTES} bytes")
        return value


class CredentialOut(BaseModel):
    """Metadata only; ``key_id`` says which master key encrypted the value."""

    id: UUID
    name: str
    kind: CredentialKind
    username: str | None
    key_id: str
    created_at: datetime
    updated_at: datetime


def _credential(row: Any) -> CredentialOut:
    return CredentialOut.model_validate({k: v for k, v in dict(row).items() if k != "tenant_id"})


@router.post(
    "",
    response_model=CredentialOut,
    status_code=status.HTTP_201_CREATED,
    responses={status.HTTP_200_OK: {"model": CredentialOut, "description": "Replaced"}},
)
async def store_credential(
    body: CredentialIn, request: Request, response: Response, admin: Admin
) -> CredentialOut:
    """Create a credential (201), or replace the value, kind and username of one (200)."""
    master_key, _ = await secret_services(request.app)
    async with transaction(request.app.state.db.pool) as connection:
        row, created = await save_credential(
            connection,
            master_key,
            admin.tenant_id,
            name=body.name,
            kind=body.kind,
            value=body.value.get_secret_value(),
            username=body.username,
        )
        await record_audit(
            connection,
            admin.tenant_id,
            "credential_created" if created else "credential_replaced",
            {"name": body.name, "kind": body.kind},
            actor_id=admin.user_id,
        )
    if not created:
        response.status_code = status.HTTP_200_OK
    logger.info(
        "credential %s %s",
        body.name,
        "created" if created else "replaced",
        extra={"tenant_id": str(admin.tenant_id), "kind": body.kind},
    )
    return _credential(row)


@router.get("", response_model=list[CredentialOut])
async def list_credentials(request: Request, admin: Admin) -> list[CredentialOut]:
    async with request.app.state.db.pool.acquire() as connection:
        rows = await store.list_credentials(connection, admin.tenant_id)
    return [_credential(row) for row in rows]


# ``:path`` because names may contain "/" (``team/db-password``), as references may.
@router.get("/{name:path}", response_model=CredentialOut)
async def get_credential(name: str, request: Request, admin: Admin) -> CredentialOut:
    async with request.app.state.db.pool.acquire() as connection:
        row = await store.get_credential_metadata(connection, admin.tenant_id, name)
    if row is None:
        raise NotFoundError(f"credential {name!r} not found")
    return _credential(row)


@router.delete("/{name:path}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_credential(name: str, request: Request, admin: Admin) -> None:
    """Delete; a plan referencing the name fails at its next step with secret_not_found."""
    async with transaction(request.app.state.db.pool) as connection:
        row = await store.delete_credential(connection, admin.tenant_id, name)
        if row is None:
            raise NotFoundError(f"credential {name!r} not found")
        await record_audit(
            connection,
            admin.tenant_id,
            "credential_deleted",
            {"name": row["name"], "kind": row["kind"]},
            actor_id=admin.user_id,
        )
    logger.info("credential %s deleted", name, extra={"tenant_id": str(admin.tenant_id)})
