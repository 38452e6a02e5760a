"""The client commands as a person or a script runs them: real processes, real server.

``opsexec submit --watch`` follows a background execution to its end and exits 0 when it
succeeded and non-zero when it failed; ``watch``, ``approve``, ``reject``, ``cancel`` and
``executions list`` work with ``--json`` and exit with codes a script can branch on.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ApiServer, TenantFixture, bearer
from tests.live_support import chain_plan, live_api, submit

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
async def live(
    database_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ApiServer]:
    async with live_api(database_dsn, tmp_path_factory.mktemp("cli-client")) as server:
        yield server


@pytest.fixture
async def client(live: ApiServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
        yield http


@pytest.fixture
async def auto_approving(client: httpx.AsyncClient, stocked: TenantFixture) -> TenantFixture:
    """The tenant's admins get level-1 plans approved on submit, so --watch sees a full run."""
    response = await client.patch(
        f"/v1/tenants/{stocked.id}/settings",
        json={"auto_approval": [{"name": "ops-on-call", "roles": ["admin"], "max_level": 1}]},
        headers=bearer(stocked.admin_key),
    )
    assert response.status_code == 200, response.text
    return stocked


async def opsexec(live: ApiServer, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess; the server runs in this event loop, so await, don't block."""
    environment = {**os.environ, "OPSEXEC_URL": live.url, "OPSEXEC_API_KEY": key}
    environment["COLUMNS"] = "200"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "opsexec",
        *args,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=90)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return subprocess.CompletedProcess(args, process.returncode, stdout.decode(), stderr.decode())


def plan_file(tmp_path: Path, plan: dict[str, Any]) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return path


async def test_submit_watch_shows_progress_to_completion_and_exits_zero(
    live: ApiServer, auto_approving: TenantFixture, tmp_path: Path
) -> None:
    plan = plan_file(tmp_path, chain_plan(3, "sleep 0.3; echo cli-{n}"))
    result = await opsexec(
        live, auto_approving.admin_key, "submit", str(plan), "--mode", "background", "--watch"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    kinds = [line.split()[1] for line in lines if line.startswith("#")]
    assert kinds[0] == "execution_started"
    assert kinds[-1] == "execution_completed"
    assert kinds.count("step_completed") == 3
    step_lines = [line for line in lines if " step_completed " in line]
    for done, line in enumerate(step_lines, start=1):
        assert f" {done}/3 " in line, line  # the progress each event carries
    assert "100.0%" in step_lines[-1]
    assert "end: succeeded 3/3 steps (100%)" in result.stdout
    assert "cli-3" in result.stdout


async def test_submit_watch_exits_non_zero_when_the_execution_fails(
    live: ApiServer, auto_approving: TenantFixture, tmp_path: Path
) -> None:
    plan = plan_file(tmp_path, chain_plan(2, "echo broken-{n}; exit 3"))
    result = await opsexec(
        live, auto_approving.admin_key, "submit", str(plan), "--mode", "background", "--watch"
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "execution_failed" in result.stdout
    assert "end: failed" in result.stdout


async def test_commands_for_scripts_list_approve_watch_reject_cancel(
    live: ApiServer, client: httpx.AsyncClient, stocked: TenantFixture
) -> None:
    key = stocked.admin_key
    first = await submit(client, key, chain_plan(1, "echo approved-by-cli"))
    second = await submit(client, key, chain_plan(1, "echo rejected-by-cli"))
    third = await submit(client, key, chain_plan(1, "echo cancelled-by-cli"))

    listed = await opsexec(
        live, key, "executions", "list", "--status", "awaiting_approval", "--json"
    )
    assert listed.returncode == 0, listed.stderr
    waiting = {item["id"] for item in json.loads(listed.stdout)}
    assert {first["id"], second["id"], third["id"]} <= waiting

    approved = await opsexec(live, key, "approve", first["id"], "--reason", "looks right", "--json")
    assert approved.returncode == 0, approved.stderr
    assert json.loads(approved.stdout)["status"] in {"approved", "running", "succeeded"}
    watched = await opsexec(live, key, "watch", first["id"], "--json")
    assert watched.returncode == 0, watched.stdout + watched.stderr
    messages = [json.loads(line) for line in watched.stdout.splitlines()]
    assert messages[0]["kind"] == "execution_started"
    assert messages[-1]["type"] == "end"
    assert messages[-1]["status"] == "succeeded"
    seqs = [m["seq"] for m in messages if m["type"] == "event"]
    assert seqs == sorted(set(seqs))

    missing_reason = await opsexec(live, key, "reject", second["id"])
    assert missing_reason.returncode != 0
    rejected = await opsexec(live, key, "reject", second["id"], "--reason", "not today")
    assert rejected.returncode == 0, rejected.stdout + rejected.stderr
    assert "rejected" in rejected.stdout
    assert (await opsexec(live, key, "watch", second["id"])).returncode == 3

    cancelled = await opsexec(live, key, "cancel", third["id"], "--reason", "duplicate", "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["cancellation_reason"] == "duplicate"

    unreachable = await opsexec(live, key, "executions", "list", "--url", "http://127.0.0.1:9")
    assert unreachable.returncode == 1
    assert "cannot reach" in unreachable.stderr
