"""Identity, tenant settings and inventory over real HTTP (R-RBAC, isolation, hashed keys)."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest
import yaml

from tests.conftest import (
    SHARED_DIR,
    ApiServer,
    TenantFixture,
    bearer,
    dump_database,
    make_user,
)
from tests.support import other_tenant_admin, problem

pytestmark = pytest.mark.postgres


async def test_missing_wrong_and_malformed_keys_are_401(http: httpx.AsyncClient) -> None:
    problem(await http.get("/v1/assets"), 401, "unauthenticated")
    problem(await http.get("/v1/assets", headers=bearer("opx_nope")), 401, "unauthenticated")
    response = await http.get("/v1/assets", headers={"Authorization": "Basic abc"})
    problem(response, 401, "unauthenticated")
    assert response.headers["www-authenticate"] == "Bearer"


async def test_user_lifecycle_and_key_revocation(
    http: httpx.AsyncClient, tenant: TenantFixture, database_dsn: str
) -> None:
    admin = bearer(tenant.admin_key)
    created = await http.post(
        "/v1/users", json={"principal": "ops@example.com", "roles": ["operator"]}, headers=admin
    )
    assert created.status_code == 201, created.text
    user_id = created.json()["id"]
    again = await http.post(
        "/v1/users", json={"principal": "ops@example.com", "roles": ["operator"]}, headers=admin
    )
    problem(again, 409, "conflict")

    key_response = await http.post("/v1/api-keys", json={"user_id": user_id}, headers=admin)
    assert key_response.status_code == 201
    key = key_response.json()["api_key"]
    assert (await http.get("/v1/assets", headers=bearer(key))).status_code == 200

    # The database holds the digest, never the key.
    assert key not in dump_database(database_dsn)

    # Operators are not administrators.
    problem(await http.get("/v1/users", headers=bearer(key)), 403, "permission_denied")

    disabled = await http.patch(f"/v1/users/{user_id}", json={"disabled": True}, headers=admin)
    assert disabled.json()["disabled"] is True
    problem(await http.get("/v1/assets", headers=bearer(key)), 401, "unauthenticated")
    await http.patch(f"/v1/users/{user_id}", json={"disabled": False}, headers=admin)
    assert (await http.get("/v1/assets", headers=bearer(key))).status_code == 200

    key_id = key_response.json()["id"]
    assert (await http.delete(f"/v1/api-keys/{key_id}", headers=admin)).status_code == 204
    problem(await http.get("/v1/assets", headers=bearer(key)), 401, "unauthenticated")
    listed = (await http.get("/v1/api-keys", headers=admin, params={"user_id": user_id})).json()
    assert listed[0]["revoked_at"] is not None
    assert "api_key" not in listed[0]


async def test_unknown_role_is_refused_with_pointer(
    http: httpx.AsyncClient, tenant: TenantFixture
) -> None:
    response = await http.post(
        "/v1/users",
        json={"principal": "x@example.com", "roles": ["root"]},
        headers=bearer(tenant.admin_key),
    )
    body = problem(response, 422, "validation_error")
    assert body["pointer"] == "/roles"


async def test_tenant_settings_merge_validate_and_audit(
    http: httpx.AsyncClient, tenant: TenantFixture, pool: asyncpg.Pool
) -> None:
    admin = bearer(tenant.admin_key)
    url = f"/v1/tenants/{tenant.id}/settings"
    defaults = (await http.get(url, headers=admin)).json()
    assert defaults["enabled"] is True
    assert defaults["max_approval_level"] == 3

    changed = await http.patch(url, json={"max_approval_level": 1}, headers=admin)
    assert changed.json()["max_approval_level"] == 1
    assert changed.json()["enabled"] is True

    bad = await http.patch(url, json={"max_approval_level": 7}, headers=admin)
    assert problem(bad, 422, "validation_error")["pointer"] == "/max_approval_level"
    unknown = await http.patch(url, json={"colour": "red"}, headers=admin)
    assert problem(unknown, 422, "validation_error")["pointer"] == "/colour"

    kinds = await pool.fetch(
        "SELECT event_kind FROM audit_log WHERE tenant_id = $1 ORDER BY seq", tenant.id
    )
    assert [r["event_kind"] for r in kinds] == ["settings_changed"]


async def test_foreign_tenant_settings_are_404_and_recorded(
    http: httpx.AsyncClient, tenant: TenantFixture, pool: asyncpg.Pool
) -> None:
    other = uuid.uuid4()
    response = await http.get(f"/v1/tenants/{other}/settings", headers=bearer(tenant.admin_key))
    problem(response, 404, "not_found")
    row = await pool.fetchrow(
        "SELECT severity, payload FROM audit_log WHERE tenant_id = $1 AND event_kind = $2",
        tenant.id,
        "rbac_violation",
    )
    assert row["severity"] == "critical"
    assert row["payload"]["resource"] == "tenant"


def _shared_inventory() -> list[dict[str, object]]:
    assets: list[dict[str, object]] = yaml.safe_load(
        (SHARED_DIR / "plans" / "inventory.yaml").read_text()
    )
    return assets


async def test_assets_crud_and_isolation(
    http: httpx.AsyncClient, tenant: TenantFixture, pool: asyncpg.Pool, api_server: ApiServer
) -> None:
    admin = bearer(tenant.admin_key)
    inventory = _shared_inventory()
    written = await http.post("/v1/assets", json=inventory, headers=admin)
    assert written.status_code == 201, written.text
    assert written.json()["created"] == len(inventory)
    rewritten = await http.post("/v1/assets", json=inventory[:2], headers=admin)
    assert rewritten.json() == {**rewritten.json(), "created": 0, "updated": 2}

    _, viewer_key = await make_user(pool, tenant, ["viewer"])
    listed = (await http.get("/v1/assets", headers=bearer(viewer_key))).json()
    assert len(listed) == len(inventory)
    production = await http.get(
        "/v1/assets", params={"environment": "production"}, headers=bearer(viewer_key)
    )
    assert {a["name"] for a in production.json()} >= {"db-prod", "ws-01", "prod-050"}
    windows = await http.get("/v1/assets", params={"tag": "windows"}, headers=admin)
    assert len(windows.json()) == 6

    single = await http.post(
        "/v1/assets",
        json={"name": "solo", "address": "127.0.0.1", "transport": "local"},
        headers=admin,
    )
    solo = single.json()["assets"][0]
    assert (await http.get(f"/v1/assets/{solo['id']}", headers=admin)).json()["name"] == "solo"
    problem(
        await http.post("/v1/assets", json=solo | {"id": None}, headers=bearer(viewer_key)),
        403,
        "permission_denied",
    )
    replaced = await http.put(
        f"/v1/assets/{solo['id']}",
        json={"name": "solo", "address": "127.0.0.2", "transport": "local", "tags": ["x"]},
        headers=admin,
    )
    assert replaced.json()["address"] == "127.0.0.2"
    clash = await http.put(
        f"/v1/assets/{solo['id']}",
        json={"name": "web-01", "address": "127.0.0.2", "transport": "local"},
        headers=admin,
    )
    assert problem(clash, 409, "conflict")["pointer"] == "/name"

    # Another tenant's administrator cannot see, change or delete it, and is recorded.
    other_tenant_key = await other_tenant_admin(pool)
    for method in ("GET", "DELETE"):
        response = await http.request(
            method, f"/v1/assets/{solo['id']}", headers=bearer(other_tenant_key)
        )
        problem(response, 404, "not_found")
    violations = await pool.fetchval(
        """SELECT count(*) FROM audit_log
           WHERE event_kind = 'rbac_violation' AND payload->>'id' = $1""",
        solo["id"],
    )
    assert violations == 2

    assert (await http.delete(f"/v1/assets/{solo['id']}", headers=admin)).status_code == 204
    problem(await http.get(f"/v1/assets/{solo['id']}", headers=admin), 404, "not_found")


async def test_invalid_asset_names_the_field(
    http: httpx.AsyncClient, tenant: TenantFixture
) -> None:
    response = await http.post(
        "/v1/assets",
        json=[{"name": "ok", "address": "1.2.3.4"}, {"name": "bad", "address": "x", "port": 0}],
        headers=bearer(tenant.admin_key),
    )
    body = problem(response, 422, "validation_error")
    assert str(body["pointer"]).endswith("/1/port")


def test_shared_inventory_path_exists() -> None:
    assert Path(SHARED_DIR / "plans" / "inventory.yaml").is_file()


async def test_me_tells_any_caller_who_they_are_and_their_tenant_id(
    http: httpx.AsyncClient, tenant: TenantFixture, pool: asyncpg.Pool
) -> None:
    viewer_id, viewer = await make_user(pool, tenant, ["viewer"])
    response = await http.get("/v1/me", headers=bearer(viewer))
    assert response.status_code == 200, response.text
    me = response.json()
    assert (me["user_id"], me["tenant_id"], me["tenant_name"]) == (
        str(viewer_id),
        str(tenant.id),
        tenant.name,
    )
    assert me["roles"] == ["viewer"]
    assert "admin" not in me["permissions"]
    admin = (await http.get("/v1/me", headers=bearer(tenant.admin_key))).json()
    assert "admin" in admin["permissions"]
    settings = await http.get(
        f"/v1/tenants/{admin['tenant_id']}/settings", headers=bearer(tenant.admin_key)
    )
    assert settings.status_code == 200
    assert (await http.get("/v1/me")).status_code == 401
