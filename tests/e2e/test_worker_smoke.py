"""A background execution end to end: queued by the API, run by a worker process."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import TenantFixture, bearer

pytestmark = pytest.mark.postgres


async def test_worker_process_runs_a_background_execution(
    http: httpx.AsyncClient, stocked: TenantFixture, database_dsn: str, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    plan = {
        "steps": [
            {
                "id": "one",
                "action": "shell.run",
                "targets": ["local-01"],
                "inputs": {"command": f"echo one >> {marker}"},
                "estimated_duration_s": 6,
            },
            {
                "id": "two",
                "action": "shell.run",
                "targets": ["local-01"],
                "inputs": {"command": f"echo two >> {marker}"},
                "estimated_duration_s": 6,
                "depends_on": ["one"],
            },
        ]
    }
    headers = bearer(stocked.admin_key)
    submitted = (await http.post("/v1/executions", json={"plan": plan}, headers=headers)).json()
    assert (submitted["execution_mode"], submitted["sla_class"]) == ("background", "medium")
    approved = await http.post(f"/v1/executions/{submitted['id']}/approve", headers=headers)
    assert approved.json()["status"] == "approved"

    env = {
        **os.environ,
        "OPSEXEC_DATABASE_URL": database_dsn,
        "OPSEXEC_DATA_DIR": str(tmp_path / "data"),
        "OPSEXEC_SHUTDOWN_GRACE_S": "5",
    }
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "opsexec",
        "worker",
        "--concurrency",
        "2",
        "--worker-id",
        "smoke-worker",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            current = (await http.get(f"/v1/executions/{submitted['id']}", headers=headers)).json()
            if current["status"] in {"succeeded", "failed"}:
                break
            assert asyncio.get_running_loop().time() < deadline, current
            await asyncio.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(worker.communicate(), 30)
    assert worker.returncode == 0, stderr.decode()[-2000:]
    assert current["status"] == "succeeded", current
    assert current["worker_id"] == "smoke-worker"
    assert current["queue_wait_ms"] is not None
    assert marker.read_text().split() == ["one", "two"]
