"""Approvals over real HTTP (R-APPR): levels, four eyes, binding to the plan, expiry."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from opsexec.engine.approvals import expire_due_approvals
from tests.conftest import TenantFixture, bearer, make_user
from tests.support import count_plan, load, other_tenant_admin, problem, shell_plan

pytestmark = pytest.mark.postgres
RUNBOOK = "https://runbooks.example.com/deploy-web"


@pytest.fixture
async def people(pool: asyncpg.Pool, stocked: TenantFixture) -> dict[str, tuple[uuid.UUID, str]]:
    return {
        role: await make_user(pool, stocked, [role])
        for role in ("deployer", "approver", "senior_approver", "viewer")
    }


async def submit(http: httpx.AsyncClient, key: str, plan: dict[str, Any], **extra: Any) -> Any:
    response = await http.post("/v1/executions", json={"plan": plan, **extra}, headers=bearer(key))
    assert response.status_code == 201, response.text
    return response.json()


def staging_deploy(version: str = "2.4.1") -> dict[str, Any]:
    plan = load("deploy_staging.json")
    plan["steps"][0]["inputs"]["version"] = version
    return plan


async def test_level_zero_needs_no_approval(
    http: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool
) -> None:
    execution = await submit(http, stocked.admin_key, count_plan("transport"))
    assert execution["approval_level"] == 0
    assert execution["approvals"] == []
    assert execution["status"] in {"approved", "running", "succeeded"}


async def test_level_one_is_confirmed_by_the_requester(
    http: httpx.AsyncClient, stocked: TenantFixture, people: Any
) -> None:
    _, deployer = people["deployer"]
    execution = await submit(http, deployer, shell_plan(f"echo {uuid.uuid4().hex}"))
    assert (execution["approval_level"], execution["status"]) == (1, "awaiting_approval")
    _, viewer = people["viewer"]
    denied = await http.post(f"/v1/executions/{execution['id']}/approve", headers=bearer(viewer))
    problem(denied, 403, "permission_denied")
    confirmed = await http.post(
        f"/v1/executions/{execution['id']}/approve",
        json={"reason": "looks right"},
        headers=bearer(deployer),
    )
    assert confirmed.status_code == 200, confirmed.text
    body = confirmed.json()
    assert body["status"] in {"approved", "running", "succeeded", "failed"}
    (approval,) = body["approvals"]
    assert approval["state"] == "approved"
    assert approval["auth_method"] == "api_key"
    assert approval["source_ip"] == "127.0.0.1"
    assert approval["reason"] == "looks right"


async def test_level_two_needs_runbook_and_a_second_person(
    http: httpx.AsyncClient, stocked: TenantFixture, people: Any, pool: asyncpg.Pool
) -> None:
    _, deployer = people["deployer"]
    no_runbook = staging_deploy()
    del no_runbook["runbook_url"]
    refused = await http.post("/v1/executions", json={"plan": no_runbook}, headers=bearer(deployer))
    assert problem(refused, 422, "runbook_required")["pointer"] == "/runbook_url"

    execution = await submit(http, deployer, staging_deploy("2.4.2"))
    assert execution["approval_level"] == 2
    url = f"/v1/executions/{execution['id']}/approve"
    own = await http.post(url, headers=bearer(deployer))
    assert problem(own, 403, "permission_denied")["reason"] == "four_eyes"

    approver_id, approver = people["approver"]
    approved = await http.post(url, json={"reason": "reviewed"}, headers=bearer(approver))
    assert approved.status_code == 200, approved.text
    assert approved.json()["status"] == "approved"
    (approval,) = approved.json()["approvals"]
    assert approval["approver_id"] == str(approver_id)
    assert approval["approver_principal"].startswith("approver-")
    assert approval["runbook_url"] == RUNBOOK
    released = await pool.fetchval(
        "SELECT available_at <= now() FROM execution_queue WHERE execution_id = $1",
        uuid.UUID(execution["id"]),
    )
    assert released is True


async def test_level_three_needs_a_senior_approver(
    http: httpx.AsyncClient, stocked: TenantFixture, people: Any
) -> None:
    _, deployer = people["deployer"]
    execution = await submit(http, deployer, load("deploy_prod_50.json"))
    assert execution["approval_level"] == 3
    url = f"/v1/executions/{execution['id']}/approve"
    _, approver = people["approver"]
    body = problem(await http.post(url, headers=bearer(approver)), 403, "permission_denied")
    assert body["required_role"] == "senior_approver"
    _, senior = people["senior_approver"]
    assert (await http.post(url, headers=bearer(senior))).json()["status"] == "approved"
    again = await http.post(url, headers=bearer(senior))
    problem(again, 409, "conflict")


async def test_rejection_ends_the_execution(
    http: httpx.AsyncClient, stocked: TenantFixture, people: Any, pool: asyncpg.Pool
) -> None:
    _, deployer = people["deployer"]
    execution = await submit(http, deployer, staging_deploy("9.9.9"))
    _, approver = people["approver"]
    url = f"/v1/executions/{execution['id']}/reject"
    problem(await http.post(url, json={}, headers=bearer(approver)), 422, "validation_error")
    rejected = await http.post(url, json={"reason": "not today"}, headers=bearer(approver))
    assert rejected.json()["status"] == "rejected"
    kinds = await pool.fetch(
        "SELECT event_kind FROM execution_events WHERE execution_id = $1 ORDER BY seq",
        uuid.UUID(execution["id"]),
    )
    assert "approval_rejected" in [k["event_kind"] for k in kinds]
    queue_status = await pool.fetchval(
        "SELECT status FROM execution_queue WHERE execution_id = $1", uuid.UUID(execution["id"])
    )
    assert queue_status == "completed"


async def test_expired_approval_rejects_the_execution(
    http: httpx.AsyncClient, stocked: TenantFixture, people: Any, pool: asyncpg.Pool
) -> None:
    _, deployer = people["deployer"]
    execution = await submit(http, deployer, staging_deploy("3.0.0"))
    execution_id = uuid.UUID(execution["id"])
    await pool.execute(
        "UPDATE approvals SET expires_at = now() - interval '1 second' WHERE execution_id = $1",
        execution_id,
    )
    _, approver = people["approver"]
    late = await http.post(f"/v1/executions/{execution_id}/approve", headers=bearer(approver))
    problem(late, 409, "approval_expired")
    status = await pool.fetchval("SELECT status FROM executions WHERE id = $1", execution_id)
    assert status == "rejected"
    states = await pool.fetch("SELECT state FROM approvals WHERE execution_id = $1", execution_id)
    assert [s["state"] for s in states] == ["expired"]
    kinds = await pool.fetch(
        "SELECT event_kind FROM execution_events WHERE execution_id = $1", execution_id
    )
    assert "approval_expired" in {k["event_kind"] for k in kinds}
    assert await expire_due_approvals(pool) == 0


async def test_amending_the_plan_voids_approvals_and_asks_again(
    http: httpx.AsyncClient, stocked: TenantFixture, people: Any
) -> None:
    _, deployer = people["deployer"]
    execution = await submit(http, deployer, staging_deploy("4.0.0"))
    amended = await http.put(
        f"/v1/executions/{execution['id']}/plan",
        json={"plan": staging_deploy("4.0.1")},
        headers=bearer(deployer),
    )
    assert amended.status_code == 200, amended.text
    body = amended.json()
    assert body["plan_hash"] != execution["plan_hash"]
    assert body["status"] == "awaiting_approval"
    old, new = body["approvals"]
    assert old["invalidated_at"] is not None
    assert (new["state"], new["plan_hash"]) == ("pending", body["plan_hash"])
    _, approver = people["approver"]
    approved = await http.post(
        f"/v1/executions/{execution['id']}/approve", headers=bearer(approver)
    )
    assert approved.json()["status"] == "approved"
    too_late = await http.put(
        f"/v1/executions/{execution['id']}/plan",
        json={"plan": staging_deploy("4.0.2")},
        headers=bearer(deployer),
    )
    problem(too_late, 409, "conflict")


async def test_tampered_snapshot_invalidates_the_approval(
    http: httpx.AsyncClient, stocked: TenantFixture, people: Any, pool: asyncpg.Pool
) -> None:
    _, deployer = people["deployer"]
    execution = await submit(http, deployer, staging_deploy("5.0.0"))
    execution_id = uuid.UUID(execution["id"])
    await pool.execute(
        """UPDATE executions
           SET plan_snapshot = jsonb_set(plan_snapshot, '{steps,0,inputs,version}', '"6.6.6"')
           WHERE id = $1""",
        execution_id,
    )
    _, approver = people["approver"]
    url = f"/v1/executions/{execution_id}/approve"
    problem(await http.post(url, headers=bearer(approver)), 409, "approval_invalidated")
    rows = await pool.fetch(
        "SELECT state, invalidated_at, plan_hash FROM approvals WHERE execution_id = $1"
        " ORDER BY created_at",
        execution_id,
    )
    assert rows[0]["invalidated_at"] is not None
    assert rows[1]["state"] == "pending"
    assert rows[1]["plan_hash"] != execution["plan_hash"]
    # The re-requested approval binds the snapshot as it now is; it can be decided.
    assert (await http.post(url, headers=bearer(approver))).json()["status"] == "approved"


async def test_auto_approval_policy_is_recorded(
    http: httpx.AsyncClient, stocked: TenantFixture, people: Any
) -> None:
    settings = await http.patch(
        f"/v1/tenants/{stocked.id}/settings",
        json={
            "auto_approval": [{"name": "ops-self-service", "roles": ["deployer"], "max_level": 1}]
        },
        headers=bearer(stocked.admin_key),
    )
    assert settings.status_code == 200, settings.text
    _, deployer = people["deployer"]
    execution = await submit(http, deployer, shell_plan(f"echo {uuid.uuid4().hex}"))
    assert execution["status"] in {"approved", "running", "succeeded", "failed"}
    (approval,) = execution["approvals"]
    assert approval["auto_approved"] is True
    assert approval["auto_approval_policy"] == "ops-self-service"
    level_two = await submit(http, deployer, staging_deploy("7.0.0"))
    assert level_two["status"] == "awaiting_approval"


async def test_foreign_execution_and_its_approval_are_invisible(
    http: httpx.AsyncClient, stocked: TenantFixture, people: Any, pool: asyncpg.Pool
) -> None:
    _, deployer = people["deployer"]
    execution = await submit(http, deployer, staging_deploy("8.0.0"))
    other = bearer(await other_tenant_admin(pool))
    for method, path in [
        ("GET", ""),
        ("GET", "/steps"),
        ("POST", "/approve"),
        ("PUT", "/plan"),
    ]:
        kwargs: dict[str, Any] = {"json": {"plan": count_plan()}} if method == "PUT" else {}
        response = await http.request(
            method, f"/v1/executions/{execution['id']}{path}", headers=other, **kwargs
        )
        problem(response, 404, "not_found")
    violations = await pool.fetch(
        """SELECT payload FROM execution_events
           WHERE execution_id = $1 AND event_kind = 'rbac_violation'""",
        uuid.UUID(execution["id"]),
    )
    assert len(violations) == 4
    assert all(v["payload"]["severity"] == "critical" for v in violations)
    pending = (await http.get("/v1/approvals", headers=other)).json()
    assert execution["id"] not in {p["execution_id"] for p in pending}
    mine = (await http.get("/v1/approvals", headers=bearer(stocked.admin_key))).json()
    assert execution["id"] in {p["execution_id"] for p in mine}
