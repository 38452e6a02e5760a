"""Running safely over real HTTP: local and SSH transports, secrets, timeouts, cancel,
locks, RBAC re-check, retries, rolling execution, results and record-only (R-ENGINE)."""

from __future__ import annotations

import asyncio
import io
import subprocess
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from opsexec.safety.mutex import reap_expired_locks
from tests.conftest import ApiServer, TenantFixture, bearer, dump_database, make_user
from tests.fixtures.sshd import SshdServer
from tests.support import load, problem, shell_plan

pytestmark = pytest.mark.postgres
REDACTED = "***REDACTED***"


def plan_of(*steps: dict[str, Any], runbook: str | None = None) -> dict[str, Any]:
    plan: dict[str, Any] = {"steps": list(steps)}
    if runbook:
        plan["runbook_url"] = runbook
    return plan


def step(step_id: str, command: str, targets: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "id": step_id,
        "action": "shell.run",
        "targets": targets,
        "inputs": {"command": command, **extra.pop("inputs", {})},
        "estimated_duration_s": extra.pop("estimated_duration_s", 1),
        **extra,
    }


async def run_confirmed(
    http: httpx.AsyncClient, key: str, plan: dict[str, Any], **body: Any
) -> dict[str, Any]:
    """Submit a level-1 plan and confirm it as its requester; the run happens in-request."""
    submitted = await http.post("/v1/executions", json={"plan": plan, **body}, headers=bearer(key))
    assert submitted.status_code == 201, submitted.text
    execution = submitted.json()
    if execution["status"] == "awaiting_approval":
        approved = await http.post(f"/v1/executions/{execution['id']}/approve", headers=bearer(key))
        assert approved.status_code == 200, approved.text
        execution = approved.json()
    return execution


async def steps_of(http: httpx.AsyncClient, key: str, execution_id: str) -> list[dict[str, Any]]:
    response = await http.get(f"/v1/executions/{execution_id}/steps", headers=bearer(key))
    steps: list[dict[str, Any]] = response.json()
    return steps


async def event_kinds(pool: asyncpg.Pool, execution_id: str) -> list[str]:
    rows = await pool.fetch(
        "SELECT event_kind FROM execution_events WHERE execution_id = $1 ORDER BY seq",
        uuid.UUID(execution_id),
    )
    return [r["event_kind"] for r in rows]


async def wait_for(condition: Any, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def process_running(marker: str) -> bool:
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, check=False)
    return found.returncode == 0


@pytest.fixture
async def local_hosts(http: httpx.AsyncClient, stocked: TenantFixture) -> list[str]:
    names = [f"local-{i:02d}x" for i in range(1, 21)]
    assets = [{"name": n, "address": "127.0.0.1", "transport": "local"} for n in names]
    response = await http.post("/v1/assets", json=assets, headers=bearer(stocked.admin_key))
    assert response.status_code == 201, response.text
    return names


# --- local and SSH transports -------------------------------------------------------------


async def test_disk_usage_local_returns_parsed_usage(
    http: httpx.AsyncClient, stocked: TenantFixture
) -> None:
    response = await http.post(
        "/v1/executions",
        json={"plan": load("disk_usage_local.json")},
        headers=bearer(stocked.admin_key),
    )
    execution = response.json()
    assert execution["status"] == "succeeded", execution
    (row,) = await steps_of(http, stocked.admin_key, execution["id"])
    usage = row["output_summary"]["output"]
    assert usage["mounted_on"] == "/"
    assert 0 <= usage["use_percent"] <= 100
    assert usage["size_kb"] > 0
    assert "used" in execution["result_summary"]["answer"]


@pytest.fixture
async def ssh_asset(
    http: httpx.AsyncClient, stocked: TenantFixture, sshd_server: SshdServer
) -> dict[str, str]:
    admin = bearer(stocked.admin_key)
    names = {"password": f"ssh-pw-{uuid.uuid4().hex[:6]}", "key": f"ssh-key-{uuid.uuid4().hex[:6]}"}
    credentials = [
        {
            "name": names["password"],
            "kind": "password",
            "value": sshd_server.password,
            "username": sshd_server.username,
        },
        {
            "name": names["key"],
            "kind": "ssh_key",
            "value": sshd_server.client_private_key,
            "username": sshd_server.username,
        },
    ]
    for credential in credentials:
        created = await http.post("/v1/credentials", json=credential, headers=admin)
        assert created.status_code in (200, 201), created.text
    assets = [
        {
            "name": f"sshhost-{kind}",
            "address": sshd_server.host,
            "port": sshd_server.port,
            "transport": "ssh",
            "environment": "dev",
            "credential_ref": names[kind],
        }
        for kind in names
    ]
    assert (await http.post("/v1/assets", json=assets, headers=admin)).status_code == 201
    return {"password": "sshhost-password", "key": "sshhost-key"}


