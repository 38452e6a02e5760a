"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from opsexec.store import migrate
from opsexec.store.database import schema_revision

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Database reachable and schema at the newest migration")
async def readyz(request: Request) -> JSONResponse:
    checks: dict[str, Any] = {}
    ready = True
    head = migrate.head_revision()
    try:
        async with request.app.state.db.pool.acquire(timeout=2) as connection:
            revision = await schema_revision(connection)
        checks["database"] = {"status": "ok"}
        at_head = revision == head
        checks["migrations"] = {
            "status": "ok" if at_head else "pending",
            "current": revision,
            "head": head,
        }
        ready = at_head
    except Exception as exc:  # readiness reports any failure instead of raising it
        checks["database"] = {"status": "unavailable", "error": type(exc).__name__}
        ready = False
    body = {"status": "ready" if ready else "not_ready", "checks": checks}
    return JSONResponse(body, status_code=200 if ready else 503)
