"""Liveness and readiness.

``/readyz`` fails (503) only for what makes this process useless: no database, or a
schema behind the code. Redis (optional by design) and the worker fleet are reported as
``degraded`` without failing readiness — the API still accepts and runs immediate work
without them, and a load balancer that pulled every replica because a worker died would
turn a slow queue into an outage.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from opsexec.observability.heartbeat import stale_after_s
from opsexec.redis_client import fail_fast_redis
from opsexec.store import Connection, migrate
from opsexec.store import workers as worker_store
from opsexec.store.database import schema_revision

router = APIRouter(tags=["health"])

REDIS_TIMEOUT_S = 1.0
DATABASE_TIMEOUT_S = 2.0


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Database reachable and schema current; Redis and workers reported (not fatal)",
)
async def readyz(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    checks: dict[str, Any] = {}
    ready = True
    head = migrate.head_revision()
    try:
        async with request.app.state.db.pool.acquire(timeout=DATABASE_TIMEOUT_S) as connection:
            revision = await schema_revision(connection)
            checks["database"] = {"status": "ok"}
            checks["migrations"] = {
                "status": _migration_status(revision, head),
                "current": revision,
                "head": head,
            }
            # Newer code migrated the schema ahead (a rolling deploy): migrations only
            # add, so this process still works with it. Behind, it does not.
            ready = checks["migrations"]["status"] in ("ok", "ahead")
            if ready:
                checks["workers"] = await _workers(
                    connection, stale_after_s(settings.worker_heartbeat_s)
                )
    except Exception as exc:  # readiness reports any failure instead of raising it
        checks["database"] = {"status": "unavailable", "error": type(exc).__name__}
        ready = False
    if settings.redis_url:
        checks["redis"] = await _redis(settings.redis_url)
    degraded = sorted(name for name, check in checks.items() if check["status"] == "degraded")
    body = {
        "status": "ready" if ready else "not_ready",
        "degraded": degraded,
        "checks": checks,
    }
    return JSONResponse(body, status_code=200 if ready else 503)


def _migration_status(current: str | None, head: str) -> str:
    if current == head:
        return "ok"
    return "pending" if current is None or current in migrate.known_revisions() else "ahead"


async def _workers(connection: Connection, stale_after: float) -> dict[str, Any]:
    """Live workers by heartbeat; none at all means background work is not being run."""
    summary = await worker_store.summary(connection, fresh_within_s=stale_after)
    return {
        "status": "ok" if summary.running else "degraded",
        "running": summary.running,
        "draining": summary.draining,
        "stale": summary.stale,
        "newest_heartbeat_age_s": (
            round(summary.newest_age_s, 3) if summary.newest_age_s is not None else None
        ),
        "stale_after_s": stale_after,
    }


async def _redis(url: str) -> dict[str, Any]:
    """One PING with a short timeout and no retries: readiness must answer quickly."""
    client = fail_fast_redis(url, timeout_s=REDIS_TIMEOUT_S, connect_timeout_s=REDIS_TIMEOUT_S)
    try:
        await client.ping()
    except Exception as exc:  # any failure is "degraded": opsexec works without Redis
        return {
            "status": "degraded",
            "error": type(exc).__name__,
            "impact": "event fan-out and worker signals fall back to LISTEN/NOTIFY and polling",
        }
    finally:
        await client.aclose()
    return {"status": "ok"}
