"""Rollout controls that act on running systems (R-ROLL): the kill switch (environment and
runtime), a tenant switched off mid-run, and draining a worker process.

In-flight work always finishes: each test starts an execution first, flips the switch
while it runs, and checks both the refusal of new work and the end of the old.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from opsexec.queue.reaper import ABANDONED_GRACE_S
from tests.conftest import ApiServer, TenantFixture, bearer, make_user
from tests.live_support import live_api, start_serve, wait_ready
from tests.support import count_plan, opsexec_async, other_tenant_admin, problem
from tests.worker_support import Fleet, execution_row, finished, queue_row, wait_for

pytestmark = pytest.mark.postgres


def slow_plan(seconds: float, marker: Path, *, estimated_s: float = 2) -> dict[str, Any]:
    """A level-1 shell step that runs for ``seconds`` and leaves ``marker`` behind."""
    return {
        "steps": [
            {
                "id": "slow",
                "action": "shell.run",
                "targets": ["local-01"],
                "inputs": {"command": f"sleep {seconds}; echo done > {marker}"},
                "estimated_duration_s": estimated_s,
            }
        ]
    }


async def start_running(
    http: httpx.AsyncClient, pool: asyncpg.Pool, key: str, plan: dict[str, Any]
) -> tuple[str, asyncio.Task[httpx.Response]]:
    """Submit and confirm a level-1 plan; return once its step is running in the request."""
    submitted = await http.post("/v1/executions", json={"plan": plan}, headers=bearer(key))
    assert submitted.status_code == 201, submitted.text
    execution_id: str = submitted.json()["id"]
    run = asyncio.create_task(
        http.post(f"/v1/executions/{execution_id}/approve", headers=bearer(key))
    )

    async def step_running() -> bool:
        status = await pool.fetchval(
            "SELECT status FROM execution_steps WHERE execution_id = $1 AND step_number = 1",
            uuid.UUID(execution_id),
        )
        return status == "running"

    await wait_for(step_running, "the step to start")
    return execution_id, run


@pytest.fixture
async def operator_api(
    database_dsn: str, stocked: TenantFixture, tmp_path: Path
) -> AsyncIterator[ApiServer]:
    """An API whose operator tenant is the test's own, with the runtime switch released
    afterwards whatever happens (the flag is shared by every test on this database)."""
    try:
        async with live_api(
            database_dsn, tmp_path, worker_concurrency=0, operator_tenant=stocked.name
        ) as api:
            yield api
    finally:
        connection = await asyncpg.connect(database_dsn)
        try:
            await connection.execute("DELETE FROM service_flags WHERE name = 'kill_switch'")
        finally:
            await connection.close()


async def test_runtime_kill_switch_refuses_new_work_lets_running_work_finish_and_is_audited(
    operator_api: ApiServer, stocked: TenantFixture, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    key = stocked.admin_key
    marker = tmp_path / "finished"
    async with httpx.AsyncClient(base_url=operator_api.url, timeout=30) as http:
        execution_id, run = await start_running(http, pool, key, slow_plan(1.5, marker))
        engaged = await http.put(
            "/v1/admin/kill-switch",
            json={"engaged": True, "reason": "rollback of 7.0.0"},
            headers=bearer(key),
        )
        assert engaged.status_code == 200, engaged.text
        assert engaged.json() | {"changed_at": None} == {
            "engaged": True,
            "source": "runtime",
            "environment": False,
            "runtime": True,
            "reason": "rollback of 7.0.0",
            "changed_at": None,
            "changed_by": str(stocked.admin_id),
        }

        headers = bearer(key)
        refused = await http.post("/v1/executions", json={"plan": count_plan()}, headers=headers)
        body = problem(refused, 503, "service_disabled")
        assert (body["reason"], body["source"]) == ("kill_switch", "runtime")
        finished_run = await run
        assert finished_run.json()["status"] == "succeeded", finished_run.text
        assert marker.read_text().strip() == "done"

        metrics = (await http.get("/metrics")).text
        assert "opsexec_kill_switch_engaged 1.0" in metrics

        released = await http.put(
            "/v1/admin/kill-switch", json={"engaged": False}, headers=bearer(key)
        )
        assert released.json()["engaged"] is False
        accepted = await http.post(
            "/v1/executions", json={"plan": count_plan()}, headers=bearer(key)
        )
        assert accepted.status_code == 201, accepted.text

    audit = await pool.fetch(
        """SELECT payload, actor_id FROM audit_log
           WHERE tenant_id = $1 AND event_kind = 'kill_switch_changed' ORDER BY seq""",
        stocked.id,
    )
    assert [(row["payload"]["after"], row["actor_id"]) for row in audit] == [
        (True, stocked.admin_id),
        (False, stocked.admin_id),
    ]
    assert audit[0]["payload"]["reason"] == "rollback of 7.0.0"
    assert (await execution_row(pool, execution_id))["status"] == "succeeded"


async def test_only_the_operator_tenants_admins_hold_service_wide_controls(
    operator_api: ApiServer, stocked: TenantFixture, pool: asyncpg.Pool
) -> None:
    foreign_admin = await other_tenant_admin(pool)
    _, operator_approver = await make_user(pool, stocked, ["approver"])
    async with httpx.AsyncClient(base_url=operator_api.url, timeout=30) as http:
        for key in (foreign_admin, operator_approver):
            for method, path, body in (
                ("PUT", "/v1/admin/kill-switch", {"engaged": True}),
                ("GET", "/v1/admin/workers", None),
            ):
                response = await http.request(method, path, json=body, headers=bearer(key))
                assert response.status_code == 403, response.text
        malformed = await http.put(
            "/v1/admin/kill-switch", json={"engaged": "soon"}, headers=bearer(stocked.admin_key)
        )
        assert problem(malformed, 422, "validation_error")
    assert await pool.fetchval("SELECT count(*) FROM service_flags") == 0


async def test_environment_kill_switch_cannot_be_released_at_runtime(
    database_dsn: str, stocked: TenantFixture, tmp_path: Path
) -> None:
    async with (
        live_api(
            database_dsn,
            tmp_path,
            worker_concurrency=0,
            kill_switch=True,
            operator_tenant=stocked.name,
        ) as api,
        httpx.AsyncClient(base_url=api.url, timeout=30) as http,
    ):
        headers = bearer(stocked.admin_key)
        refused = await http.post("/v1/executions", json={"plan": count_plan()}, headers=headers)
        body = problem(refused, 503, "service_disabled")
        assert (body["reason"], body["source"]) == ("kill_switch", "environment")
        state = await http.put("/v1/admin/kill-switch", json={"engaged": False}, headers=headers)
        assert (state.json()["engaged"], state.json()["source"]) == (True, "environment")
        still = await http.post("/v1/executions", json={"plan": count_plan()}, headers=headers)
        problem(still, 503, "service_disabled")
        # Reading stays possible while the switch is on.
        assert (await http.get("/v1/executions", headers=headers)).status_code == 200


async def test_a_tenant_switched_off_mid_run_finishes_the_running_execution(
    http: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    key = stocked.admin_key
    marker = tmp_path / "finished"
    execution_id, run = await start_running(http, pool, key, slow_plan(1.0, marker))
    settings_url = f"/v1/tenants/{stocked.id}/settings"
    off = await http.patch(settings_url, json={"enabled": False}, headers=bearer(key))
    assert off.status_code == 200, off.text
    refused = await http.post("/v1/executions", json={"plan": count_plan()}, headers=bearer(key))
    assert problem(refused, 503, "service_disabled")["reason"] == "tenant_disabled"
    assert (await run).json()["status"] == "succeeded"
    assert marker.exists()
    audited = await pool.fetchval(
        """SELECT count(*) FROM audit_log WHERE tenant_id = $1
           AND event_kind = 'settings_changed'""",
        stocked.id,
    )
    assert audited == 1
    assert (await execution_row(pool, execution_id))["status"] == "succeeded"


# --- worker drain -----------------------------------------------------------------------------


def background_sleep(seconds: float, marker: Path) -> dict[str, Any]:
    """The same step, estimated long enough (30 s) to be submitted in background mode."""
    return slow_plan(seconds, marker, estimated_s=30)


async def test_a_drained_worker_finishes_its_job_takes_no_new_one_and_exits(
    operator_api: ApiServer,
    stocked: TenantFixture,
    pool: asyncpg.Pool,
    database_dsn: str,
    tmp_path: Path,
) -> None:
    key = stocked.admin_key
    fleet = Fleet(database_dsn, tmp_path)
    first_marker, second_marker = tmp_path / "first", tmp_path / "second"
    try:
        worker = await fleet.start("drainee", env={"OPSEXEC_WORKER_HEARTBEAT_S": "0.2"})
        async with httpx.AsyncClient(base_url=operator_api.url, timeout=30) as http:
            first = await _submit_background(http, key, background_sleep(1.5, first_marker))

            async def leased() -> bool:
                return bool((await queue_row(pool, first))["leased_by"] == "drainee")

            await wait_for(leased, "the worker to take the first job")
            drained = await http.post(
                "/v1/admin/workers/drainee/drain",
                json={"reason": "kernel update"},
                headers=bearer(key),
            )
            assert drained.status_code == 202, drained.text
            assert drained.json()["state"] in ("draining", "stopped")
            second = await _submit_background(http, key, background_sleep(0.1, second_marker))

            returncode = await asyncio.wait_for(worker.wait(), timeout=60)
            assert returncode == 0, fleet.log("drainee")
            state = await http.get("/v1/admin/workers/drainee", headers=bearer(key))
            assert state.json()["state"] == "stopped"
            again = await http.post("/v1/admin/workers/drainee/drain", headers=bearer(key))
            problem(again, 409, "conflict")
        row = await execution_row(pool, first)
        assert row["status"] == "succeeded", fleet.log("drainee")
        assert first_marker.exists()
        assert (await queue_row(pool, second))["status"] == "queued", "taken while draining"
        assert not second_marker.exists()
        assert await pool.fetchval(
            """SELECT count(*) FROM audit_log WHERE tenant_id = $1
               AND event_kind = 'worker_drain_requested'""",
            stocked.id,
        )

        await fleet.start("successor")
        done = await wait_for(lambda: finished(pool, second), "another worker to run it")
        assert (done["status"], done["worker_id"]) == ("succeeded", "successor")
    finally:
        await fleet.kill_all()


async def _submit_background(http: httpx.AsyncClient, key: str, plan: dict[str, Any]) -> str:
    response = await http.post(
        "/v1/executions", json={"plan": plan, "mode": "background"}, headers=bearer(key)
    )
    assert response.status_code == 201, response.text
    execution = response.json()
    assert execution["status"] in ("approved", "awaiting_approval"), execution
    if execution["status"] == "awaiting_approval":
        approved = await http.post(f"/v1/executions/{execution['id']}/approve", headers=bearer(key))
        assert approved.status_code == 200, approved.text
    execution_id: str = execution["id"]
    return execution_id


async def test_operator_cli_flips_the_kill_switch_and_lists_workers(
    operator_api: ApiServer, stocked: TenantFixture, database_dsn: str
) -> None:
    async def cli(*arguments: str) -> tuple[int, str, str]:
        connection = ("--url", operator_api.url, "--api-key", stocked.admin_key)
        done = await opsexec_async(*arguments, *connection, dsn=database_dsn)
        return done.returncode, done.stdout, done.stderr

    code, out, err = await cli("kill-switch", "on", "--reason", "incident 42")
    assert code == 0, err
    assert "kill switch: ON via runtime — incident 42" in out
    code, out, _ = await cli("kill-switch", "status", "--json")
    assert json.loads(out)["engaged"] is True
    code, out, _ = await cli("kill-switch", "off")
    assert "kill switch: off" in out
    code, out, err = await cli("workers", "list", "--json")
    assert code == 0, err
    assert isinstance(json.loads(out), list)
    code, out, err = await cli("workers", "drain", "no-such-worker")
    assert code == 1
    assert "not found" in err


async def test_a_forced_cancel_sent_to_another_api_process_stops_an_immediate_run(
    database_dsn: str, stocked: TenantFixture, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """Two API replicas without workers: the run is on one, the cancel lands on the other."""
    key = stocked.admin_key
    marker = tmp_path / "never"
    async with (
        live_api(database_dsn, tmp_path / "a", worker_concurrency=0) as runner,
        live_api(database_dsn, tmp_path / "b", worker_concurrency=0) as other,
        httpx.AsyncClient(base_url=runner.url, timeout=30) as on_runner,
        httpx.AsyncClient(base_url=other.url, timeout=30) as on_other,
    ):
        execution_id, run = await start_running(on_runner, pool, key, slow_plan(30, marker))
        started = asyncio.get_running_loop().time()
        cancelled = await on_other.post(
            f"/v1/executions/{execution_id}/cancel",
            json={"force": True, "reason": "wrong host"},
            headers=bearer(key),
        )
        assert cancelled.status_code == 200, cancelled.text
        finished_run = await asyncio.wait_for(run, timeout=10)
        elapsed = asyncio.get_running_loop().time() - started
    assert finished_run.json()["status"] == "cancelled", finished_run.text
    assert elapsed < 2, f"the step was waited for ({elapsed:.1f} s), not killed"
    assert not marker.exists()


async def test_while_switched_off_nothing_new_starts_and_nothing_is_lost(
    operator_api: ApiServer,
    stocked: TenantFixture,
    pool: asyncpg.Pool,
    database_dsn: str,
    tmp_path: Path,
) -> None:
    """Queued background work waits (not leased, not failed) and an approval that would
    start a run is refused; both go ahead once the switch is released."""
    key = stocked.admin_key
    headers = bearer(key)
    fleet = Fleet(database_dsn, tmp_path)
    queued_marker, waiting_marker = tmp_path / "queued", tmp_path / "waiting"
    try:
        async with httpx.AsyncClient(base_url=operator_api.url, timeout=30) as http:
            queued = await _submit_background(http, key, background_sleep(0.1, queued_marker))
            waiting = await http.post(
                "/v1/executions", json={"plan": slow_plan(0.1, waiting_marker)}, headers=headers
            )
            assert waiting.json()["status"] == "awaiting_approval"
            engaged = await http.put(
                "/v1/admin/kill-switch", json={"engaged": True}, headers=headers
            )
            assert engaged.status_code == 200, engaged.text
            await fleet.start("switched-off")
            refused = await http.post(
                f"/v1/executions/{waiting.json()['id']}/approve", headers=headers
            )
            assert problem(refused, 503, "service_disabled")["reason"] == "kill_switch"
            await asyncio.sleep(2.5)  # a worker polls every second: it had its chances
            job = await queue_row(pool, queued)
            assert (job["status"], job["attempt"], job["lease_count"]) == ("queued", 0, 0)
            assert (await execution_row(pool, waiting.json()["id"]))["status"] == (
                "awaiting_approval"
            )

            await http.put("/v1/admin/kill-switch", json={"engaged": False}, headers=headers)
            done = await wait_for(lambda: finished(pool, queued), "the held job to run")
            assert done["status"] == "succeeded", fleet.log("switched-off")
            approved = await http.post(
                f"/v1/executions/{waiting.json()['id']}/approve", headers=headers
            )
            assert approved.json()["status"] == "succeeded", approved.text
        assert queued_marker.exists()
        assert waiting_marker.exists()
    finally:
        await fleet.kill_all()


async def test_a_switched_off_tenant_cannot_approve_work_into_running(
    http: httpx.AsyncClient, stocked: TenantFixture
) -> None:
    headers = bearer(stocked.admin_key)
    waiting = await http.post(
        "/v1/executions", json={"plan": slow_plan(0.1, Path("/dev/null"))}, headers=headers
    )
    settings_url = f"/v1/tenants/{stocked.id}/settings"
    await http.patch(settings_url, json={"enabled": False}, headers=headers)
    url = f"/v1/executions/{waiting.json()['id']}/approve"
    assert (
        problem(await http.post(url, headers=headers), 503, "service_disabled")["reason"]
        == "tenant_disabled"
    )
    rejected = await http.post(
        f"/v1/executions/{waiting.json()['id']}/reject",
        json={"reason": "not now"},
        headers=headers,
    )
    assert rejected.json()["status"] == "rejected", "stopping work stays possible"


async def test_the_reaper_ends_an_immediate_execution_whose_api_process_was_killed(
    database_dsn: str, stocked: TenantFixture, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """kill -9 of ``serve`` mid-run leaves an immediate execution ``running`` with no lease
    to expire; once it is past its timeout, ``opsexec reap`` fails it and frees its lock."""
    key = stocked.admin_key
    serve = start_serve(
        database_dsn, tmp_path / "serve", tmp_path / "serve.log", worker_concurrency=0
    )
    try:
        await wait_ready(serve)
        async with httpx.AsyncClient(base_url=serve.url, timeout=30) as http:
            execution_id, run = await start_running(
                http, pool, key, slow_plan(60, tmp_path / "never")
            )
            serve.process.kill()
            serve.process.wait(timeout=10)
            with contextlib.suppress(httpx.TransportError):
                await run
    finally:
        serve.stop()
    execution = uuid.UUID(execution_id)
    assert (await execution_row(pool, execution_id))["status"] == "running"
    assert await pool.fetchval(
        "SELECT count(*) FROM execution_locks WHERE execution_id = $1", execution
    )

    async def reap() -> None:
        done = await opsexec_async("reap", dsn=database_dsn)
        assert done.returncode == 0, done.stdout + done.stderr

    await reap()  # within its timeout: it may still be running somewhere
    assert (await execution_row(pool, execution_id))["status"] == "running"
    # As if its timeout and the grace period had passed since the process died.
    await pool.execute(
        """UPDATE executions
           SET created_at = created_at - make_interval(secs => timeout_ms / 1000.0 + $2 + 1),
               started_at = started_at - make_interval(secs => timeout_ms / 1000.0 + $2 + 1)
           WHERE id = $1""",
        execution,
        ABANDONED_GRACE_S,
    )
    await reap()
    row = await execution_row(pool, execution_id)
    assert (row["status"], row["error_class"]) == ("failed", "ExecutionAbandoned")
    step = await pool.fetchrow(
        "SELECT status, error_class FROM execution_steps WHERE execution_id = $1", execution
    )
    assert (step["status"], step["error_class"]) == ("failed", "IndeterminateStepOutcome")
    assert not await pool.fetchval(
        "SELECT count(*) FROM execution_locks WHERE execution_id = $1", execution
    )
    kinds = [
        r["event_kind"]
        for r in await pool.fetch(
            "SELECT event_kind FROM execution_events WHERE execution_id = $1 ORDER BY seq",
            execution,
        )
    ]
    assert kinds[-3:] == ["status_transition", "execution_failed", "lock_released"]


async def test_worker_drain_from_the_host_waits_for_the_job_and_the_exit(
    database_dsn: str,
    stocked: TenantFixture,
    pool: asyncpg.Pool,
    http: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    """``opsexec worker --drain --worker-id ID``: no API key, the database is enough."""
    key = stocked.admin_key
    fleet = Fleet(database_dsn, tmp_path)
    marker = tmp_path / "finished"
    try:
        worker = await fleet.start("host-drained", env={"OPSEXEC_WORKER_HEARTBEAT_S": "0.2"})
        execution_id = await _submit_background(http, key, background_sleep(1.0, marker))

        async def running() -> bool:
            return bool((await queue_row(pool, execution_id))["leased_by"] == "host-drained")

        await wait_for(running, "the worker to take the job")
        drained = await opsexec_async(
            "worker",
            "--drain",
            "--worker-id",
            "host-drained",
            "--drain-timeout",
            "60",
            dsn=database_dsn,
        )
        assert drained.returncode == 0, drained.stderr
        assert "host-drained: stopped" in drained.stdout
        assert worker.returncode == 0 or await worker.wait() == 0
        assert (await execution_row(pool, execution_id))["status"] == "succeeded"
        assert marker.exists(), "the job in hand was finished, not handed back"

        unknown = await opsexec_async(
            "worker", "--drain", "--worker-id", "no-such-worker", dsn=database_dsn
        )
        assert unknown.returncode == 1
        assert "not found" in unknown.stderr
    finally:
        await fleet.kill_all()
