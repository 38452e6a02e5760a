"""Event emission rate and commit-to-receipt delay at 100 concurrent SSE clients (R-PERF).

1. Emission: concurrent writers call ``append_event`` (row + NOTIFY, one event per
   transaction, as the engine writes them) against a database a real `opsexec serve` is
   LISTENing on. Target ≥ 5,000 events/s; the original design asked for 50/s.
2. Delivery: 100 SSE clients on that server follow 10 executions (10 clients each) while
   events are appended at a steady rate; the delay is from the writer's commit returning
   to the client parsing the event. Target p95 ≤ 1 s ("within a second").

    .venv/bin/python bench/events.py [--seconds 5] [--writers 16] [--rate 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

import httpx

from _harness import percentile, report, running_service, scratch_database
from opsexec.store import create_pool, transaction
from opsexec.store.events import append_event

ASSET = {"name": "local-01", "address": "127.0.0.1", "transport": "local"}
# Reference only, not the product path: the same insert without pg_notify, to show what the
# NOTIFY in each commit costs on this machine (notifying commits are serialised, WAL flush
# included, by a database-wide lock).
WITHOUT_NOTIFY = """
WITH ordered AS (SELECT pg_advisory_xact_lock(hashtextextended($1::uuid::text, 0)))
INSERT INTO execution_events (execution_id, event_kind, payload)
SELECT $1::uuid, 'step_progress', '{}'::jsonb FROM ordered
RETURNING seq
"""


def waiting_plan(tag: str) -> dict[str, Any]:
    """A level-1 plan that waits for approval forever: a quiet execution to write events to."""
    return {
        "steps": [
            {
                "id": "run",
                "action": "shell.run",
                "targets": ["local-01"],
                "inputs": {"command": f"echo {tag}"},
                "estimated_duration_s": 1,
            }
        ]
    }


async def create_executions(http: httpx.AsyncClient, count: int) -> list[uuid.UUID]:
    (await http.post("/v1/assets", json=ASSET)).raise_for_status()
    ids = []
    for n in range(count):
        response = await http.post(
            "/v1/executions", json={"plan": waiting_plan(f"bench-{n}"), "mode": "background"}
        )
        response.raise_for_status()
        ids.append(uuid.UUID(response.json()["id"]))
    return ids


async def emission_rate(
    dsn: str,
    executions: list[uuid.UUID],
    writers: int,
    seconds: float,
    *,
    reference: bool = False,
) -> float:
    pool = await create_pool(dsn, min_size=writers, max_size=writers)
    count = 0
    stop_at = time.monotonic() + seconds

    async def writer(execution_id: uuid.UUID) -> None:
        nonlocal count
        n = 0
        while time.monotonic() < stop_at:
            async with transaction(pool) as connection:
                if reference:
                    await connection.fetchval(WITHOUT_NOTIFY, execution_id)
                else:
                    await append_event(connection, execution_id, "step_progress", {"n": n})
            n += 1
            count += 1

    try:
        started = time.monotonic()
        await asyncio.gather(*(writer(executions[i % len(executions)]) for i in range(writers)))
        elapsed = time.monotonic() - started
    finally:
        await pool.close()
    return count / elapsed


async def delivery_delays(
    url: str, key: str, dsn: str, executions: list[uuid.UUID], rate: float, seconds: float
) -> tuple[list[float], int, int]:
    """Delays (ms) of every delivery; also events emitted and deliveries expected."""
    committed: dict[int, float] = {}
    received: list[tuple[int, float]] = []
    ready = asyncio.Event()
    connected = 0
    clients = 100
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
    limits = httpx.Limits(max_connections=clients + 10)
    timeout = httpx.Timeout(30.0)

    async def client(http: httpx.AsyncClient, execution_id: uuid.UUID) -> None:
        nonlocal connected
        path = f"/v1/executions/{execution_id}/events"
        async with http.stream("GET", path, headers=headers) as response:
            response.raise_for_status()
            connected += 1
            if connected == clients:
                ready.set()
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    received.append((json.loads(line[5:])["seq"], time.time()))

    pool = await create_pool(dsn, min_size=4, max_size=4)
    emitted = 0
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as http:
        streams = [asyncio.create_task(client(http, executions[i % 10])) for i in range(clients)]
        await asyncio.wait_for(ready.wait(), 60)
        await asyncio.sleep(0.5)  # let every stream finish reading the history
        stop_at = time.monotonic() + seconds

        async def emitter(lane: int) -> None:
            # Four paced lanes: one writer alone cannot commit much faster than ~600/s.
            nonlocal emitted
            interval = 4 / rate
            next_at = time.monotonic()
            while time.monotonic() < stop_at:
                execution_id = executions[(emitted + lane) % 10]
                async with transaction(pool) as connection:
                    seq = await append_event(connection, execution_id, "step_progress", {})
                committed[seq] = time.time()
                emitted += 1
                next_at += interval
                await asyncio.sleep(max(next_at - time.monotonic(), 0))

        await asyncio.gather(*(emitter(lane) for lane in range(4)))
        await asyncio.sleep(2)  # stragglers
        for stream in streams:
            stream.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    await pool.close()
    # A client can parse an event before the writer's COMMIT acknowledgement is back: that
    # delivery took no time at all after the commit, so it counts as 0, not as missing.
    delays = [max(at - committed[seq], 0.0) * 1000 for seq, at in received if seq in committed]
    return delays, emitted, emitted * clients // 10


async def main(seconds: float, writers: int, rate: float) -> None:
    async with scratch_database() as dsn:
        with running_service(dsn, "--worker-concurrency", "0") as service:
            headers = {"Authorization": f"Bearer {service.api_key}"}
            async with httpx.AsyncClient(base_url=service.url, headers=headers) as http:
                executions = await create_executions(http, max(writers, 10))
            emitted_per_s = await emission_rate(dsn, executions, writers, seconds)
            without_notify = await emission_rate(dsn, executions, writers, seconds, reference=True)
            delays, emitted, expected = await delivery_delays(
                service.url, service.api_key, dsn, executions, rate, seconds
            )
    p50, p95 = percentile(delays, 0.5), percentile(delays, 0.95)
    report(
        f"events: {writers} writers for {seconds:g} s; then 100 SSE clients on 10 executions, "
        f"{rate:g} events/s for {seconds:g} s",
        [
            ("events emitted/s (target 5,000)", emitted_per_s, 5000.0),
            ("events emitted/s (original target 50)", emitted_per_s, 50.0),
            ("p95 commit-to-receipt ms, 100 SSE (target 1 s)", p95, 1000.0),
        ],
        lower_is_better=frozenset({"p95 commit-to-receipt ms, 100 SSE (target 1 s)"}),
    )
    print(
        f"reference: the same single-event commits without NOTIFY run at {without_notify:.0f}/s "
        f"here; NOTIFY costs {100 * (1 - emitted_per_s / without_notify):.0f}% of that"
    )
    print(
        f"deliveries {len(delays)} of {expected} expected ({emitted} events x 10 clients); "
        f"delay p50 {p50:.1f} ms, p95 {p95:.1f} ms, max {max(delays):.1f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--rate", type=float, default=500.0)
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.writers, args.rate))