async def test_disk_usage_over_ssh_has_the_same_shape(
    http: httpx.AsyncClient,
    stocked: TenantFixture,
    ssh_asset: dict[str, str],
    sshd_server: SshdServer,
    pool: asyncpg.Pool,
) -> None:
    plan = load("disk_usage_local.json")
    plan["steps"][0]["targets"] = [ssh_asset["password"]]
    execution = (
        await http.post("/v1/executions", json={"plan": plan}, headers=bearer(stocked.admin_key))
    ).json()
    assert execution["status"] == "succeeded", execution
    (row,) = await steps_of(http, stocked.admin_key, execution["id"])
    assert set(row["output_summary"]["output"]) >= {"filesystem", "use_percent", "mounted_on"}
    pinned = await pool.fetchval(
        "SELECT host_key FROM assets WHERE tenant_id = $1 AND name = $2",
        stocked.id,
        ssh_asset["password"],
    )
    assert (
        pinned
        == sshd_server.host_public_key.split(" ")[0]
        + " "
        + (sshd_server.host_public_key.split(" ")[1])
    ), "trust on first use pins the host key"


@pytest.mark.parametrize("auth", ["password", "key"])
async def test_shell_over_ssh_never_leaks_planted_secrets(
    http: httpx.AsyncClient,
    stocked: TenantFixture,
    ssh_asset: dict[str, str],
    sshd_server: SshdServer,
    pool: asyncpg.Pool,
    database_dsn: str,
    captured_logs: io.StringIO,
    auth: str,
) -> None:
    planted = f"planted-{uuid.uuid4().hex}"
    secret_name = f"token-{uuid.uuid4().hex[:6]}"
    created = await http.post(
        "/v1/credentials",
        json={"name": secret_name, "kind": "token", "value": planted},
        headers=bearer(stocked.admin_key),
    )
    assert created.status_code in (200, 201)
    plan = plan_of(
        step(
            "leak",
            'echo "token=$TOKEN"; echo "raw $TOKEN"; echo "$TOKEN" >&2; exit 3',
            [ssh_asset[auth]],
            inputs={"env": {"TOKEN": {"$secret": secret_name}}},
        )
    )
    execution = await run_confirmed(http, stocked.admin_key, plan)
    assert execution["status"] == "failed"
    (row,) = await steps_of(http, stocked.admin_key, execution["id"])
    output = row["output_summary"]["output"]
    assert f"raw {REDACTED}" in output["stdout"]
    assert REDACTED in output["stderr"]
    full = await http.get(
        f"/v1/executions/{execution['id']}/steps/1/output", headers=bearer(stocked.admin_key)
    )
    events = await pool.fetch(
        "SELECT payload::text AS p FROM execution_events WHERE execution_id = $1",
        uuid.UUID(execution["id"]),
    )
    for secret in (planted, sshd_server.password):
        assert secret not in full.text
        assert secret not in dump_database(database_dsn)
        assert secret not in captured_logs.getvalue()
        assert all(secret not in e["p"] for e in events)
        assert secret not in str(execution)


# --- timeouts -----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "ssh"])
async def test_step_timeout_kills_the_command(
    http: httpx.AsyncClient,
    stocked: TenantFixture,
    ssh_asset: dict[str, str],
    where: str,
) -> None:
    marker = f"30.{uuid.uuid4().int % 10**6:06d}"
    target = "local-01" if where == "local" else ssh_asset["key"]
    plan = plan_of(step("slow", f"sleep {marker}", [target], timeout_s=1))
    execution = await run_confirmed(http, stocked.admin_key, plan)
    assert execution["status"] == "failed"
    assert execution["error_class"] == "TimeoutError"
    assert execution["timeout_policy_id"] == "medium_modify"
    assert execution["timed_out"] is True
    (row,) = await steps_of(http, stocked.admin_key, execution["id"])
    assert row["timed_out"] is True
    assert row["error_class"] == "TimeoutError"
    assert not process_running(f"sleep {marker}")


