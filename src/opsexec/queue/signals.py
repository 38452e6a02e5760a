"""How a worker hears of new jobs, forced cancels and drain requests (R-QUEUE).

Every signal starts as a PostgreSQL NOTIFY queued in the transaction that made it true
(``store/channels.py``), so it exists only once committed. A worker hears it one of two
ways, and polls the queue regardless, so a lost signal costs latency, never work:

* **LISTEN** (no Redis, or whenever the Redis path is unhealthy): one dedicated
  connection per worker, reconnected when it breaks (a PostgreSQL failover, say).
* **Redis** (``OPSEXEC_REDIS_URL``): the event-bus relay of an API process
  (``progress/bus.py``) LISTENs to the same channels and republishes every signal on
  :data:`REDIS_SIGNALS_CHANNEL`, with a heartbeat every second. A worker subscribed there
  holds no PostgreSQL listener, so adding workers adds Redis subscribers rather than
  database connections. When Redis fails, or no relay heartbeat arrives for
  ``redis_client.RELAY_STALE_S`` (no API process is running, say), the worker LISTENs itself until
  both are back, and calls ``on_gap`` whenever it switches, since a signal sent during
  the switch may have reached neither path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

import asyncpg

from opsexec.redis_client import RelayLink, follow_channel
from opsexec.store import connect
from opsexec.store.channels import WORKER_SIGNAL_CHANNELS

logger = logging.getLogger("opsexec.worker")

REDIS_SIGNALS_CHANNEL: Final = "opsexec:signals"
"""Batches of ``[channel, payload]`` pairs as JSON; an empty batch is a relay heartbeat."""
TICK_S: Final = 1.0
LIVENESS_EVERY_S: Final = 5.0
"""How often an idle LISTEN connection is asked something: a dead peer can look open."""

Handler = Callable[[str], None]
Via = Literal["redis", "notify", "poll"]


def encode_signals(signals: list[tuple[str, str]]) -> str:
    return json.dumps(signals, separators=(",", ":"))


def decode_signals(text: str) -> list[tuple[str, str]]:
    """The ``(channel, payload)`` pairs of a message; anything malformed is dropped."""
    try:
        decoded = json.loads(text)
    except ValueError:
        return []
    if not isinstance(decoded, list):
        return []
    return [
        (item[0], item[1])
        for item in decoded
        if isinstance(item, list) and len(item) == 2 and all(isinstance(part, str) for part in item)
    ]


class WorkerSignals:
    """The worker's ear: ``handlers[channel](payload)`` for every signal heard."""

    def __init__(
        self,
        dsn: str,
        handlers: Mapping[str, Handler],
        *,
        redis_url: str | None = None,
        on_gap: Callable[[], None] = lambda: None,
    ) -> None:
        unknown = set(handlers) - set(WORKER_SIGNAL_CHANNELS)
        if unknown:
            raise ValueError(f"not worker signal channels: {sorted(unknown)}")
        self.dsn = dsn
        self.handlers = dict(handlers)
        self.redis_url = redis_url
        self.on_gap = on_gap
        self._listener: asyncpg.Connection | None = None
        self._relay_link = RelayLink()
        self._last_liveness = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self._tick_lock = asyncio.Lock()  # the supervisor and a Redis failure may both tick
        self._via: Via = "poll"

    @property
    def via(self) -> Via:
        """How signals reach this worker now (logged when it changes; used by tests)."""
        return self._via

    async def start(self) -> None:
        """Begin listening now (so nothing committed after this is missed), then supervise."""
        await self._tick()
        self._tasks.append(asyncio.create_task(self._supervise(), name="worker-signals"))
        if self.redis_url:
            self._tasks.append(asyncio.create_task(self._subscribe(), name="worker-signals-redis"))

    async def stop(self) -> None:
        self._stopped.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self._close_listener()

    # --- dispatch ----------------------------------------------------------------------------

    def _dispatch(self, channel: str, payload: str) -> None:
        handler = self.handlers.get(channel)
        if handler is None:
            return
        try:
            handler(payload)
        except Exception:  # one bad signal must not end the worker's hearing
            logger.exception("signal handler failed", extra={"channel": channel})

    def _on_notify(self, _connection: Any, _pid: int, channel: str, payload: object) -> None:
        self._dispatch(channel, str(payload))

    # --- supervision --------------------------------------------------------------------------

    async def _supervise(self) -> None:
        while not self._stopped.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), TICK_S)
            if self._stopped.is_set():
                return
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # the next tick tries again; polling covers the gap
                logger.exception("worker signal supervision failed")
                await self._close_listener()

    async def _tick(self) -> None:
        async with self._tick_lock:
            await self._choose_path()

    async def _choose_path(self) -> None:
        if self._relay_link.healthy():
            await self._close_listener()
            self._set_via("redis")
            return
        if await self._ensure_listener():
            self._set_via("notify")
        else:
            self._set_via("poll")

    def _set_via(self, via: Via) -> None:
        if via == self._via:
            return
        previous, self._via = self._via, via
        logger.info("worker signals", extra={"via": via, "was": previous})
        if via != "poll":
            self.on_gap()

    async def _ensure_listener(self) -> bool:
        listener = self._listener
        if listener is not None and not listener.is_closed():
            if time.monotonic() - self._last_liveness < LIVENESS_EVERY_S:
                return True
            try:
                await asyncio.wait_for(listener.fetchval("SELECT 1"), timeout=5)
                self._last_liveness = time.monotonic()
                return True
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                logger.warning("worker signal listener lost; reconnecting")
        await self._close_listener()
        try:
            listener = await asyncio.wait_for(connect(self.dsn), timeout=10)
            for channel in self.handlers:
                await listener.add_listener(channel, self._on_notify)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            logger.warning("worker signal listener cannot connect", extra={"error": repr(exc)})
            return False
        self._listener = listener
        self._last_liveness = time.monotonic()
        return True

    async def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.close(), timeout=5)

    # --- Redis --------------------------------------------------------------------------------

    async def _subscribe(self) -> None:
        """Hear the relay on Redis; on any failure fall back to LISTEN and retry with backoff."""
        assert self.redis_url is not None
        await follow_channel(
            self.redis_url,
            REDIS_SIGNALS_CHANNEL,
            self._on_redis_message,
            link=self._relay_link,
            on_down=self._redis_down,
            stopped=self._stopped,
            logger=logger,
            fallback="worker signals fall back to LISTEN",
        )

    async def _redis_down(self) -> None:
        with contextlib.suppress(Exception):
            await self._tick()  # fall back now, not at the next tick

    def _on_redis_message(self, data: str) -> None:
        for channel, payload in decode_signals(data):
            self._dispatch(channel, payload)
