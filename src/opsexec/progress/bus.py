"""The event bus of one API process: announcements in, shared per-execution feeds out.

Every event is a committed row first (``store.events.append_event``) and an announcement
second. An announcement carries ``<execution_id>:<seq>`` and nothing else — NOTIFY
payloads are capped near 8 KB and a row can be bigger — so whoever hears one reads the
rows. Announcements reach this process three ways:

* **PostgreSQL NOTIFY** (default). ``append_event`` queues ``pg_notify`` in the writer's
  transaction, so an announcement exists only for a committed row and only after the
  commit. The bus LISTENs on one dedicated connection, never a pooled one (a pooled
  connection is reset and shared; LISTEN is session state).
* **Redis pub/sub** (``OPSEXEC_REDIS_URL``). One process per database and Redis — the
  *relay*, elected with a session advisory lock held on its dedicated connection — LISTENs
  and republishes announcements to Redis, batched, after PostgreSQL delivered them (hence
  after commit), with a heartbeat every second. Every other process subscribes to Redis
  and does not LISTEN, so adding API replicas adds Redis subscribers, not PostgreSQL
  listeners. A process that loses Redis, or hears no relay heartbeat for a few seconds,
  LISTENs itself until both are back, and re-reads every watched execution when it
  switches so nothing announced in between is missed. The relay also republishes the
  workers' signals (new jobs, forced cancels, drain requests) on their own Redis channel,
  so workers need no PostgreSQL listener either (``queue/signals.py``).
* **Polling** (safety net, always). Every ``poll_interval_s`` one query finds the newest
  seq of every execution watched here. A lost announcement therefore delays an event by
  at most one poll interval; it never loses one.

Streams never read because of an announcement themselves: per watched execution one
:class:`_Feed` reads the new rows once and keeps the recent ones in memory, and every
stream of that execution in this process takes them from there. A hundred browsers on one
execution cost one query per batch of events, not a hundred. Within an execution ``seq``
order is commit order (``append_event`` serialises writers with an advisory lock), so
reading ``seq > last`` can never skip a row that commits later.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import asyncpg

from opsexec.queue.signals import REDIS_SIGNALS_CHANNEL, encode_signals
from opsexec.redis_client import RelayLink, fail_fast_redis, follow_channel, redis_endpoint
from opsexec.store import connect
from opsexec.store.channels import EVENTS_CHANNEL, WORKER_SIGNAL_CHANNELS
from opsexec.store.event_reads import events_after, last_seq, last_seqs

logger = logging.getLogger("opsexec.progress")

REDIS_CHANNEL = "opsexec:events"
RELAY_HEARTBEAT = "hb"
TICK_S = 1.0
"""How often the bus checks its connections, elects a relay and sends relay heartbeats."""
"""No relay heartbeat for this long: LISTEN on PostgreSQL directly until it is back."""
READ_PAGE = 500
OUTBOX_LIMIT = 50_000
"""Announcements the relay holds while Redis is slow; older ones are dropped (polls cover)."""
FEED_KEEP = 1000
"""Events a feed keeps in memory; a stream further behind reads the database itself."""

Announcements = Literal["redis", "notify", "poll"]


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One committed row of ``execution_events`` as streams deliver it."""

    seq: int
    execution_id: UUID
    step_id: UUID | None
    kind: str
    timestamp: datetime
    payload: dict[str, Any]

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> StoredEvent:
        return cls(
            seq=row["seq"],
            execution_id=row["execution_id"],
            step_id=row["step_id"],
            kind=row["event_kind"],
            timestamp=row["timestamp"],
            payload=row["payload"],
        )


def parse_announcements(text: str) -> list[tuple[UUID, int]]:
    """``<execution_id>:<seq>`` lines (one from NOTIFY, a batch from Redis); junk is skipped."""
    found: list[tuple[UUID, int]] = []
    for line in text.splitlines():
        execution_id, _, seq = line.partition(":")
        try:
            found.append((UUID(execution_id), int(seq)))
        except ValueError:
            continue
    return found


