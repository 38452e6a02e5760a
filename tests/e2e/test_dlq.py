"""A job whose lease keeps expiring lands in the DLQ with its event, and can be requeued."""

from __future__ import annotations

import json
import uuid

import asyncpg
import httpx
import pytest

from opsexec.queue.reaper import Reaper
from opsexec.store import executions as executions_store
from opsexec.store import queue as queue_store
from opsexec.store import steps as steps_store
from opsexec.store import transaction
from tests.conftest import ApiServer, TenantFixture, bearer, make_user
from tests.support import opsexec_async, other_tenant_admin, problem

pytestmark = pytest.mark.postgres


async def _dead_lettered_execution(
    http: httpx.AsyncClient, tenant: TenantFixture, pool: asyncpg.Pool
) -> str:
    plan = {
        "steps": [
            {
                "id": "s",
                "action": "shell.run",
                "targets": ["local-01"],
                "inputs": {"command": "true"},
                "estimated_duration_s": 20,
            }
        ]
    }
    headers = bearer(tenant.admin_key)
    execution = (await http.post("/v1/executions", json={"plan": plan}, headers=headers)).json()
    await http.post(f"/v1/executions/{execution['id']}/approve", headers=headers)
    execution_id = uuid.UUID(execution["id"])
    await pool.execute(
        "UPDATE execution_queue SET max_attempts = 2 WHERE execution_id = $1", execution_id
    )
    reaper = Reaper(pool, backoff_unit_s=0.0)
    for _ in range(2):  # a worker that leases the job and dies, twice
        async with transaction(pool) as connection:
            await connection.execute(
                "UPDATE execution_queue SET available_at = now() WHERE execution_id = $1",
                execution_id,
            )
            leased = await queue_store.dequeue(connection, f"doomed-{uuid.uuid4().hex[:4]}", 50)
            assert execution_id in {job["execution_id"] for job in leased}
            await connection.execute(
                """UPDATE execution_queue SET lease_expires_at = now() - interval '1 second'
                   WHERE status = 'leased' AND execution_id = ANY($1::uuid[])""",
                [job["execution_id"] for job in leased],
            )
        await reaper.reap_once()
    return execution["id"]


async def test_job_dead_lettered_after_max_attempts_and_requeued(
    http: httpx.AsyncClient,
    stocked: TenantFixture,
    pool: asyncpg.Pool,
    api_server: ApiServer,
    database_dsn: str,
) -> None:
    execution_id = await _dead_lettered_execution(http, stocked, pool)
    kinds = [
        r["event_kind"]
        for r in await pool.fetch(
            "SELECT event_kind FROM execution_events WHERE execution_id = $1 ORDER BY seq",
            uuid.UUID(execution_id),
        )
    ]
    assert kinds.count("lease_expired") == 2
    assert "dead_lettered" in kinds
    job = await pool.fetchrow(
        "SELECT status, attempt FROM execution_queue WHERE execution_id = $1",
        uuid.UUID(execution_id),
    )
    assert (job["status"], job["attempt"]) == ("failed", 2)

    headers = bearer(stocked.admin_key)
    entries = (await http.get("/v1/dlq", headers=headers)).json()
    (entry,) = [e for e in entries if e["execution_id"] == execution_id]
    assert entry["attempt_count"] == 2
    assert entry["execution_context"]["plan_hash"]

    listed = await opsexec_async(
        "dlq",
        "list",
        "--json",
        "--url",
        api_server.url,
        "--api-key",
        stocked.admin_key,
        dsn=database_dsn,
    )
    assert listed.returncode == 0, listed.stderr
    assert entry["id"] in {e["id"] for e in json.loads(listed.stdout)}

    _, viewer = await make_user(pool, stocked, ["viewer"])
    problem(
        await http.post(f"/v1/dlq/{entry['id']}/requeue", headers=bearer(viewer)),
        403,
        "permission_denied",
    )
    foreign = bearer(await other_tenant_admin(pool))
    problem(await http.post(f"/v1/dlq/{entry['id']}/requeue", headers=foreign), 404, "not_found")

    requeued = await opsexec_async(
        "dlq",
        "requeue",
        entry["id"],
        "--url",
        api_server.url,
        "--api-key",
        stocked.admin_key,
        dsn=database_dsn,
    )
    assert requeued.returncode == 0, requeued.stderr
    job = await pool.fetchrow(
        """SELECT status, attempt, available_at <= now() AS runnable
           FROM execution_queue WHERE execution_id = $1""",
        uuid.UUID(execution_id),
    )
    assert (job["status"], job["attempt"], job["runnable"]) == ("queued", 0, True)
    again = await http.post(f"/v1/dlq/{entry['id']}/requeue", headers=headers)
    problem(again, 404, "not_found")


async def _dlq_entry(pool: asyncpg.Pool, execution_id: str) -> asyncpg.Record:
    row = await pool.fetchrow(
        "SELECT * FROM execution_dlq WHERE execution_id = $1", uuid.UUID(execution_id)
    )
    assert row is not None
    return row


async def _open_dlq_gauge(http: httpx.AsyncClient) -> float:
    text = (await http.get("/metrics")).text
    (line,) = [line for line in text.splitlines() if line.startswith("opsexec_dlq_entries ")]
    return float(line.split()[1])


@pytest.mark.parametrize("died", ["before_running", "mid_step"])
async def test_cancelling_a_dead_lettered_execution_ends_it_and_closes_its_entry(
    http: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool, died: str
) -> None:
    """Nothing will run a dead letter, so its cancel cannot wait for a worker to see it."""
    execution_id = await _dead_lettered_execution(http, stocked, pool)
    if died == "mid_step":
        # What a worker that died inside step 1 leaves behind (the engine's own writes).
        async with transaction(pool) as connection:
            await executions_store.transition(
                connection,
                uuid.UUID(execution_id),
                stocked.id,
                expected="approved",
                to="running",
                actor_id=None,
            )
            (step,) = await steps_store.steps_of(connection, uuid.UUID(execution_id))
            await steps_store.start_step(connection, step["id"], 1)
    open_before = await _open_dlq_gauge(http)
    headers = bearer(stocked.admin_key)
    cancelled = await http.post(
        f"/v1/executions/{execution_id}/cancel", json={"reason": "give up"}, headers=headers
    )
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    entry = await _dlq_entry(pool, execution_id)
    assert entry["closed_reason"] == "cancelled"
    assert entry["closed_at"] is not None
    assert await _open_dlq_gauge(http) == open_before - 1
    steps = (await http.get(f"/v1/executions/{execution_id}/steps", headers=headers)).json()
    assert [s["status"] for s in steps] == ["cancelled"]
    if died == "mid_step":
        assert steps[0]["error_class"] == "IndeterminateStepOutcome"
    listed = [e for e in (await http.get("/v1/dlq", headers=headers)).json()]
    (shown,) = [e for e in listed if e["execution_id"] == execution_id]
    assert shown["closed_reason"] == "cancelled"
    again = await http.post(f"/v1/dlq/{entry['id']}/requeue", headers=headers)
    problem(again, 404, "not_found")
