"""The operator CLI as a user runs it: real processes against the real database and API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import SHARED_DIR, ApiServer, TenantFixture
from tests.support import opsexec_async

pytestmark = pytest.mark.postgres


def opsexec(*args: str, dsn: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "OPSEXEC_DATABASE_URL": dsn, **env}
    return subprocess.run(
        [sys.executable, "-m", "opsexec", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_admin_bootstrap_create_user_and_key(database_dsn: str, pool: asyncpg.Pool) -> None:
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    first = opsexec(
        "admin",
        "bootstrap",
        "--tenant",
        tenant,
        "--user",
        "root@example.com",
        "--roles",
        "admin",
        "--json",
        dsn=database_dsn,
    )
    assert first.returncode == 0, first.stderr
    created = json.loads(first.stdout)
    again = json.loads(
        opsexec(
            "admin",
            "bootstrap",
            "--tenant",
            tenant,
            "--user",
            "root@example.com",
            "--json",
            dsn=database_dsn,
        ).stdout
    )
    assert (again["tenant_id"], again["user_id"]) == (created["tenant_id"], created["user_id"])
    assert again["api_key"] != created["api_key"]

    user = opsexec(
        "admin",
        "create-user",
        "--tenant",
        tenant,
        "--user",
        "ops@example.com",
        "--roles",
        "operator,approver",
        "--json",
        dsn=database_dsn,
    )
    assert user.returncode == 0, user.stderr
    roles = await pool.fetchval(
        "SELECT roles FROM users WHERE id = $1", uuid.UUID(json.loads(user.stdout)["user_id"])
    )
    assert sorted(roles) == ["approver", "operator"]
    key = opsexec(
        "admin",
        "create-key",
        "--tenant",
        tenant,
        "--user",
        "ops@example.com",
        "--json",
        dsn=database_dsn,
    )
    assert json.loads(key.stdout)["api_key"].startswith("opx_")

    bad_role = opsexec(
        "admin",
        "create-user",
        "--tenant",
        tenant,
        "--user",
        "x@example.com",
        "--roles",
        "god",
        dsn=database_dsn,
    )
    assert bad_role.returncode != 0
    assert "unknown roles: god" in bad_role.stderr
    missing = opsexec(
        "admin", "create-key", "--tenant", tenant, "--user", "nobody", dsn=database_dsn
    )
    assert missing.returncode == 1
    assert "no user nobody" in missing.stderr


@pytest.mark.parametrize("fmt", ["yaml", "ini"])
async def test_assets_import(
    api_server: ApiServer,
    tenant: TenantFixture,
    pool: asyncpg.Pool,
    database_dsn: str,
    tmp_path: Path,
    fmt: str,
) -> None:
    if fmt == "yaml":
        source = SHARED_DIR / "plans" / "inventory.yaml"
        expected = 60
    else:
        source = tmp_path / "hosts.ini"
        source.write_text(
            "[web]\n"
            "web-01 ansible_host=10.0.1.11 ansible_port=2222 env=staging\n"
            "web-02 ansible_host=10.0.1.12 opsexec_credential=ssh-deploy\n"
            "[db]\n"
            "db-01 ansible_host=10.0.2.10 env=production\n"
            "[local]\n"
            "localhost ansible_connection=local\n"
            "[web:vars]\n"
            "http_port=80\n"
        )
        expected = 4
    result = await opsexec_async(
        "assets",
        "import",
        str(source),
        "--url",
        api_server.url,
        "--api-key",
        tenant.admin_key,
        dsn=database_dsn,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{expected} created, 0 updated"
    rows = await pool.fetch(
        "SELECT name, address, port, transport, environment, tags, credential_ref"
        " FROM assets WHERE tenant_id = $1 ORDER BY name",
        tenant.id,
    )
    assert len(rows) == expected
    if fmt == "ini":
        by_name = {r["name"]: r for r in rows}
        assert by_name["web-01"]["port"] == 2222
        assert by_name["web-01"]["environment"] == "staging"
        assert by_name["web-02"]["credential_ref"] == "ssh-deploy"
        assert by_name["db-01"]["tags"] == ["db"]
        assert by_name["localhost"]["transport"] == "local"


def test_assets_import_reports_a_bad_file(tmp_path: Path, database_dsn: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {name: ok, address: 1.2.3.4}\n- {name: bad, address: x, port: 99999}\n")
    result = opsexec("assets", "import", str(bad), "--api-key", "unused", dsn=database_dsn)
    assert result.returncode == 1
    assert "/1/port" in result.stderr