class _Feed:
    """The shared, in-memory tail of one execution's events in this process.

    Invariant: ``events`` holds every event of the execution with ``base < seq <= upto``,
    in seq order. A stream whose cursor is at or past ``base`` is served from memory.
    """

    def __init__(self, bus: EventBus, execution_id: UUID) -> None:
        self.bus = bus
        self.execution_id = execution_id
        self.watchers = 0
        self.ready = False
        self.base = 0
        self.upto = 0
        self.events: list[StoredEvent] = []
        self.advanced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def cached_after(self, after: int) -> list[StoredEvent] | None:
        """Events after the cursor from memory; None when memory does not reach back that far."""
        if not self.ready or after < self.base:
            return None
        if after >= self.upto:
            return []
        start = bisect.bisect_right(self.events, after, key=lambda event: event.seq)
        return self.events[start:]

    def request_read(self) -> None:
        """Read new rows soon; requests during a read coalesce into one more read."""
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.create_task(self._read())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._wake()

    def _wake(self) -> None:
        # Waiters hold the previous Event object; a fresh one serves the next round.
        advanced, self.advanced = self.advanced, asyncio.Event()
        advanced.set()

    async def _read(self) -> None:
        try:
            async with self.bus.pool.acquire() as connection:
                if not self.ready:
                    self.base = self.upto = await last_seq(connection, self.execution_id)
                    self.ready = True
                    self._wake()
                while True:
                    self._again = False
                    rows = await events_after(connection, self.execution_id, self.upto, READ_PAGE)
                    if rows:
                        self._append([StoredEvent.from_row(row) for row in rows])
                    if len(rows) < READ_PAGE and not self._again:
                        return
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # The next announcement or poll tries again; streams keep their cursors.
            logger.warning(
                "reading events failed",
                extra={"exec_id": str(self.execution_id), "error_class": type(exc).__name__},
            )

    def _append(self, events: list[StoredEvent]) -> None:
        self.events.extend(events)
        self.upto = events[-1].seq
        if len(self.events) > 2 * FEED_KEEP:
            dropped = len(self.events) - FEED_KEEP
            self.base = self.events[dropped - 1].seq
            del self.events[:dropped]
        self._wake()


