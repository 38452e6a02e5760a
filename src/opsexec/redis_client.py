"""Redis clients that fail fast: opsexec treats Redis as optional, never as a dependency.

Every user (the event-bus relay and its subscribers, worker signals, ``/readyz``) has a
PostgreSQL path to fall back to, so a Redis failure must surface at once instead of
being retried inside the client while announcements pile up.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit


def fail_fast_redis(url: str, *, timeout_s: float = 5.0, connect_timeout_s: float = 2.0) -> Any:
    """An asyncio Redis client with no retries, short timeouts and decoded strings."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Redis.from_url(
        url,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


def redis_endpoint(url: str) -> str:
    """The Redis server and database of a URL, without credentials (names relay locks)."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"