# --- cancellation -------------------------------------------------------------------------


async def test_cancel_during_step_two_of_five(
    http: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    trail = tmp_path / "trail"
    steps = [
        step(
            f"s{i}",
            f"echo {i} >> {trail}; sleep {0.2 if i != 2 else 1.5}",
            ["local-01"],
            depends_on=[f"s{i - 1}"] if i > 1 else [],
        )
        for i in range(1, 6)
    ]
    submitted = (
        await http.post(
            "/v1/executions", json={"plan": plan_of(*steps)}, headers=bearer(stocked.admin_key)
        )
    ).json()
    execution_id = submitted["id"]
    run = asyncio.create_task(
        http.post(f"/v1/executions/{execution_id}/approve", headers=bearer(stocked.admin_key))
    )

    async def step_two_running() -> bool:
        rows = await steps_of(http, stocked.admin_key, execution_id)
        return rows[1]["status"] == "running"

    await wait_for(step_two_running)
    url = f"/v1/executions/{execution_id}/cancel"
    first = await http.post(url, json={"reason": "wrong window"}, headers=bearer(stocked.admin_key))
    assert first.status_code == 200, first.text
    finished = (await run).json()
    assert finished["status"] == "cancelled"
    assert finished["cancelled_by"] == str(stocked.admin_id)
    assert finished["cancelled_at"] is not None
    assert finished["cancel_checks_performed"] >= 2
    statuses = [r["status"] for r in await steps_of(http, stocked.admin_key, execution_id)]
    assert statuses == ["succeeded", "succeeded", "cancelled", "cancelled", "cancelled"]
    assert trail.read_text().split() == ["1", "2"]
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM execution_locks WHERE execution_id = $1", uuid.UUID(execution_id)
        )
        == 0
    )
    again = await http.post(url, headers=bearer(stocked.admin_key))
    assert again.status_code == 200
    assert (again.json()["cancelled_by"], again.json()["cancelled_at"]) == (
        finished["cancelled_by"],
        finished["cancelled_at"],
    )
    assert "execution_cancelled" in await event_kinds(pool, execution_id)


async def test_cancelling_a_finished_execution_is_409(
    http: httpx.AsyncClient, stocked: TenantFixture
) -> None:
    done = await run_confirmed(http, stocked.admin_key, shell_plan("true"))
    assert done["status"] == "succeeded"
    response = await http.post(
        f"/v1/executions/{done['id']}/cancel", headers=bearer(stocked.admin_key)
    )
    problem(response, 409, "execution_finished")


async def test_cancel_before_running_stops_at_once(
    http: httpx.AsyncClient, stocked: TenantFixture
) -> None:
    submitted = (
        await http.post(
            "/v1/executions",
            json={"plan": shell_plan("echo never")},
            headers=bearer(stocked.admin_key),
        )
    ).json()
    cancelled = await http.post(
        f"/v1/executions/{submitted['id']}/cancel", headers=bearer(stocked.admin_key)
    )
    assert cancelled.json()["status"] == "cancelled"
    steps = await steps_of(http, stocked.admin_key, submitted["id"])
    assert [s["status"] for s in steps] == ["cancelled"]


async def test_force_cancel_kills_the_running_command(
    http: httpx.AsyncClient, stocked: TenantFixture
) -> None:
    marker = f"29.{uuid.uuid4().int % 10**6:06d}"
    submitted = (
        await http.post(
            "/v1/executions",
            json={"plan": shell_plan(f"sleep {marker}")},
            headers=bearer(stocked.admin_key),
        )
    ).json()
    run = asyncio.create_task(
        http.post(f"/v1/executions/{submitted['id']}/approve", headers=bearer(stocked.admin_key))
    )

    async def sleeping() -> bool:
        return process_running(f"sleep {marker}")

    await wait_for(sleeping)
    forced = await http.post(
        f"/v1/executions/{submitted['id']}/cancel",
        json={"force": True, "reason": "stop now"},
        headers=bearer(stocked.admin_key),
    )
    assert forced.status_code == 200
    finished = (await asyncio.wait_for(run, 10)).json()
    assert finished["status"] == "cancelled"
    assert not process_running(f"sleep {marker}")


