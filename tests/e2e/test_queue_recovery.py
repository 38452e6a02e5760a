"""Workers dying and leaving: kill -9 mid-step, SIGTERM hand-back, priority order."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from opsexec.policy import MAX_LEASE_RENEWALS, SlaClass
from opsexec.store import queue as queue_store
from opsexec.store import transaction
from tests.conftest import TenantFixture, bearer
from tests.worker_support import finished, start_worker, step_status, stop, wait_for

pytestmark = pytest.mark.postgres


async def submit_background(
    http: httpx.AsyncClient, tenant: TenantFixture, pool: asyncpg.Pool, commands: list[str]
) -> str:
    steps = [
        {
            "id": f"s{i}",
            "action": "shell.run",
            "targets": ["local-01"],
            "inputs": {"command": command},
            "estimated_duration_s": 6,
            **({"depends_on": [f"s{i - 1}"]} if i else {}),
        }
        for i, command in enumerate(commands)
    ]
    headers = bearer(tenant.admin_key)
    execution = (
        await http.post(
            "/v1/executions",
            json={"plan": {"steps": steps}, "mode": "background"},
            headers=headers,
        )
    ).json()
    assert execution["execution_mode"] == "background"
    # Short leases so a dead worker's job comes back within the test's patience.
    await pool.execute(
        """UPDATE execution_queue SET metadata = metadata || '{"lease_ms": 1500}'
           WHERE execution_id = $1""",
        uuid.UUID(execution["id"]),
    )
    await http.post(f"/v1/executions/{execution['id']}/approve", headers=headers)
    return str(execution["id"])


async def test_kill_9_mid_step_resumes_and_never_repeats_a_side_effect(
    http: httpx.AsyncClient,
    stocked: TenantFixture,
    pool: asyncpg.Pool,
    database_dsn: str,
    tmp_path: Path,
) -> None:
    trail = tmp_path / "trail"
    marker = f"31.{uuid.uuid4().int % 10**6:06d}"
    execution_id = await submit_background(
        http, stocked, pool, [f"echo one >> {trail}", f"echo two >> {trail}; sleep {marker}"]
    )
    first = await start_worker(database_dsn, tmp_path, "doomed")
    second = None
    try:
        await wait_for(lambda: _is(step_status(pool, execution_id, 2), "running"))
        first.kill()  # SIGKILL: no goodbye, no lease hand-back
        await first.wait()
        second = await start_worker(database_dsn, tmp_path, "rescuer")
        row = await wait_for(lambda: finished(pool, execution_id))
    finally:
        await stop(first)
        if second is not None:
            await stop(second)
    # Step 1 succeeded before the crash and was not run again; step 2 (shell.run is not
    # idempotent) was mid-flight, so a person must decide.
    assert trail.read_text().split() == ["one", "two"]
    assert row["status"] == "failed"
    assert row["error_class"] == "IndeterminateStepOutcome"
    kinds = [
        r["event_kind"]
        for r in await pool.fetch(
            "SELECT event_kind FROM execution_events WHERE execution_id = $1 ORDER BY seq",
            uuid.UUID(execution_id),
        )
    ]
    assert "lease_expired" in kinds


async def _is(awaitable: Any, expected: str) -> bool:
    return bool(await awaitable == expected)


async def test_sigterm_finishes_the_step_and_hands_the_job_back(
    http: httpx.AsyncClient,
    stocked: TenantFixture,
    pool: asyncpg.Pool,
    database_dsn: str,
    tmp_path: Path,
) -> None:
    trail = tmp_path / "trail"
    execution_id = await submit_background(
        http,
        stocked,
        pool,
        [f"sleep 1; echo one >> {trail}", f"echo two >> {trail}"],
    )
    # Long leases here: the hand-back, not lease expiry, must bring the job back.
    await pool.execute(
        """UPDATE execution_queue SET metadata = metadata || '{"lease_ms": 600000}'
           WHERE execution_id = $1""",
        uuid.UUID(execution_id),
    )
    first = await start_worker(database_dsn, tmp_path, "leaving")
    second = None
    try:
        await wait_for(lambda: _is(step_status(pool, execution_id, 1), "running"))
        first.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(first.wait(), 30) == 0
        job = await pool.fetchrow(
            "SELECT status, attempt, leased_by FROM execution_queue WHERE execution_id = $1",
            uuid.UUID(execution_id),
        )
        assert (job["status"], job["attempt"], job["leased_by"]) == ("queued", 0, None)
        assert await step_status(pool, execution_id, 1) == "succeeded"
        second = await start_worker(database_dsn, tmp_path, "taking-over")
        row = await wait_for(lambda: finished(pool, execution_id), timeout=20)
    finally:
        await stop(first)
        if second is not None:
            await stop(second)
    assert row["status"] == "succeeded"
    assert trail.read_text().split() == ["one", "two"]


async def test_dequeue_takes_urgent_before_normal_before_bulk(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    ids = {}
    async with transaction(pool) as connection:
        for name, priority in [("bulk", 100), ("normal", 50), ("urgent", 0)]:
            execution_id = await connection.fetchval(
                """INSERT INTO executions (tenant_id, actor_id, idempotency_key, plan_hash,
                       plan_snapshot, plan_size_bytes, step_count, target_count,
                       execution_mode, approval_level, sla_class, status)
                   VALUES ($1, $2, $3, repeat('0', 64), '{"steps": []}', 2, 1, 0,
                       'background', 0, 'medium', 'approved')
                   RETURNING id""",
                tenant.id,
                tenant.admin_id,
                uuid.uuid4().hex,
            )
            await queue_store.enqueue(
                connection, execution_id, priority=priority, max_attempts=3, runnable=True
            )
            ids[execution_id] = name
    order: list[str] = []
    async with pool.acquire() as connection:
        # Other tests' runnable jobs may share this database: lease past them, then roll
        # every lease back so nothing here outlives the test.
        leases = connection.transaction()
        await leases.start()
        try:
            for _ in range(200):
                jobs = await queue_store.dequeue(connection, "ordering-test", 1)
                if not jobs or len(order) == 3:
                    break
                order.extend(ids[j["execution_id"]] for j in jobs if j["execution_id"] in ids)
        finally:
            await leases.rollback()
    assert order == ["urgent", "normal", "bulk"]


async def test_a_frozen_worker_cannot_write_after_losing_its_lease(
    http: httpx.AsyncClient,
    stocked: TenantFixture,
    pool: asyncpg.Pool,
    database_dsn: str,
    tmp_path: Path,
) -> None:
    trail = tmp_path / "trail"
    execution_id = await submit_background(
        http, stocked, pool, [f"sleep 2; echo one >> {trail}", f"echo two >> {trail}"]
    )
    frozen = await start_worker(database_dsn, tmp_path, "frozen")
    rescuer = None
    try:
        await wait_for(lambda: _is(step_status(pool, execution_id, 1), "running"))
        frozen.send_signal(signal.SIGSTOP)  # no heartbeats: the lease runs out
        rescuer = await start_worker(database_dsn, tmp_path, "rescuer")
        row = await wait_for(lambda: finished(pool, execution_id))
        events_before = await pool.fetchval(
            "SELECT count(*) FROM execution_events WHERE execution_id = $1",
            uuid.UUID(execution_id),
        )
        steps_before = await pool.fetch(
            "SELECT * FROM execution_steps WHERE execution_id = $1 ORDER BY step_number",
            uuid.UUID(execution_id),
        )
        frozen.send_signal(signal.SIGCONT)  # it wakes up believing it still runs the job
        await asyncio.sleep(4)  # its sleep ends and it tries to record the step
        events_after = await pool.fetchval(
            "SELECT count(*) FROM execution_events WHERE execution_id = $1",
            uuid.UUID(execution_id),
        )
        steps_after = await pool.fetch(
            "SELECT * FROM execution_steps WHERE execution_id = $1 ORDER BY step_number",
            uuid.UUID(execution_id),
        )
        final = await pool.fetchrow(
            "SELECT * FROM executions WHERE id = $1", uuid.UUID(execution_id)
        )
    finally:
        await stop(frozen)
        if rescuer is not None:
            await stop(rescuer)
    assert row["worker_id"] == "rescuer", "worker_id names the worker that ran it last"
    assert (row["status"], row["error_class"]) == ("failed", "IndeterminateStepOutcome")
    assert events_after == events_before, "the frozen worker wrote an event"
    assert [dict(r) for r in steps_after] == [dict(r) for r in steps_before]
    assert dict(final) == dict(row)


async def test_lease_renewals_stop_at_the_sla_cap(
    http: httpx.AsyncClient,
    stocked: TenantFixture,
    pool: asyncpg.Pool,
    database_dsn: str,
    tmp_path: Path,
) -> None:
    execution_id = await submit_background(http, stocked, pool, ["sleep 4.5", "true"])
    job = await pool.fetchrow(
        "SELECT metadata FROM execution_queue WHERE execution_id = $1", uuid.UUID(execution_id)
    )
    cap = job["metadata"]["max_lease_renewals"]
    sla = await pool.fetchval(
        "SELECT sla_class FROM executions WHERE id = $1", uuid.UUID(execution_id)
    )
    assert cap == MAX_LEASE_RENEWALS[SlaClass(sla)] == 3, "medium SLA: at most 3 renewals"
    # A renewal every second; uncapped, a 4.5 s step would see four of them.
    await pool.execute(
        """UPDATE execution_queue SET metadata = metadata || '{"lease_ms": 3000}'
           WHERE execution_id = $1""",
        uuid.UUID(execution_id),
    )
    worker = await start_worker(database_dsn, tmp_path, "renewing")
    try:
        row = await wait_for(lambda: finished(pool, execution_id))
    finally:
        await stop(worker)
    assert row["status"] == "succeeded"
    assert row["lease_renewals"] == cap
    assert row["worker_id"] == "renewing"


async def test_force_cancel_reaches_a_worker_process(
    http: httpx.AsyncClient,
    stocked: TenantFixture,
    pool: asyncpg.Pool,
    database_dsn: str,
    tmp_path: Path,
) -> None:
    marker = f"32.{uuid.uuid4().int % 10**6:06d}"
    execution_id = await submit_background(http, stocked, pool, [f"sleep {marker}", "true"])
    worker = await start_worker(database_dsn, tmp_path, "cancellable")
    try:
        await wait_for(lambda: _is(step_status(pool, execution_id, 1), "running"))
        started = asyncio.get_running_loop().time()
        cancelled = await http.post(
            f"/v1/executions/{execution_id}/cancel",
            json={"force": True, "reason": "abort"},
            headers=bearer(stocked.admin_key),
        )
        assert cancelled.status_code == 200, cancelled.text
        row = await wait_for(lambda: finished(pool, execution_id), timeout=15)
        elapsed = asyncio.get_running_loop().time() - started
    finally:
        await stop(worker)
    assert row["status"] == "cancelled"
    assert elapsed < 10, "the sleeping step was killed, not waited for"
    assert await step_status(pool, execution_id, 2) == "cancelled"
