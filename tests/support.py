"""Plans and assertions several test modules share."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from typing import Any

import asyncpg
import httpx

from opsexec.store import transaction
from opsexec.store.identity import create_api_key, ensure_tenant, ensure_user
from tests.conftest import SHARED_DIR

PLANS = SHARED_DIR / "plans"


def load(name: str) -> dict[str, Any]:
    """A plan from ``shared/plans``."""
    plan: dict[str, Any] = json.loads((PLANS / name).read_text())
    return plan


def count_plan(group_by: str = "tags") -> dict[str, Any]:
    return {
        "steps": [
            {
                "id": "count",
                "action": "inventory.count",
                "targets": [],
                "inputs": {"group_by": group_by},
                "estimated_duration_s": 1,
            }
        ]
    }


def shell_plan(command: str, target: str = "local-01") -> dict[str, Any]:
    return {
        "steps": [
            {
                "id": "run",
                "action": "shell.run",
                "targets": [target],
                "inputs": {"command": command},
                "estimated_duration_s": 1,
            }
        ]
    }


def problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Assert a problem+json response with ``status`` and ``code``; return its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    return body


async def other_tenant_admin(pool: asyncpg.Pool) -> str:
    """An administrator key of a brand-new, unrelated tenant."""
    async with transaction(pool) as connection:
        tenant_id = await ensure_tenant(connection, f"other-{uuid.uuid4().hex[:8]}")
        user_id = await ensure_user(connection, tenant_id, "admin@other", ["admin"])
        _, key = await create_api_key(connection, tenant_id, user_id)
    return key


async def opsexec_async(
    *args: str, dsn: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m opsexec ARGS`` without blocking the event loop (in-process servers)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "opsexec",
        *args,
        env={**os.environ, "OPSEXEC_DATABASE_URL": dsn, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return subprocess.CompletedProcess(args, process.returncode, stdout.decode(), stderr.decode())