# --- locks --------------------------------------------------------------------------------


async def test_second_execution_on_a_locked_asset_gets_409(
    http: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool
) -> None:
    first = (
        await http.post(
            "/v1/executions",
            json={"plan": shell_plan("sleep 1.5")},
            headers=bearer(stocked.admin_key),
        )
    ).json()
    run = asyncio.create_task(
        http.post(f"/v1/executions/{first['id']}/approve", headers=bearer(stocked.admin_key))
    )

    async def locked() -> bool:
        held: int = await pool.fetchval(
            "SELECT count(*) FROM execution_locks WHERE execution_id = $1",
            uuid.UUID(first["id"]),
        )
        return held > 0

    await wait_for(locked)
    # Read actions take no lock, so they run beside it.
    uptime = plan_of(
        {
            "id": "up",
            "action": "host.uptime",
            "targets": ["local-01"],
            "inputs": {},
            "estimated_duration_s": 1,
        }
    )
    read = await http.post(
        "/v1/executions", json={"plan": uptime}, headers=bearer(stocked.admin_key)
    )
    assert read.json()["status"] == "succeeded"

    second = (
        await http.post(
            "/v1/executions",
            json={"plan": shell_plan("echo second")},
            headers=bearer(stocked.admin_key),
        )
    ).json()
    busy = await http.post(
        f"/v1/executions/{second['id']}/approve", headers=bearer(stocked.admin_key)
    )
    body = problem(busy, 409, "resource_busy")
    assert body["holder_execution_id"] == first["id"]
    assert (await run).json()["status"] == "succeeded"
    for execution_id in (first["id"], second["id"]):
        assert (
            await pool.fetchval(
                "SELECT count(*) FROM execution_locks WHERE execution_id = $1",
                uuid.UUID(execution_id),
            )
            == 0
        )
    failed = (
        await http.get(f"/v1/executions/{second['id']}", headers=bearer(stocked.admin_key))
    ).json()
    assert (failed["status"], failed["error_class"]) == ("failed", "ResourceBusyError")
    kinds = await event_kinds(pool, first["id"])
    assert "lock_acquired" in kinds
    assert "lock_released" in kinds


async def test_locks_released_after_failure(
    http: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool
) -> None:
    failed = await run_confirmed(http, stocked.admin_key, shell_plan("exit 7"))
    assert failed["status"] == "failed"
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM execution_locks WHERE execution_id = $1", uuid.UUID(failed["id"])
        )
        == 0
    )


async def test_expired_lock_is_reaped_with_event(
    http: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool
) -> None:
    done = await run_confirmed(http, stocked.admin_key, shell_plan("true"))
    await pool.execute(
        """INSERT INTO execution_locks (lock_key, execution_id, owner_tag, expires_at)
           VALUES ($1, $2, $3, now() - interval '1 second')""",
        f"lock:v1:{stocked.id}:ghost-{uuid.uuid4().hex[:6]}:asset",
        uuid.UUID(done["id"]),
        done["id"],
    )
    assert await reap_expired_locks(pool) >= 1
    assert "lock_reaped" in await event_kinds(pool, done["id"])


# --- RBAC at the engine -------------------------------------------------------------------


async def test_revoked_role_between_approval_and_run_fails_the_execution(
    http: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool
) -> None:
    user_id, key = await make_user(pool, stocked, ["operator"])
    submitted = (
        await http.post("/v1/executions", json={"plan": shell_plan("echo hi")}, headers=bearer(key))
    ).json()
    await http.patch(
        f"/v1/users/{user_id}", json={"roles": ["viewer"]}, headers=bearer(stocked.admin_key)
    )
    approved = await http.post(f"/v1/executions/{submitted['id']}/approve", headers=bearer(key))
    body = approved.json()
    assert (body["status"], body["error_class"]) == ("failed", "PermissionError")
    assert "rbac_violation" in await event_kinds(pool, submitted["id"])


