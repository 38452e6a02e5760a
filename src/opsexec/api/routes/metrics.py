"""``/metrics``: Prometheus text exposition of this app's registry (R-OBS).

Unauthenticated, like ``/healthz``: scrapers rarely carry API keys, and the numbers say
nothing about any tenant. Keep it on the internal network (see docs/operations.md).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
async def prometheus_metrics(request: Request) -> Response:
    """Counters and histograms of this process, and gauges read from the database now."""
    database = getattr(request.app.state, "db", None)
    await request.app.state.metrics_gauges.refresh(database.pool if database else None)
    body = generate_latest(request.app.state.metrics_registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
