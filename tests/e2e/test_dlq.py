"""A job whose lease keeps expiring lands in the DLQ with its event, and can be requeued."""

from __future__ import annotations

import json
import uuid

import asyncpg
import httpx
import pytest

from opsexec.queue.reaper import Reaper
from opsexec.store import queue as queue_store
from opsexec.store import transaction
from tests.conftest import ApiServer, TenantFixture, bearer, make_user
from tests.e2e.test_cli import opsexec_async
from tests.support import other_tenant_admin, problem

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