async def test_disabled_requester_fails_at_the_engine(
    http: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool, api_server: ApiServer
) -> None:
    user_id, key = await make_user(pool, stocked, ["deployer"])
    plan = load("deploy_staging.json")
    plan["steps"][0]["targets"] = ["local-01"]
    plan["steps"][0]["inputs"].pop("token")
    submitted = await http.post("/v1/executions", json={"plan": plan}, headers=bearer(key))
    assert submitted.status_code == 201, submitted.text
    execution_id = submitted.json()["id"]
    _, approver = await make_user(pool, stocked, ["approver"])
    approved = await http.post(f"/v1/executions/{execution_id}/approve", headers=bearer(approver))
    assert approved.json()["status"] == "approved"
    await http.patch(
        f"/v1/users/{user_id}", json={"disabled": True}, headers=bearer(stocked.admin_key)
    )
    # The background run, as a worker would start it: the requester is disabled by now.
    await api_server.app.state.engine.run(uuid.UUID(execution_id), stocked.id)
    final = (
        await http.get(f"/v1/executions/{execution_id}", headers=bearer(stocked.admin_key))
    ).json()
    assert (final["status"], final["error_class"]) == ("failed", "PermissionError")
    assert "rbac_violation" in await event_kinds(pool, execution_id)
    audited = await pool.fetchrow(
        """SELECT severity, actor_id, payload FROM audit_log
           WHERE tenant_id = $1 AND event_kind = 'rbac_violation'
             AND payload->>'execution_id' = $2""",
        stocked.id,
        execution_id,
    )
    assert audited is not None, "engine-side violations reach the audit log too"
    assert (audited["severity"], audited["actor_id"]) == ("critical", user_id)
    assert audited["payload"]["at"] == "engine"


# --- retries ------------------------------------------------------------------------------


class _Flaky(BaseHTTPRequestHandler):
    failures_left: dict[str, int] = {}
    hits: dict[str, int] = {}

    def _answer(self) -> None:
        name = self.path
        _Flaky.hits[name] = _Flaky.hits.get(name, 0) + 1
        left = _Flaky.failures_left.get(name, 0)
        if left > 0:
            _Flaky.failures_left[name] = left - 1
            self.send_response(503)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"ok": true}')

    do_GET = _answer
    do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def http_plan(url: str, method: str) -> dict[str, Any]:
    return plan_of(
        {
            "id": "call",
            "action": "http.request",
            "targets": [],
            "inputs": {"method": method, "url": url},
            "estimated_duration_s": 1,
        }
    )


async def test_idempotent_request_is_retried_until_it_succeeds(
    http: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool, flaky_server: str
) -> None:
    path = f"/health-{uuid.uuid4().hex[:6]}"
    _Flaky.failures_left[path] = 2
    response = await http.post(
        "/v1/executions",
        json={"plan": http_plan(flaky_server + path, "GET")},
        headers=bearer(stocked.admin_key),
    )
    execution = response.json()
    assert execution["status"] == "succeeded", execution
    assert execution["retries_total"] == 2
    assert (await event_kinds(pool, execution["id"])).count("step_retrying") == 2
    assert _Flaky.hits[path] == 3


async def test_non_idempotent_request_is_never_retried(
    http: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool, flaky_server: str
) -> None:
    path = f"/orders-{uuid.uuid4().hex[:6]}"
    _Flaky.failures_left[path] = 1
    execution = await run_confirmed(http, stocked.admin_key, http_plan(flaky_server + path, "POST"))
    assert execution["status"] == "failed"
    assert execution["retries_total"] == 0
    assert "step_retrying" not in await event_kinds(pool, execution["id"])
    assert _Flaky.hits[path] == 1


# --- rolling execution --------------------------------------------------------------------


async def test_max_concurrency_bounds_targets_in_flight(
    http: httpx.AsyncClient,
    stocked: TenantFixture,
    pool: asyncpg.Pool,
    local_hosts: list[str],
    tmp_path: Path,
) -> None:
    running, peaks = tmp_path / "running", tmp_path / "peaks"
    running.mkdir()
    command = f"touch {running}/$$; ls {running} | wc -l >> {peaks}; sleep 0.3; rm {running}/$$"
    plan = plan_of(step("roll", command, local_hosts, max_concurrency=5), runbook="https://rb/x")
    submitted = (
        await http.post("/v1/executions", json={"plan": plan}, headers=bearer(stocked.admin_key))
    ).json()
    assert submitted["approval_level"] == 2
    _, approver = await make_user(pool, stocked, ["approver"])
    done = (
        await http.post(f"/v1/executions/{submitted['id']}/approve", headers=bearer(approver))
    ).json()
    assert done["status"] == "succeeded", done
    counts = [int(n) for n in peaks.read_text().split()]
    assert len(counts) == 20
    assert max(counts) <= 5


