"""Level-3 step gates in the background: park, free the worker, resume on approval."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import TenantFixture, bearer, make_user
from tests.worker_support import finished, start_worker, stop, wait_for

pytestmark = pytest.mark.postgres


async def test_gated_step_parks_the_execution_and_its_approval_resumes_it(
    http: httpx.AsyncClient,
    stocked: TenantFixture,
    pool: asyncpg.Pool,
    database_dsn: str,
    tmp_path: Path,
) -> None:
    trail = tmp_path / "trail"
    _, deployer = await make_user(pool, stocked, ["deployer"])
    _, senior = await make_user(pool, stocked, ["senior_approver"])
    plan = {
        "runbook_url": "https://runbooks.example.com/deploy-api-prod",
        "steps": [
            {
                "id": "precheck",
                "action": "shell.run",
                "targets": ["local-01"],
                "inputs": {"command": f"echo precheck >> {trail}"},
                "estimated_duration_s": 20,
            },
            {
                "id": "deploy",
                "action": "shell.run",
                "targets": ["local-01"],
                "inputs": {"command": f"echo deploy >> {trail}"},
                "estimated_duration_s": 20,
                "depends_on": ["precheck"],
                "requires_approval": True,
            },
        ],
    }
    execution = (
        await http.post("/v1/executions", json={"plan": plan}, headers=bearer(deployer))
    ).json()
    execution_id = execution["id"]
    assert (execution["approval_level"], execution["gated_step_ids"]) == (3, ["deploy"])
    approved = await http.post(f"/v1/executions/{execution_id}/approve", headers=bearer(senior))
    assert approved.json()["status"] == "approved"

    worker = await start_worker(database_dsn, tmp_path, "gatekeeper")
    try:

        async def parked() -> bool:
            """Awaiting its gate, and the job handed back (the worker settles it last)."""
            row = await pool.fetchrow(
                """SELECT e.status, q.status AS job, q.leased_by
                   FROM executions e JOIN execution_queue q ON q.execution_id = e.id
                   WHERE e.id = $1""",
                uuid.UUID(execution_id),
            )
            return bool(
                (row["status"], row["job"], row["leased_by"])
                == ("awaiting_approval", "queued", None)
            )

        await wait_for(parked, timeout=30)
        assert trail.read_text().split() == ["precheck"]
        gate = await pool.fetchrow(
            "SELECT step_number, state FROM approvals WHERE execution_id = $1"
            " AND step_number IS NOT NULL",
            uuid.UUID(execution_id),
        )
        assert (gate["step_number"], gate["state"]) == (2, "pending")

        # The freed worker takes other work meanwhile.
        other = (
            await http.post(
                "/v1/executions",
                json={
                    "plan": {
                        "steps": [
                            {
                                "id": "other",
                                "action": "shell.run",
                                "targets": ["local-01"],
                                "inputs": {"command": f"echo other >> {trail}"},
                                "estimated_duration_s": 20,
                            }
                        ]
                    },
                    "mode": "background",
                },
                headers=bearer(stocked.admin_key),
            )
        ).json()
        await http.post(f"/v1/executions/{other['id']}/approve", headers=bearer(stocked.admin_key))
        await wait_for(lambda: finished(pool, other["id"]), timeout=30)

        released = await http.post(
            f"/v1/executions/{execution_id}/approve",
            json={"step_number": 2, "reason": "precheck looks fine"},
            headers=bearer(senior),
        )
        assert released.status_code == 200, released.text
        row = await wait_for(lambda: finished(pool, execution_id), timeout=30)
    finally:
        await stop(worker)
        await asyncio.sleep(0)
    assert row["status"] == "succeeded"
    assert trail.read_text().split() == ["precheck", "other", "deploy"]
