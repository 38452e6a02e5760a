"""Worker signals over a real PostgreSQL and a real (private, killable) Redis.

Without Redis a worker LISTENs; with Redis and a relay (an API process's event bus) it
hears the relay instead and holds no PostgreSQL listener; when Redis dies, or the
listener's connection is killed as in a failover, signals keep arriving.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest

from opsexec.progress.bus import EventBus
from opsexec.queue.signals import WorkerSignals, decode_signals, encode_signals
from opsexec.store import transaction
from opsexec.store.channels import (
    CANCEL_CHANNEL,
    DRAIN_CHANNEL,
    EVENTS_CHANNEL,
    QUEUE_CHANNEL,
    notify,
)
from tests.live_support import private_redis

pytestmark = pytest.mark.postgres


class Heard:
    """What a worker's handlers received, awaitable by payload."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self._changed = asyncio.Event()
        self.gaps = 0

    def handler(self, channel: str) -> Callable[[str], None]:
        def record(payload: str) -> None:
            self.items.append((channel, payload))
            self._changed.set()

        return record

    def gap(self) -> None:
        self.gaps += 1

    async def wait_for(self, channel: str, payload: str, timeout: float = 1.0) -> float:
        """Seconds until ``(channel, payload)`` was heard; fails past ``timeout``."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while (channel, payload) not in self.items:
            self._changed.clear()
            remaining = timeout - (loop.time() - started)
            if remaining <= 0:
                pytest.fail(f"{channel} {payload!r} not heard within {timeout} s: {self.items}")
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                continue
        return loop.time() - started


@asynccontextmanager
async def worker_ear(
    dsn: str, redis_url: str | None = None
) -> AsyncIterator[tuple[WorkerSignals, Heard]]:
    heard = Heard()
    channels = (QUEUE_CHANNEL, CANCEL_CHANNEL, DRAIN_CHANNEL)
    signals = WorkerSignals(
        dsn,
        {channel: heard.handler(channel) for channel in channels},
        redis_url=redis_url,
        on_gap=heard.gap,
    )
    await signals.start()
    try:
        yield signals, heard
    finally:
        await signals.stop()


async def send(pool: asyncpg.Pool, channel: str, payload: str) -> None:
    async with transaction(pool) as connection:
        await notify(connection, channel, payload)


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_signal_batches_round_trip_and_junk_is_dropped() -> None:
    batch = [(QUEUE_CHANNEL, "a"), (DRAIN_CHANNEL, "host:1 with space")]
    assert decode_signals(encode_signals(batch)) == batch
    assert decode_signals(encode_signals([])) == []
    for junk in ("", "not json", "{}", '[["only one"]]', "[[1, 2]]", '"text"'):
        assert decode_signals(junk) == []


def test_only_worker_channels_can_be_handled(database_dsn: str) -> None:
    with pytest.raises(ValueError, match="not worker signal channels"):
        WorkerSignals(database_dsn, {EVENTS_CHANNEL: lambda _: None})


async def test_without_redis_signals_arrive_by_listen_only_after_commit(
    database_dsn: str, pool: asyncpg.Pool
) -> None:
    async with worker_ear(database_dsn) as (signals, heard):
        assert signals.via == "notify"
        async with pool.acquire() as connection:
            transaction_ = connection.transaction()
            await transaction_.start()
            await notify(connection, QUEUE_CHANNEL, "uncommitted")
            await transaction_.rollback()
        await send(pool, CANCEL_CHANNEL, "committed")
        assert await heard.wait_for(CANCEL_CHANNEL, "committed") < 1.0
        assert (QUEUE_CHANNEL, "uncommitted") not in heard.items


async def test_a_killed_listener_connection_is_replaced(
    database_dsn: str, pool: asyncpg.Pool
) -> None:
    """As after a PostgreSQL failover: the worker's listener backend is gone."""
    async with worker_ear(database_dsn) as (signals, heard):
        listener = signals._listener
        assert listener is not None
        backend = listener.get_server_pid()
        assert await pool.fetchval("SELECT pg_terminate_backend($1)", backend)
        await until(
            lambda: signals._listener is not None and signals._listener is not listener,
            "a new listener connection",
        )
        await send(pool, QUEUE_CHANNEL, "after-failover")
        await heard.wait_for(QUEUE_CHANNEL, "after-failover")
        assert heard.gaps >= 1, "the worker was told to catch up after the gap"


async def test_with_redis_and_a_relay_workers_hear_redis_and_survive_its_death(
    database_dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    with private_redis(tmp_path) as redis:
        relay = EventBus(pool, database_dsn, redis_url=redis.url, poll_interval_s=0.5)
        await relay.start()
        try:
            async with worker_ear(database_dsn, redis.url) as (signals, heard):
                await until(lambda: relay.is_relay, "the bus to become the relay")
                await until(lambda: signals.via == "redis", "signals through Redis")
                assert signals._listener is None, "no PostgreSQL listener while Redis serves"
                for channel, payload in ((QUEUE_CHANNEL, "q1"), (CANCEL_CHANNEL, "c1")):
                    await send(pool, channel, payload)
                    assert await heard.wait_for(channel, payload) < 1.0

                redis.kill()
                await until(lambda: signals.via == "notify", "the fall-back to LISTEN")
                await send(pool, DRAIN_CHANNEL, "worker-1")
                assert await heard.wait_for(DRAIN_CHANNEL, "worker-1") < 1.0
        finally:
            await relay.stop()


async def test_with_redis_but_no_relay_workers_keep_listening(
    database_dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """Workers alone (no API process to relay): Redis carries nothing, so LISTEN stays."""
    with private_redis(tmp_path) as redis:
        async with worker_ear(database_dsn, redis.url) as (signals, heard):
            await asyncio.sleep(1.5)
            assert signals.via == "notify"
            await send(pool, QUEUE_CHANNEL, "no-relay")
            await heard.wait_for(QUEUE_CHANNEL, "no-relay")