async def test_max_failures_stops_scheduling_after_the_next_failure(
    http: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool, local_hosts: list[str]
) -> None:
    plan = plan_of(
        step(
            "fail",
            "exit 1",
            local_hosts,
            max_concurrency=1,
            max_failures=2,
            estimated_duration_s=0.4,
        ),
        runbook="https://rb/x",
    )
    submitted = (
        await http.post("/v1/executions", json={"plan": plan}, headers=bearer(stocked.admin_key))
    ).json()
    _, approver = await make_user(pool, stocked, ["approver"])
    done = (
        await http.post(f"/v1/executions/{submitted['id']}/approve", headers=bearer(approver))
    ).json()
    assert done["status"] == "failed"
    steps = await steps_of(http, stocked.admin_key, submitted["id"])
    started = [s for s in steps if s["started_at"] is not None]
    assert len(started) == 3
    assert {s["status"] for s in steps if s["started_at"] is None} == {"cancelled"}


# --- results and record-only --------------------------------------------------------------


async def test_large_output_is_truncated_in_the_summary_and_kept_whole(
    http: httpx.AsyncClient, stocked: TenantFixture
) -> None:
    execution = await run_confirmed(
        http, stocked.admin_key, shell_plan("head -c 50000 /dev/zero | tr '\\0' 'x'")
    )
    assert execution["status"] == "succeeded"
    (row,) = await steps_of(http, stocked.admin_key, execution["id"])
    assert row["output_summary"]["truncated"] is True
    assert "…[truncated]" in row["output_summary"]["output"]
    assert row["output_size_bytes"] > 50_000
    full = await http.get(
        f"/v1/executions/{execution['id']}/steps/1/output", headers=bearer(stocked.admin_key)
    )
    assert full.status_code == 200
    assert full.json()["stdout"] == "x" * 50_000
    assert int(full.headers["x-output-size"]) == row["output_size_bytes"]


async def test_record_only_runs_nothing_but_records_everything(
    http: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    side_effect = tmp_path / "side-effect"
    side_effect.write_text("")
    settings = await http.patch(
        f"/v1/tenants/{stocked.id}/settings",
        json={"record_only": True},
        headers=bearer(stocked.admin_key),
    )
    assert settings.status_code == 200
    execution = await run_confirmed(
        http, stocked.admin_key, shell_plan(f"echo ran >> {side_effect}")
    )
    assert execution["status"] == "succeeded"
    assert side_effect.read_text() == ""
    (row,) = await steps_of(http, stocked.admin_key, execution["id"])
    assert row["output_summary"]["output"]["would_run"] == "shell.run"
    kinds = await event_kinds(pool, execution["id"])
    assert {"execution_started", "step_started", "step_completed", "execution_completed"} <= set(
        kinds
    )


async def test_binary_output_is_kept_base64_with_its_content_type(
    http: httpx.AsyncClient, stocked: TenantFixture
) -> None:
    execution = await run_confirmed(
        http, stocked.admin_key, shell_plan("printf '\\000\\001\\002\\377binary'")
    )
    assert execution["status"] == "succeeded"
    (row,) = await steps_of(http, stocked.admin_key, execution["id"])
    summary = row["output_summary"]
    assert summary["encoding"] == "base64"
    assert summary["content_type"] != "application/json"
    full = await http.get(
        f"/v1/executions/{execution['id']}/steps/1/output", headers=bearer(stocked.admin_key)
    )
    assert full.content == b"\x00\x01\x02\xffbinary"


async def test_target_without_an_available_transport_fails_its_step_clearly(
    http: httpx.AsyncClient, stocked: TenantFixture
) -> None:
    plan = plan_of(
        {
            "id": "up",
            "action": "host.uptime",
            "targets": ["ws-01"],
            "inputs": {},
            "estimated_duration_s": 1,
        }
    )
    execution = await run_confirmed(http, stocked.admin_key, plan)  # production: level 1
    assert execution["status"] == "failed"
    assert execution["error_class"] == "TransportUnavailableError"
    assert "winrm" in execution["error_message"]
