"""Redis clients that fail fast: opsexec treats Redis as optional, never as a dependency.

Every user (the event-bus relay and its subscribers, worker signals, ``/readyz``) has a
PostgreSQL path to fall back to, so a Redis failure must surface at once instead of
being retried inside the client while announcements pile up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

RELAY_STALE_S: Final = 3.0
"""No relay heartbeat (sent every second) for this long: the Redis path counts as down."""


@dataclass
class RelayLink:
    """What a follower of the Redis relay knows: is its subscription up, and when did the
    relay last speak. Followers use Redis only while it is healthy, LISTEN otherwise."""

    subscribed: bool = False
    heard_at: float = 0.0

    def healthy(self) -> bool:
        return self.subscribed and time.monotonic() - self.heard_at < RELAY_STALE_S


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


async def follow_channel(
    url: str,
    channel: str,
    on_message: Callable[[str], None],
    *,
    link: RelayLink,
    on_down: Callable[[], Awaitable[None]],
    stopped: asyncio.Event,
    logger: logging.Logger,
    fallback: str,
) -> None:
    """Hear ``channel`` until ``stopped``, whatever Redis does.

    ``link`` records the subscription and every message heard; ``on_message`` gets each
    message, and ``on_down`` (the caller's fallback to PostgreSQL) runs on any failure,
    which is logged once per outage as
    "Redis unavailable; {fallback}" and retried with a backoff capped at 5 s.
    """
    from redis.exceptions import RedisError

    backoff = 0.5
    warned = False
    while not stopped.is_set():
        client = fail_fast_redis(url)
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(channel)
            link.subscribed = True
            backoff, warned = 0.5, False
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None and message.get("type") == "message":
                    link.heard_at = time.monotonic()
                    on_message(message["data"])
        except (RedisError, OSError, TimeoutError) as exc:
            if not warned:  # once per outage, not once per retry
                logger.warning(
                    "Redis unavailable; %s", fallback, extra={"error": type(exc).__name__}
                )
                warned = True
            link.subscribed = False
            await on_down()
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            with contextlib.suppress(Exception):
                await client.aclose()
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 5.0)
