"""Per-tenant rollout controls (R-ROLL): enable flag and maximum approval level."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import TenantFixture, bearer
from tests.support import count_plan, load, problem

pytestmark = pytest.mark.postgres


async def test_disabled_tenant_gets_503_with_its_code(
    http: httpx.AsyncClient, stocked: TenantFixture
) -> None:
    headers = bearer(stocked.admin_key)
    url = f"/v1/tenants/{stocked.id}/settings"
    assert (await http.patch(url, json={"enabled": False}, headers=headers)).status_code == 200
    refused = await http.post("/v1/executions", json={"plan": count_plan()}, headers=headers)
    assert problem(refused, 503, "service_disabled")["reason"] == "tenant_disabled"
    await http.patch(url, json={"enabled": True}, headers=headers)
    accepted = await http.post("/v1/executions", json={"plan": count_plan()}, headers=headers)
    assert accepted.status_code == 201


async def test_plan_above_the_tenant_maximum_level_is_refused(
    http: httpx.AsyncClient, stocked: TenantFixture
) -> None:
    headers = bearer(stocked.admin_key)
    url = f"/v1/tenants/{stocked.id}/settings"
    await http.patch(url, json={"max_approval_level": 1}, headers=headers)
    refused = await http.post(
        "/v1/executions", json={"plan": load("deploy_staging.json")}, headers=headers
    )
    body = problem(refused, 403, "approval_level_not_enabled")
    assert (body["approval_level"], body["max_approval_level"]) == (2, 1)
    allowed = await http.post(
        "/v1/executions", json={"plan": load("restart_nginx.json")}, headers=headers
    )
    assert allowed.status_code == 201
