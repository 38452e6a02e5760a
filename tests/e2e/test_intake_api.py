"""Intake over real HTTP: classification, idempotency, refusals (R-PLAN, R-CLASS, R-IDEM)."""

from __future__ import annotations

import asyncio
import copy
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from opsexec.store import transaction
from opsexec.store.executions import transition
from tests.conftest import TenantFixture, bearer, dump_database, make_user
from tests.support import count_plan, load, other_tenant_admin, problem, shell_plan

pytestmark = pytest.mark.postgres

EXPECTED = {
    "count_assets.json": (0, "fast", "immediate", "fast_read"),
    "planv1_count_assets.json": (0, "fast", "immediate", "fast_read"),
    "disk_usage_local.json": (0, "fast", "immediate", "fast_read"),
    "restart_nginx.json": (1, "medium", "background", "medium_modify"),
    "deploy_staging.json": (2, "long", "background", "long_deploy"),
    "deploy_prod_50.json": (3, "long", "background", "long_deploy"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_shared_plans_classify_as_documented(
    http: httpx.AsyncClient, stocked: TenantFixture, name: str
) -> None:
    response = await http.post(
        "/v1/executions", json={"plan": load(name)}, headers=bearer(stocked.admin_key)
    )
    assert response.status_code == 201, response.text
    body = response.json()
    level, sla, mode, policy = EXPECTED[name]
    assert (
        body["approval_level"],
        body["sla_class"],
        body["execution_mode"],
        body["timeout_policy_id"],
    ) == (level, sla, mode, policy)
    expected_status = "approved" if level == 0 else "awaiting_approval"
    assert body["status"] in {expected_status, "running", "succeeded"}
    if level == 3:
        assert "deploy" in body["gated_step_ids"]
    assert body["steps"]["total"] >= 1


async def test_steps_expand_per_target_in_sorted_order(
    http: httpx.AsyncClient, stocked: TenantFixture
) -> None:
    response = await http.post(
        "/v1/executions",
        json={"plan": load("deploy_prod_50.json")},
        headers=bearer(stocked.admin_key),
    )
    execution_id = response.json()["id"]
    steps = (
        await http.get(f"/v1/executions/{execution_id}/steps", headers=bearer(stocked.admin_key))
    ).json()
    assert len(steps) == 150
    assert [s["step_number"] for s in steps] == list(range(1, 151))
    precheck = [s["target_ref"] for s in steps if s["step_key"] == "precheck"]
    assert precheck == sorted(precheck)
    assert precheck[0] == "prod-001"
    deploy = [s for s in steps if s["step_key"] == "deploy"]
    assert all(s["max_retries"] == 0 for s in deploy), "deploy.script is not idempotent"


async def test_duplicate_submit_returns_the_same_execution(
    http: httpx.AsyncClient, stocked: TenantFixture
) -> None:
    body = {"plan": load("restart_nginx.json")}
    first = await http.post("/v1/executions", json=body, headers=bearer(stocked.admin_key))
    shuffled = copy.deepcopy(body)
    shuffled["plan"]["steps"][0] = dict(reversed(list(shuffled["plan"]["steps"][0].items())))
    second = await http.post("/v1/executions", json=shuffled, headers=bearer(stocked.admin_key))
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]


async def test_hundred_concurrent_identical_submits_make_one_row(
    http: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool
) -> None:
    plan = shell_plan("echo concurrent-" + uuid.uuid4().hex)
    responses = await asyncio.gather(
        *(
            http.post("/v1/executions", json={"plan": plan}, headers=bearer(stocked.admin_key))
            for _ in range(100)
        )
    )
    assert sorted(r.status_code for r in responses) == [200] * 99 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    rows = await pool.fetchval(
        "SELECT count(*) FROM executions WHERE tenant_id = $1 AND plan_snapshot::text LIKE $2",
        stocked.id,
        f"%{plan['steps'][0]['inputs']['command']}%",
    )
    assert rows == 1


async def _force_status(
    pool: asyncpg.Pool, tenant: TenantFixture, execution_id: str, path: list[str]
) -> None:
    current = await pool.fetchval(
        "SELECT status FROM executions WHERE id = $1", uuid.UUID(execution_id)
    )
    for target in path:
        async with transaction(pool) as connection:
            await transition(
                connection,
                uuid.UUID(execution_id),
                tenant.id,
                expected=current,
                to=target,
                actor_id=tenant.admin_id,
            )
        current = target


@pytest.mark.parametrize(
    "path",
    [["approved", "running", "failed"], ["cancelled"], ["rejected"]],
    ids=["failed", "cancelled", "rejected"],
)
async def test_retry_after_an_unsuccessful_end_creates_a_new_execution(
    http: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool, path: list[str]
) -> None:
    body = {"plan": shell_plan(f"echo {uuid.uuid4().hex}")}
    first = (await http.post("/v1/executions", json=body, headers=bearer(stocked.admin_key))).json()
    assert first["status"] == "awaiting_approval"
    await _force_status(pool, stocked, first["id"], path)
    again = await http.post("/v1/executions", json=body, headers=bearer(stocked.admin_key))
    assert again.status_code == 201
    assert again.json()["id"] != first["id"]


async def test_succeeded_execution_is_replayed_until_its_window_passes(
    http: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool
) -> None:
    body = {"plan": shell_plan(f"echo {uuid.uuid4().hex}")}
    headers = bearer(stocked.admin_key)
    first = (await http.post("/v1/executions", json=body, headers=headers)).json()
    await _force_status(pool, stocked, first["id"], ["approved", "running", "succeeded"])
    replay = await http.post("/v1/executions", json=body, headers=headers)
    assert (replay.status_code, replay.json()["id"]) == (200, first["id"])
    await pool.execute(
        """UPDATE executions SET ended_at = now() - interval '16 minutes',
               started_at = now() - interval '17 minutes',
               created_at = now() - interval '18 minutes'
           WHERE id = $1""",
        uuid.UUID(first["id"]),
    )
    fresh = await http.post("/v1/executions", json=body, headers=headers)
    assert fresh.status_code == 201
    assert fresh.json()["id"] != first["id"]


async def test_same_plan_in_another_tenant_is_another_execution(
    http: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool
) -> None:

    other_key = await other_tenant_admin(pool)
    plan = count_plan("environment")
    mine = await http.post("/v1/executions", json={"plan": plan}, headers=bearer(stocked.admin_key))
    theirs = await http.post("/v1/executions", json={"plan": plan}, headers=bearer(other_key))
    assert mine.status_code == theirs.status_code == 201
    assert mine.json()["id"] != theirs.json()["id"]


async def test_client_idempotency_key_is_honoured_and_tenant_scoped(
    http: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool
) -> None:

    key = {"Idempotency-Key": f"deploy-{uuid.uuid4().hex}"}
    headers = bearer(stocked.admin_key) | key
    body = {"plan": shell_plan("uptime")}
    first = await http.post("/v1/executions", json=body, headers=headers)
    again = await http.post("/v1/executions", json=body, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    other = await http.post("/v1/executions", json={"plan": shell_plan("id")}, headers=headers)
    problem(other, 409, "idempotency_key_reused")
    foreign = await http.post(
        "/v1/executions",
        json={"plan": count_plan()},
        headers=bearer(await other_tenant_admin(pool)) | key,
    )
    assert foreign.status_code == 201


# --- refusals ---------------------------------------------------------------------------


def _step(**overrides: Any) -> dict[str, Any]:
    return {
        "id": "s",
        "action": "host.uptime",
        "targets": ["local-01"],
        "inputs": {},
        "estimated_duration_s": 1,
    } | overrides


REFUSALS: dict[str, tuple[dict[str, Any], str, str]] = {
    "unknown_action": (
        {"steps": [_step(action="rm.everything")]},
        "unknown_action",
        "/plan/steps/0/action",
    ),
    "bad_inputs": (
        {"steps": [_step(action="host.disk_usage", inputs={"path": 42})]},
        "invalid_inputs",
        "/plan/steps/0/inputs/path",
    ),
    "cycle": (
        {"steps": [_step(id="a", depends_on=["b"]), _step(id="b", depends_on=["a"])]},
        "dependency_cycle",
        "/plan/steps/0/depends_on",
    ),
    "missing_dependency": (
        {"steps": [_step(depends_on=["ghost"])]},
        "unknown_dependency",
        "/plan/steps/0/depends_on/0",
    ),
    "duplicate_ids": (
        {"steps": [_step(), _step()]},
        "duplicate_step_id",
        "/plan/steps/1/id",
    ),
    "unknown_target": (
        {"steps": [_step(targets=["local-01", "nowhere-99"])]},
        "unknown_target",
        "/plan/steps/0/targets/1",
    ),
    "too_many_steps": (
        {"steps": [_step(id=f"s{i}") for i in range(201)]},
        "too_many_steps",
        "/plan/steps",
    ),
    "too_many_targets": (
        {"steps": [_step(targets=[f"h{i}" for i in range(1001)])]},
        "too_many_targets",
        "/plan/steps/0/targets",
    ),
    "too_many_step_targets": (
        {"steps": [_step(id=f"s{i}", targets=[f"h{j}" for j in range(1000)]) for i in range(11)]},
        "too_many_step_targets",
        "/plan/steps",
    ),
    "too_large": (
        {"steps": [_step()], "metadata": {"blob": "x" * (257 * 1024)}},
        "plan_too_large",
        "/plan",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_refusals_name_code_and_pointer(
    http: httpx.AsyncClient, stocked: TenantFixture, case: str
) -> None:
    plan, code, pointer = REFUSALS[case]
    response = await http.post(
        "/v1/executions", json={"plan": plan}, headers=bearer(stocked.admin_key)
    )
    body = problem(response, 422, code)
    assert body["pointer"].startswith(pointer), body


async def test_foreign_tenant_target_is_unknown(
    http: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool
) -> None:

    other_key = await other_tenant_admin(pool)
    response = await http.post(
        "/v1/executions",
        json={"plan": shell_plan("id", target="web-01")},
        headers=bearer(other_key),
    )
    assert problem(response, 422, "unknown_target")["pointer"] == "/plan/steps/0/targets/0"


async def test_literal_secret_in_a_list_is_refused_and_never_stored(
    http: httpx.AsyncClient, stocked: TenantFixture, database_dsn: str, caplog: Any
) -> None:
    literal = f"hunter2-{uuid.uuid4().hex}"
    plan = shell_plan("deploy")
    plan["steps"][0]["inputs"]["env"] = {"CONFIG": [{"api_key": literal}]}
    plan["steps"][0]["inputs"]["env"] = {"DB_PASSWORD": literal}
    response = await http.post(
        "/v1/executions", json={"plan": plan}, headers=bearer(stocked.admin_key)
    )
    body = problem(response, 422, "literal_secret")
    assert body["pointer"] == "/plan/steps/0/inputs/env/DB_PASSWORD"
    assert literal not in response.text

    nested = count_plan()
    nested["metadata"] = {"notes": [{"ok": 1}, {"token": literal}]}
    response = await http.post(
        "/v1/executions", json={"plan": nested}, headers=bearer(stocked.admin_key)
    )
    body = problem(response, 422, "literal_secret")
    assert body["pointer"] == "/plan/metadata/notes/1/token"
    assert literal not in response.text
    assert literal not in dump_database(database_dsn)
    assert literal not in caplog.text


async def test_immediate_mode_for_a_slow_plan_is_refused(
    http: httpx.AsyncClient, stocked: TenantFixture
) -> None:
    response = await http.post(
        "/v1/executions",
        json={"plan": load("restart_nginx.json"), "mode": "immediate"},
        headers=bearer(stocked.admin_key),
    )
    assert problem(response, 422, "immediate_not_allowed")["pointer"] == "/mode"


async def test_malformed_bodies_are_422_never_500(
    http: httpx.AsyncClient, stocked: TenantFixture
) -> None:
    headers = bearer(stocked.admin_key) | {"Content-Type": "application/json"}
    for raw in [b"{", b"[]", b'{"plan": 5}', b'{"plan": {"steps": "x"}}', b'{"plan": {}}']:
        response = await http.post("/v1/executions", content=raw, headers=headers)
        assert response.status_code == 422, (raw, response.text)
        assert "code" in response.json()


async def test_missing_permission_is_403(
    http: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool
) -> None:
    _, viewer = await make_user(pool, stocked, ["viewer"])
    response = await http.post(
        "/v1/executions", json={"plan": shell_plan("id")}, headers=bearer(viewer)
    )
    assert problem(response, 403, "permission_denied")["pointer"] == "/plan/steps/0/action"
    _, operator = await make_user(pool, stocked, ["operator"])
    response = await http.post(
        "/v1/executions", json={"plan": load("deploy_staging.json")}, headers=bearer(operator)
    )
    assert problem(response, 403, "permission_denied")["permission"] == "automation:deploy"


async def test_listing_filters_and_pages(http: httpx.AsyncClient, stocked: TenantFixture) -> None:
    headers = bearer(stocked.admin_key)
    for i in range(5):
        await http.post("/v1/executions", json={"plan": shell_plan(f"echo {i}")}, headers=headers)
    page = (await http.get("/v1/executions", params={"limit": 2}, headers=headers)).json()
    assert len(page["items"]) == 2
    second = (
        await http.get(
            "/v1/executions", params={"limit": 2, "cursor": page["next_cursor"]}, headers=headers
        )
    ).json()
    assert not {i["id"] for i in page["items"]} & {i["id"] for i in second["items"]}
    waiting = (
        await http.get("/v1/executions", params={"status": "awaiting_approval"}, headers=headers)
    ).json()
    assert {i["status"] for i in waiting["items"]} == {"awaiting_approval"}
    bad = await http.get("/v1/executions", params={"cursor": "nonsense"}, headers=headers)
    problem(bad, 422, "validation_error")
