"""The credentials API over real HTTP: write-only values, admin only, tenant isolation, and a
planted value that must not surface in any response, log record or database byte."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from opsexec.config import Settings
from opsexec.safety.secrets import DatabaseSecretBackend, MasterKey, load_master_key
from tests.conftest import TenantFixture, bearer, dump_database, free_port, make_user
from tests.support import other_tenant_admin, problem

pytestmark = pytest.mark.postgres

METADATA_FIELDS = {"id", "name", "kind", "username", "key_id", "created_at", "updated_at"}


@dataclass(frozen=True)
class CredentialsServer:
    url: str
    settings: Settings


@pytest.fixture(scope="module")
async def credentials_server(
    database_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[CredentialsServer]:
    """The real app plus the credentials router, behind uvicorn on a loopback port."""
    import uvicorn

    from opsexec.api.app import create_app
    from opsexec.api.routes import credentials

    settings = Settings(
        database_url=database_dsn,
        data_dir=tmp_path_factory.mktemp("credentials-data"),
        secret_key=None,
    )
    app = create_app(settings)
    if not any(getattr(route, "path", "").startswith("/v1/credentials") for route in app.routes):
        app.include_router(credentials.router)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    try:
        yield CredentialsServer(url=f"http://127.0.0.1:{port}", settings=settings)
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def client(credentials_server: CredentialsServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=credentials_server.url, timeout=30) as http:
        yield http


@pytest.fixture
def raw_log_messages() -> Iterator[list[str]]:
    """Every log message as rendered when the record is *created*, before any handler's
    masking filter could rewrite it, so a leak cannot hide behind sink masking."""
    messages: list[str] = []
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            messages.append(f"{record.getMessage()} {record.args!r} {record.exc_text or ''}")
        except Exception as exc:  # a broken %-format is the caller's bug, not ours
            messages.append(f"{record.msg!r} {record.args!r} {exc!r}")
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield messages
    finally:
        logging.setLogRecordFactory(previous)


def planted() -> str:
    return f"plnt-{secrets.token_hex(16)}"


def new_name() -> str:
    return f"cred-{uuid.uuid4().hex[:8]}"


async def test_create_list_get_replace_delete(
    client: httpx.AsyncClient, tenant: TenantFixture, pool: asyncpg.Pool
) -> None:
    admin = bearer(tenant.admin_key)
    value, replacement = planted(), planted()
    name = f"team/{new_name()}"  # names may contain "/", as references may
    responses: list[httpx.Response] = []

    created = await client.post(
        "/v1/credentials",
        json={"name": name, "kind": "password", "value": value, "username": "app"},
        headers=admin,
    )
    responses.append(created)
    assert created.status_code == 201, created.text
    body = created.json()
    assert set(body) == METADATA_FIELDS
    assert (body["name"], body["kind"], body["username"]) == (name, "password", "app")
    assert len(body["key_id"]) == 16

    replaced = await client.post(
        "/v1/credentials",
        json={"name": name, "kind": "token", "value": replacement},
        headers=admin,
    )
    responses.append(replaced)
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["id"] == body["id"]
    assert (replaced.json()["kind"], replaced.json()["username"]) == ("token", None)
    assert replaced.json()["created_at"] == body["created_at"]

    listed = await client.get("/v1/credentials", headers=admin)
    responses.append(listed)
    assert listed.status_code == 200
    assert [c["name"] for c in listed.json()] == [name]
    assert all(set(c) == METADATA_FIELDS for c in listed.json())

    fetched = await client.get(f"/v1/credentials/{name}", headers=admin)
    responses.append(fetched)
    assert fetched.status_code == 200
    assert fetched.json() == replaced.json()

    deleted = await client.delete(f"/v1/credentials/{name}", headers=admin)
    responses.append(deleted)
    assert deleted.status_code == 204
    responses.append(await client.get(f"/v1/credentials/{name}", headers=admin))
    problem(responses[-1], 404, "not_found")
    responses.append(await client.delete(f"/v1/credentials/{name}", headers=admin))
    problem(responses[-1], 404, "not_found")

    for response in responses:
        assert value not in response.text
        assert replacement not in response.text

    async with pool.acquire() as connection:
        audit = await connection.fetch(
            """SELECT event_kind, payload, actor_id FROM audit_log
                WHERE tenant_id = $1 AND event_kind LIKE 'credential_%' ORDER BY seq""",
            tenant.id,
        )
    assert [(r["event_kind"], r["payload"]) for r in audit] == [
        ("credential_created", {"name": name, "kind": "password"}),
        ("credential_replaced", {"name": name, "kind": "token"}),
        ("credential_deleted", {"name": name, "kind": "token"}),
    ]
    assert {r["actor_id"] for r in audit} == {tenant.admin_id}


async def test_only_administrators(
    client: httpx.AsyncClient, tenant: TenantFixture, pool: asyncpg.Pool
) -> None:
    name = new_name()
    created = await client.post(
        "/v1/credentials",
        json={"name": name, "kind": "generic", "value": planted()},
        headers=bearer(tenant.admin_key),
    )
    assert created.status_code == 201
    for roles in (["operator"], ["deployer", "approver"], ["viewer"]):
        _, key = await make_user(pool, tenant, roles)
        headers = bearer(key)
        attempt = {"name": new_name(), "kind": "token", "value": planted()}
        problem(
            await client.post("/v1/credentials", json=attempt, headers=headers),
            403,
            "permission_denied",
        )
        problem(await client.get("/v1/credentials", headers=headers), 403, "permission_denied")
        problem(
            await client.get(f"/v1/credentials/{name}", headers=headers), 403, "permission_denied"
        )
        problem(
            await client.delete(f"/v1/credentials/{name}", headers=headers),
            403,
            "permission_denied",
        )
    problem(await client.get("/v1/credentials"), 401, "unauthenticated")


async def test_another_tenants_credential_is_not_found(
    client: httpx.AsyncClient, tenant: TenantFixture, pool: asyncpg.Pool
) -> None:
    name = new_name()
    created = await client.post(
        "/v1/credentials",
        json={"name": name, "kind": "ssh_key", "value": planted()},
        headers=bearer(tenant.admin_key),
    )
    assert created.status_code == 201
    stranger = bearer(await other_tenant_admin(pool))
    problem(await client.get(f"/v1/credentials/{name}", headers=stranger), 404, "not_found")
    problem(await client.delete(f"/v1/credentials/{name}", headers=stranger), 404, "not_found")
    assert (await client.get("/v1/credentials", headers=stranger)).json() == []
    # The same name in the other tenant is a separate credential, not a replacement.
    own = await client.post(
        "/v1/credentials",
        json={"name": name, "kind": "token", "value": planted()},
        headers=stranger,
    )
    assert own.status_code == 201
    mine = await client.get(f"/v1/credentials/{name}", headers=bearer(tenant.admin_key))
    assert mine.json()["kind"] == "ssh_key"


async def test_invalid_requests_are_422_with_a_pointer_and_never_echo_the_value(
    client: httpx.AsyncClient, tenant: TenantFixture
) -> None:
    admin = bearer(tenant.admin_key)
    value = planted()
    good = {"name": new_name(), "kind": "password", "value": value}
    cases: list[tuple[dict[str, Any], str]] = [
        ({**good, "kind": "certificate"}, "/kind"),
        ({**good, "name": "has space"}, "/name"),
        ({**good, "name": "env:DB_PASSWORD"}, "/name"),
        ({**good, "value": "abc"}, "/value"),
        ({**good, "value": value + "x" * (64 * 1024)}, "/value"),
        ({**good, "value": {"nested": value}}, "/value"),
        ({**good, "value": [value]}, "/value"),
        ({**good, "note": value}, "/note"),
        ({"name": good["name"], "kind": "password"}, "/value"),
    ]
    for payload, pointer in cases:
        response = await client.post("/v1/credentials", json=payload, headers=admin)
        body = problem(response, 422, "validation_error")
        assert body["pointer"] == pointer, body
        assert value not in response.text
    assert (await client.get(f"/v1/credentials/{good['name']}", headers=admin)).status_code == 404


async def test_planted_value_is_nowhere_but_in_the_ciphertext(
    client: httpx.AsyncClient,
    credentials_server: CredentialsServer,
    tenant: TenantFixture,
    pool: asyncpg.Pool,
    database_dsn: str,
    caplog: pytest.LogCaptureFixture,
    raw_log_messages: list[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    admin = bearer(tenant.admin_key)
    value, replacement = planted(), planted()
    name = new_name()
    texts: list[str] = []
    for payload in (
        {"name": name, "kind": "password", "value": value, "username": "svc"},
        {"name": name, "kind": "password", "value": replacement},
        {"name": name, "kind": "nonsense", "value": value},  # a refused request too
    ):
        texts.append((await client.post("/v1/credentials", json=payload, headers=admin)).text)
    texts.append((await client.get("/v1/credentials", headers=admin)).text)
    texts.append((await client.get(f"/v1/credentials/{name}", headers=admin)).text)

    # The value really is stored (else this test would prove nothing): the key the server
    # created in its data dir decrypts it.
    key: MasterKey = load_master_key(credentials_server.settings)
    resolved = await DatabaseSecretBackend(pool, key).resolve(tenant.id, name)
    assert resolved.value == replacement

    forms = {
        form
        for secret in (value, replacement)
        for form in (
            secret,
            secret.encode().hex(),  # how pg_dump renders bytea
            base64.b64encode(secret.encode()).decode(),
        )
    }
    dump = dump_database(database_dsn)
    assert name in dump  # the dump does contain this tenant's credential row
    logged = (
        caplog.text
        + "\n".join(f"{record.__dict__!r}" for record in caplog.records)
        + "\n".join(raw_log_messages)
    )
    assert any(record.name == "opsexec.api.routes.credentials" for record in caplog.records)
    assert any(name in message for message in raw_log_messages)
    for form in forms:
        assert form not in dump
        assert form not in logged
        for text in texts:
            assert form not in text
    row = await pool.fetchrow(
        "SELECT ciphertext, nonce FROM credentials WHERE tenant_id = $1 AND name = $2",
        tenant.id,
        name,
    )
    assert row is not None
    for secret in (value, replacement):
        assert secret.encode() not in row["ciphertext"]


async def test_key_file_is_created_in_the_data_dir(
    client: httpx.AsyncClient, credentials_server: CredentialsServer, tenant: TenantFixture
) -> None:
    created = await client.post(
        "/v1/credentials",
        json={"name": new_name(), "kind": "token", "value": planted()},
        headers=bearer(tenant.admin_key),
    )
    key_file = Path(credentials_server.settings.data_dir) / "secret.key"
    assert key_file.exists()
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert created.json()["key_id"] == load_master_key(credentials_server.settings).key_id
