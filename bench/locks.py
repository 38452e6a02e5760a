"""Lock throughput (R-PERF "lock acquisitions"): acquire + release pairs per second.

Each pair is exactly what the runner does around an execution: ``acquire_execution_locks``
(one transaction: the all-or-nothing upsert and its ``lock_acquired`` event) followed by
``release_execution_locks`` (one transaction: the owner-only delete and its
``lock_released`` event), through the production pool against a real PostgreSQL. Every
task is its own execution with keys of its own, so the figure is the cost of the lock
machinery, not of waiting for a conflicting holder.

The server is ``OPSEXEC_DATABASE_URL`` when set, else the embedded PostgreSQL (started in a
temporary directory). A scratch database is created, migrated by Alembic, and dropped at
the end.

Run: ``.venv/bin/python bench/locks.py [--seconds S] [--tasks 1,8] [--keys K] [--profile]``.
Prints a table; never asserts on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import secrets
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from opsexec.safety.mutex import acquire_execution_locks, lock_key, release_execution_locks
from opsexec.store import create_pool, migrate, transaction
from opsexec.store.embedded import EmbeddedPostgres
from opsexec.store.identity import ensure_tenant, ensure_user

TARGET_PER_S = 2_000
ORIGINAL_TARGET_PER_S = 50

INSERT_EXECUTION = """
INSERT INTO executions (tenant_id, actor_id, idempotency_key, plan_hash, plan_snapshot,
    plan_size_bytes, step_count, target_count, execution_mode, approval_level,
    sla_class, status, started_at)
VALUES ($1, $2, $3, repeat('0', 64), '{"steps": []}', 2, 1, 0, 'background', 1,
    'medium', 'running', now())
RETURNING id
"""


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


@asynccontextmanager
async def server() -> AsyncIterator[str]:
    """The server DSN: ``OPSEXEC_DATABASE_URL``, or an embedded PostgreSQL for the run."""
    url = os.environ.get("OPSEXEC_DATABASE_URL")
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="opsexec-bench-pg-") as data_dir:
        embedded = await EmbeddedPostgres.start(Path(data_dir))
        try:
            yield embedded.dsn
        finally:
            await embedded.stop()


@asynccontextmanager
async def scratch_database(server_dsn: str) -> AsyncIterator[str]:
    name = f"opsexec_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        dsn = with_database(server_dsn, name)
        await migrate.upgrade(dsn)
        yield dsn
    finally:
        admin = await asyncpg.connect(server_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


class Worker:
    """One execution with its own keys, acquiring and releasing in a loop."""

    def __init__(self, tenant_id: uuid.UUID, execution_id: uuid.UUID, keys: list[str]) -> None:
        self.tenant_id = tenant_id
        self.execution_id = execution_id
        self.keys = keys
        self.latencies: list[float] = []

    async def pair(self, pool: asyncpg.Pool) -> None:
        await acquire_execution_locks(
            pool,
            tenant_id=self.tenant_id,
            execution_id=self.execution_id,
            keys=self.keys,
            ttl_s=60,
        )
        await release_execution_locks(
            pool, tenant_id=self.tenant_id, execution_id=self.execution_id
        )

    async def run(self, pool: asyncpg.Pool, deadline: float) -> None:
        clock = time.perf_counter
        while clock() < deadline:
            started = clock()
            await self.pair(pool)
            self.latencies.append(clock() - started)


async def make_workers(pool: asyncpg.Pool, count: int, keys_each: int) -> list[Worker]:
    async with transaction(pool) as connection:
        tenant_id = await ensure_tenant(connection, f"bench-{uuid.uuid4().hex[:8]}")
        user_id = await ensure_user(connection, tenant_id, "bench@localhost", ["admin"])
        workers = []
        for n in range(count):
            execution_id = await connection.fetchval(
                INSERT_EXECUTION, tenant_id, user_id, uuid.uuid4().hex
            )
            keys = [lock_key(tenant_id, f"bench-{n:03d}-{k}") for k in range(keys_each)]
            workers.append(Worker(tenant_id, execution_id, keys))
    return workers


async def measure(workers: list[Worker], pool: asyncpg.Pool, seconds: float) -> tuple[int, float]:
    for worker in workers:
        worker.latencies.clear()
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(worker.run(pool, deadline) for worker in workers))
    elapsed = time.perf_counter() - started
    return sum(len(w.latencies) for w in workers), elapsed


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def main_async(options: argparse.Namespace) -> None:
    rows: list[tuple[str, ...]] = []
    async with server() as server_dsn, scratch_database(server_dsn) as dsn:
        max_tasks = max(options.tasks)
        pool = await create_pool(dsn, min_size=max_tasks, max_size=max_tasks)
        try:
            version = await pool.fetchval("SHOW server_version")
            sync_commit = await pool.fetchval("SHOW synchronous_commit")
            for tasks in options.tasks:
                workers = await make_workers(pool, tasks, options.keys)
                await measure(workers, pool, min(1.0, options.seconds))  # warm-up
                if options.profile:
                    profiler = cProfile.Profile()
                    profiler.enable()
                    await measure(workers, pool, options.seconds)
                    profiler.disable()
                    print(f"--- profile, {tasks} task(s) ---")
                    pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
                pairs, elapsed = await measure(workers, pool, options.seconds)
                latencies = [x for w in workers for x in w.latencies]
                left = await pool.fetchval("SELECT count(*) FROM execution_locks")
                if left:
                    raise SystemExit(f"{left} lock rows left behind: release is broken")
                per_second = pairs / elapsed
                rows.append(
                    (
                        str(tasks),
                        f"{pairs:,}",
                        f"{per_second:,.0f}",
                        f"{statistics.median(latencies) * 1e3:.2f}",
                        f"{percentile(latencies, 0.95) * 1e3:.2f}",
                        f"{per_second / TARGET_PER_S:.2f}x",
                        f"{per_second / ORIGINAL_TARGET_PER_S:,.0f}x",
                    )
                )
        finally:
            await pool.close()

    header = ("tasks", "pairs", "pairs/s", "p50 ms", "p95 ms", "vs 2,000/s", "vs 50/s")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(
        f"lock acquire+release pairs ({options.keys} key(s) per acquire, "
        f"{options.seconds:g} s per row; PostgreSQL {version}, "
        f"synchronous_commit={sync_commit})"
    )
    for row in [header, *rows]:
        print("  " + "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
    print(
        f"  target (ours) {TARGET_PER_S:,} pairs/s; "
        f"target (original) {ORIGINAL_TARGET_PER_S} acquisitions/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per row")
    parser.add_argument(
        "--tasks",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1, 8],
        help="comma-separated concurrency levels",
    )
    parser.add_argument("--keys", type=int, default=1, help="keys per acquire")
    parser.add_argument("--profile", action="store_true", help="print a cProfile summary")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