class Watch:
    """A stream's handle on its execution's feed."""

    def __init__(self, bus: EventBus, feed: _Feed) -> None:
        self._bus = bus
        self._feed = feed

    @property
    def execution_id(self) -> UUID:
        return self._feed.execution_id

    async def next_events(self, after: int, wait_s: float) -> list[StoredEvent]:
        """Events with ``seq > after`` as soon as there are any; ``[]`` after ``wait_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            advanced = self._feed.advanced  # taken before looking, so no wake-up is missed
            cached = self._feed.cached_after(after)
            if cached:
                return cached
            if cached is None:
                # Behind what memory holds (or the feed is new): read the rows directly.
                rows = await self._bus.read(self.execution_id, after)
                if rows:
                    return rows
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            try:
                await asyncio.wait_for(advanced.wait(), remaining)
            except TimeoutError:
                return []


class EventBus:
    """Announcements in (NOTIFY, Redis, polling); per-execution feeds out. One per process."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        dsn: str,
        *,
        redis_url: str | None = None,
        poll_interval_s: float = 2.0,
    ) -> None:
        self.pool = pool
        self.dsn = dsn
        self.redis_url = redis_url
        self.poll_interval_s = poll_interval_s
        self._feeds: dict[UUID, _Feed] = {}
        self._listener: asyncpg.Connection | None = None
        self._listener_lock = asyncio.Lock()  # one operation at a time on that connection
        self._listening = False
        self._relay = False
        self._relay_link = RelayLink()
        self._outbox: list[str] = []
        self._signal_outbox: list[tuple[str, str]] = []
        self._signal_heartbeat_due = False
        self._outbox_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self._last_poll = 0.0

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and start listening; a database that is down now is retried every tick."""
        await self._ensure_listener()
        self._tasks.append(asyncio.create_task(self._supervise(), name="event-bus"))
        if self.redis_url:
            self._tasks.append(asyncio.create_task(self._subscribe(), name="event-bus-redis"))
            self._tasks.append(asyncio.create_task(self._publish(), name="event-bus-relay"))

    async def stop(self) -> None:
        self._stopped.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for feed in list(self._feeds.values()):
            feed.close()
        self._feeds.clear()
        await self._close_listener()

    # --- what streams use ------------------------------------------------------------------

    @property
    def announcements(self) -> Announcements:
        """How this process hears of new events right now (shown to clients and operators)."""
        if self._relay_link.healthy() and not self._relay:
            return "redis"
        if self._listening:
            return "notify"
        return "poll"

    @property
    def is_relay(self) -> bool:
        return self._relay

    @asynccontextmanager
    async def watch(self, execution_id: UUID) -> AsyncIterator[Watch]:
        """Follow one execution for as long as the block runs."""
        feed = self._feeds.get(execution_id)
        if feed is None:
            feed = self._feeds[execution_id] = _Feed(self, execution_id)
            feed.request_read()
        feed.watchers += 1
        try:
            yield Watch(self, feed)
        finally:
            feed.watchers -= 1
            if feed.watchers == 0 and self._feeds.get(execution_id) is feed:
                del self._feeds[execution_id]
                feed.close()

    async def read(
        self, execution_id: UUID, after: int, limit: int = READ_PAGE
    ) -> list[StoredEvent]:
        """Committed events after a cursor, straight from the database."""
        async with self.pool.acquire() as connection:
            rows = await events_after(connection, execution_id, after, limit)
        return [StoredEvent.from_row(row) for row in rows]

    # --- announcements in ------------------------------------------------------------------

    def announce(self, execution_id: UUID, seq: int) -> None:
        """An event up to ``seq`` is committed: wake the feed that watches that execution."""
        feed = self._feeds.get(execution_id)
        if feed is not None and (not feed.ready or seq > feed.upto):
            feed.request_read()

    def _on_notify(self, _connection: Any, _pid: int, _channel: str, payload: object) -> None:
        text = str(payload)
        for execution_id, seq in parse_announcements(text):
            self.announce(execution_id, seq)
        if self._relay:
            self._to_relay(text)

    def _on_worker_signal(self, _connection: Any, _pid: int, channel: str, payload: object) -> None:
        self._signal_outbox.append((channel, str(payload)))
        if len(self._signal_outbox) > OUTBOX_LIMIT:
            del self._signal_outbox[: len(self._signal_outbox) - OUTBOX_LIMIT]
        self._outbox_ready.set()

    def _to_relay(self, line: str) -> None:
        self._outbox.append(line)
        if len(self._outbox) > OUTBOX_LIMIT:
            del self._outbox[: len(self._outbox) - OUTBOX_LIMIT]
        self._outbox_ready.set()

    def _catch_up(self) -> None:
        """After any gap in announcements: re-read every watched execution once."""
        for feed in self._feeds.values():
            feed.request_read()

    # --- the dedicated PostgreSQL connection -------------------------------------------------

    async def _ensure_listener(self) -> bool:
        if self._listener is not None and not self._listener.is_closed():
            return True
        await self._close_listener()
        try:
            self._listener = await asyncio.wait_for(connect(self.dsn), timeout=10)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            logger.warning("event listener cannot connect", extra={"error": type(exc).__name__})
            return False
        await self._set_listening(self._wants_listen())
        return True

    async def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        self._listening = False
        self._relay = False
        if listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.close(), timeout=5)

    async def _set_listening(self, wanted: bool) -> None:
        async with self._listener_lock:
            if self._listener is None or wanted == self._listening:
                return
            if wanted:
                await self._listener.add_listener(EVENTS_CHANNEL, self._on_notify)
                self._listening = True
                self._catch_up()  # whatever was announced before LISTEN took effect
            else:
                await self._listener.remove_listener(EVENTS_CHANNEL, self._on_notify)
                self._listening = False
        logger.info("event announcements", extra={"via": self.announcements})

    def _wants_listen(self) -> bool:
        return not self.redis_url or self._relay or not self._relay_link.healthy()

    async def _supervise(self) -> None:
        while not self._stopped.is_set():
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad tick must not end live progress for the process
                logger.exception("event bus tick failed")
                await self._close_listener()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), TICK_S)

    async def _tick(self) -> None:
        connected = await self._ensure_listener()
        if connected and self.redis_url:
            await self._elect_relay()
        if connected:
            await self._set_listening(self._wants_listen())
        if self._relay:
            self._to_relay(RELAY_HEARTBEAT)
            self._signal_heartbeat_due = True
        if time.monotonic() - self._last_poll >= self.poll_interval_s:
            self._last_poll = time.monotonic()
            if connected:
                # A dead TCP peer can leave the connection looking open; ask it something.
                await asyncio.wait_for(self._listener_query("SELECT 1"), timeout=5)
            await self._poll()

    async def _listener_query(self, query: str, *args: object) -> Any:
        async with self._listener_lock:
            assert self._listener is not None
            return await self._listener.fetchval(query, *args)

    async def _elect_relay(self) -> None:
        if self._relay or self.redis_url is None:
            return
        won = await self._listener_query(
            "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
            "opsexec:events-relay:" + redis_endpoint(self.redis_url),
        )
        if won:
            async with self._listener_lock:
                assert self._listener is not None
                for channel in WORKER_SIGNAL_CHANNELS:
                    await self._listener.add_listener(channel, self._on_worker_signal)
            self._relay = True
            logger.info("this process relays event announcements and worker signals to Redis")

    async def _poll(self) -> None:
        """The safety net: find watched executions whose newest event this process missed."""
        if not self._feeds:
            return
        try:
            async with self.pool.acquire() as connection:
                newest = await last_seqs(connection, list(self._feeds))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return
        for execution_id, feed in list(self._feeds.items()):
            if not feed.ready or newest.get(execution_id, 0) > feed.upto:
                feed.request_read()

    # --- Redis ------------------------------------------------------------------------------

    def _redis_client(self) -> Any:
        assert self.redis_url is not None
        return fail_fast_redis(self.redis_url)

    async def _subscribe(self) -> None:
        """Hear announcements from Redis; on any failure fall back and retry with backoff."""
        assert self.redis_url is not None
        await follow_channel(
            self.redis_url,
            REDIS_CHANNEL,
            self._on_redis_message,
            link=self._relay_link,
            on_down=self._set_listening_soon,
            stopped=self._stopped,
            logger=logger,
            fallback="announcements fall back to NOTIFY",
        )

    def _on_redis_message(self, data: str) -> None:
        # A batch may mix heartbeats in; those lines parse as nothing.
        for execution_id, seq in parse_announcements(data):
            self.announce(execution_id, seq)

    async def _set_listening_soon(self) -> None:
        """Fall back to LISTEN now rather than at the next tick: events are arriving."""
        if self._listener is not None and not self._listener.is_closed():
            with contextlib.suppress(Exception):
                await self._set_listening(self._wants_listen())

    async def _publish(self) -> None:
        """As the relay: push NOTIFY announcements (and heartbeats) to Redis in batches."""
        from redis.exceptions import RedisError

        client = self._redis_client()
        try:
            while not self._stopped.is_set():
                await self._outbox_ready.wait()
                self._outbox_ready.clear()
                batch, self._outbox = self._outbox, []
                signals, self._signal_outbox = self._signal_outbox, []
                heartbeat, self._signal_heartbeat_due = self._signal_heartbeat_due, False
                if not self._relay:
                    continue
                try:
                    if batch:
                        await client.publish(REDIS_CHANNEL, "\n".join(batch))
                    if signals or heartbeat:
                        await client.publish(REDIS_SIGNALS_CHANNEL, encode_signals(signals))
                except (RedisError, OSError, TimeoutError):
                    # Followers stop hearing heartbeats and LISTEN themselves; nothing waits.
                    continue
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()
