"""Background execution end to end, with worker processes as real subprocesses.

The shared plans run on local assets (systemd cannot run here: a ``systemctl`` stand-in on
the workers' PATH answers ``service.*``). Together with ``test_queue_recovery.py``
(kill -9 of a non-idempotent step, SIGTERM within the grace period, fencing, the renewal
cap, forced cancel), ``test_queue_scale.py`` (1,000 jobs over 4 workers), ``test_dlq.py``
(reaper → DLQ → API/CLI requeue) and ``test_step_gates.py`` this covers issue 5's list.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import ApiServer, TenantFixture, bearer, make_user
from tests.live_support import RedisServer, live_api, private_redis
from tests.support import count_plan, load
from tests.worker_support import (
    Fleet,
    Systemctl,
    add_local_assets,
    events_of,
    execution_row,
    finished,
    install_systemctl,
    kinds_of,
    process_alive,
    queue_row,
    retarget,
    set_lease,
    steps_of,
    wait_for,
)

pytestmark = pytest.mark.postgres


@pytest.fixture
async def fleet(database_dsn: str, tmp_path: Path) -> AsyncIterator[Fleet]:
    workers = Fleet(database_dsn, tmp_path)
    try:
        yield workers
    finally:
        await workers.kill_all()


@pytest.fixture
def systemctl(tmp_path: Path) -> Iterator[Systemctl]:
    stand_in = install_systemctl(tmp_path / "systemctl")
    try:
        yield stand_in
    finally:
        stand_in.kill_held()


async def submit(
    http: httpx.AsyncClient, key: str, plan: dict[str, Any], **body: Any
) -> dict[str, Any]:
    response = await http.post("/v1/executions", json={"plan": plan, **body}, headers=bearer(key))
    assert response.status_code == 201, response.text
    execution: dict[str, Any] = response.json()
    return execution


async def approve(
    http: httpx.AsyncClient, key: str, execution_id: str, step_number: int | None = None
) -> dict[str, Any]:
    body = {} if step_number is None else {"step_number": step_number}
    response = await http.post(
        f"/v1/executions/{execution_id}/approve", json=body, headers=bearer(key)
    )
    assert response.status_code == 200, response.text
    approved: dict[str, Any] = response.json()
    return approved


def shell(step_id: str, command: str, target: str, after: str | None = None) -> dict[str, Any]:
    return {
        "id": step_id,
        "action": "shell.run",
        "targets": [target],
        "inputs": {"command": command},
        "estimated_duration_s": 6,
        **({"depends_on": [after]} if after else {}),
    }


def restart(step_id: str, target: str, after: str | None = None) -> dict[str, Any]:
    return {
        "id": step_id,
        "action": "service.restart",
        "targets": [target],
        "inputs": {"service": "nginx"},
        "estimated_duration_s": 6,
        **({"depends_on": [after]} if after else {}),
    }


def get_url(url: str, tag: str) -> dict[str, Any]:
    """A level-0 background job (a GET is read-only and idempotent) told apart by ``tag``."""
    return {
        "metadata": {"tag": tag},
        "steps": [
            {
                "id": "get",
                "action": "http.request",
                "targets": [],
                "inputs": {"method": "GET", "url": url},
                "estimated_duration_s": 1,
            }
        ],
    }


async def step_started_count(pool: asyncpg.Pool, execution_id: str) -> int:
    return (await kinds_of(pool, execution_id)).count("step_started")


# --- the shared plan in the background --------------------------------------------------


async def test_restart_nginx_runs_on_a_worker_process(
    http: httpx.AsyncClient,
    tenant: TenantFixture,
    pool: asyncpg.Pool,
    fleet: Fleet,
    systemctl: Systemctl,
) -> None:
    await add_local_assets(http, tenant.admin_key, ["web-local-01"], "staging")
    plan = retarget(load("restart_nginx.json"), {"web-01": "web-local-01"})
    systemctl.delay_restarts(1.2)  # long enough for the lease to be renewed
    await fleet.start("bg-nginx", env={"PATH": systemctl.path})

    execution = await submit(http, tenant.admin_key, plan)
    # Answered at once: classified, persisted, queued — nothing ran inside the request.
    assert (
        execution["execution_mode"],
        execution["sla_class"],
        execution["approval_level"],
        execution["status"],
    ) == ("background", "medium", 1, "awaiting_approval")
    assert (await queue_row(pool, execution["id"]))["status"] == "queued"
    assert systemctl.calls() == []

    await set_lease(pool, execution["id"], 1500)  # a renewal every half second
    assert (await approve(http, tenant.admin_key, execution["id"]))["status"] == "approved"
    await wait_for(lambda: finished(pool, execution["id"]), "the worker to finish the job")

    done = (
        await http.get(f"/v1/executions/{execution['id']}", headers=bearer(tenant.admin_key))
    ).json()
    assert done["status"] == "succeeded", fleet.log("bg-nginx")
    assert done["worker_id"] == "bg-nginx"
    assert isinstance(done["queue_wait_ms"], int)
    assert done["queue_wait_ms"] >= 0
    assert 1 <= done["lease_renewals"] <= 3, "renewed, within the medium SLA's cap of 3"
    # status-before; restart (which reads the state back); status-after.
    assert systemctl.calls() == ["show nginx", "restart nginx", "show nginx", "show nginx"]
    assert [s["status"] for s in await steps_of(pool, execution["id"])] == ["succeeded"] * 3
    assert (await queue_row(pool, execution["id"]))["status"] == "completed"


# --- crash recovery -----------------------------------------------------------------------


async def test_kill_9_reruns_an_interrupted_idempotent_step_and_nothing_else(
    http: httpx.AsyncClient,
    tenant: TenantFixture,
    pool: asyncpg.Pool,
    fleet: Fleet,
    systemctl: Systemctl,
    tmp_path: Path,
) -> None:
    trail = tmp_path / "trail"
    await add_local_assets(http, tenant.admin_key, ["web-local-02"], "staging")
    plan = {
        "steps": [
            shell("before", f"echo before >> {trail}", "web-local-02"),
            restart("restart", "web-local-02", after="before"),
            shell("after", f"echo after >> {trail}", "web-local-02", after="restart"),
        ]
    }
    systemctl.hold_next_restart()
    execution = await submit(http, tenant.admin_key, plan, mode="background")
    await set_lease(pool, execution["id"], 1500)
    await approve(http, tenant.admin_key, execution["id"])
    env = {"PATH": systemctl.path}

    doomed = await fleet.start("doomed", env=env)
    await wait_for(systemctl.held_restart, "the restart to be in flight")
    doomed.kill()  # SIGKILL: no hand-back, no goodbye; the lease must run out
    await doomed.wait()
    systemctl.kill_held()  # the host's half-done restart dies with it
    await fleet.start("rescuer", env=env)
    row = await wait_for(lambda: finished(pool, execution["id"]), "the rescuer to finish")

    assert row["status"] == "succeeded", fleet.log("rescuer")
    assert row["worker_id"] == "rescuer"
    # The succeeded step did not run again; the interrupted idempotent one did.
    assert trail.read_text().split() == ["before", "after"]
    assert systemctl.calls() == ["restart nginx", "restart nginx", "show nginx"]
    events = await events_of(pool, execution["id"])
    expired = [e["payload"] for e in events if e["event_kind"] == "lease_expired"]
    assert [(e["worker_id"], e["attempt"]) for e in expired] == [("doomed", 1)]
    resumed = [e["payload"] for e in events if e["event_kind"] == "execution_resumed"]
    assert [e["worker_id"] for e in resumed] == ["rescuer"]
    started = [e["payload"]["step_number"] for e in events if e["event_kind"] == "step_started"]
    assert started == [1, 2, 2, 3]


async def test_sigterm_past_the_grace_period_hands_the_job_to_a_running_worker(
    http: httpx.AsyncClient,
    tenant: TenantFixture,
    pool: asyncpg.Pool,
    fleet: Fleet,
    systemctl: Systemctl,
    tmp_path: Path,
) -> None:
    trail = tmp_path / "trail"
    await add_local_assets(http, tenant.admin_key, ["web-local-03"], "staging")
    plan = {
        "steps": [
            restart("restart", "web-local-03"),
            shell("after", f"echo after >> {trail}", "web-local-03", after="restart"),
        ]
    }
    systemctl.hold_next_restart()
    execution = await submit(http, tenant.admin_key, plan, mode="background")
    # Ten minutes: the job can only come back through the hand-back, never by expiry.
    await set_lease(pool, execution["id"], 600_000)
    await approve(http, tenant.admin_key, execution["id"])
    env = {"PATH": systemctl.path}

    leaving = await fleet.start("leaving", env={**env, "OPSEXEC_SHUTDOWN_GRACE_S": "0.5"})
    held = await wait_for(systemctl.held_restart, "the restart to be in flight")
    await fleet.start("staying", env=env)  # idle: the job is leased by "leaving"
    leaving.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(leaving.wait(), 30) == 0, fleet.log("leaving")
    assert not process_alive(held), "the step past the grace period was stopped"
    row = await wait_for(lambda: finished(pool, execution["id"]), "the other worker to finish")

    assert row["status"] == "succeeded", fleet.log("staying")
    assert row["worker_id"] == "staying"
    job = await queue_row(pool, execution["id"])
    assert (job["attempt"], job["lease_count"]) == (0, 2), "handed back, no attempt charged"
    kinds = await kinds_of(pool, execution["id"])
    assert "lease_expired" not in kinds
    assert "execution_resumed" in kinds
    # The interrupted restart is idempotent, so it ran again; everything else once.
    assert systemctl.calls() == ["restart nginx", "restart nginx", "show nginx"]
    assert trail.read_text().split() == ["after"]


# --- failures at the queue level ---------------------------------------------------------


class _GatedHandler(BaseHTTPRequestHandler):
    server: _GatedServer

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.hits += 1
        passed = self.server.permits.acquire(timeout=60)
        self.send_response(200 if passed else 503)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


class _GatedServer(ThreadingHTTPServer):
    """Counts GETs and answers each only when the test hands out a permit."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _GatedHandler)
        self.hits = 0
        self.lock = threading.Lock()
        self.permits = threading.Semaphore(0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def gated_server() -> Iterator[_GatedServer]:
    server = _GatedServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.permits.release(1000)
        server.shutdown()
        server.server_close()


async def cut_connection_while_recording(
    pool: asyncpg.Pool, execution_id: str, server: _GatedServer
) -> None:
    """Make the worker lose its database connection in the middle of a write.

    The test locks the step row, lets the in-flight request answer, waits until the
    worker's transaction recording the result is blocked on that lock, and terminates
    that backend: a real lost connection, mid-transaction, every time.
    """
    async with pool.acquire() as blocker:
        locked = blocker.transaction()
        await locked.start()
        try:
            await blocker.execute(
                "SELECT 1 FROM execution_steps WHERE execution_id = $1 FOR UPDATE",
                uuid.UUID(execution_id),
            )
            blocker_pid = await blocker.fetchval("SELECT pg_backend_pid()")
            server.permits.release()

            async def blocked_backend() -> int | None:
                pid: int | None = await pool.fetchval(
                    "SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                    blocker_pid,
                )
                return pid

            victim = await wait_for(blocked_backend, "the worker's write to block")
            assert await pool.fetchval("SELECT pg_terminate_backend($1)", victim)
        finally:
            await locked.rollback()


async def test_infrastructure_failures_back_off_then_dead_letter_then_requeue(
    http: httpx.AsyncClient,
    tenant: TenantFixture,
    pool: asyncpg.Pool,
    fleet: Fleet,
    gated_server: _GatedServer,
) -> None:
    unit = 0.25
    plan = get_url(f"{gated_server.url}/deploy-check", "infra")
    execution = await submit(http, tenant.admin_key, plan, mode="background")
    execution_id = execution["id"]
    job = await queue_row(pool, execution_id)
    assert (execution["sla_class"], job["max_attempts"]) == ("fast", 3)
    await fleet.start("flaky-db", env={"OPSEXEC_QUEUE_BACKOFF_UNIT_S": str(unit)})

    for attempt in (1, 2, 3):
        await wait_for(lambda a=attempt: _hits_reached(gated_server, a), f"request {attempt}")
        await cut_connection_while_recording(pool, execution_id, gated_server)

        async def charged(a: int = attempt) -> bool:
            return bool((await queue_row(pool, execution_id))["attempt"] == a)

        await wait_for(charged, f"attempt {attempt} to be charged")

    job = await queue_row(pool, execution_id)
    assert job["status"] == "failed"
    events = await events_of(pool, execution_id)
    failed = [e for e in events if e["event_kind"] == "attempt_failed"]
    # 2^attempt backoff units: 0.5 s, then 1 s, then no retry (dead-lettered).
    assert [e["payload"]["retry_in_s"] for e in failed] == [2 * unit, 4 * unit, None]
    assert all(e["payload"]["worker_id"] == "flaky-db" for e in failed)
    started = [e["timestamp"] for e in events if e["event_kind"] == "step_started"]
    for failure, next_start in zip(failed[:2], started[1:], strict=True):
        retry_at = datetime.fromisoformat(failure["payload"]["retry_at"])
        assert next_start >= retry_at, "a retry started before its backoff was over"
    (dead,) = [e["payload"] for e in events if e["event_kind"] == "dead_lettered"]
    assert dead["attempts"] == 3
    row = await execution_row(pool, execution_id)
    assert row["status"] == "running", "the execution waits for a person, it is not failed"

    headers = bearer(tenant.admin_key)
    (entry,) = [
        e
        for e in (await http.get("/v1/dlq", headers=headers)).json()
        if e["execution_id"] == execution_id
    ]
    assert entry["id"] == dead["dlq_id"]
    assert entry["attempt_count"] == 3
    gated_server.permits.release(100)  # the database is healthy again
    requeued = await http.post(f"/v1/dlq/{entry['id']}/requeue", headers=headers)
    assert requeued.status_code == 200, requeued.text
    row = await wait_for(lambda: finished(pool, execution_id), "the requeued job to run")
    assert row["status"] == "succeeded", fleet.log("flaky-db")
    # Each attempt re-sent the idempotent GET whose result was lost; the last one counted.
    assert gated_server.hits == 4
    assert (await kinds_of(pool, execution_id)).count("requeued") == 1


async def _hits_reached(server: _GatedServer, count: int) -> bool:
    return server.hits >= count


# --- order and gates -------------------------------------------------------------------------


async def test_a_worker_takes_urgent_before_normal_before_bulk(
    http: httpx.AsyncClient,
    tenant: TenantFixture,
    pool: asyncpg.Pool,
    fleet: Fleet,
    api_server: ApiServer,
) -> None:
    ids = {}
    for priority in ("bulk", "normal", "urgent"):  # submitted in the wrong order on purpose
        plan = get_url(f"{api_server.url}/healthz", priority)
        execution = await submit(http, tenant.admin_key, plan, mode="background", priority=priority)
        assert execution["status"] == "approved"
        ids[priority] = execution["id"]
    await fleet.start("one-at-a-time", concurrency=1)
    rows = {}
    for priority, execution_id in ids.items():
        rows[priority] = await wait_for(
            lambda e=execution_id: finished(pool, e), f"the {priority} job"
        )
    assert {r["status"] for r in rows.values()} == {"succeeded"}
    order = sorted(rows, key=lambda p: rows[p]["started_at"])
    assert order == ["urgent", "normal", "bulk"]


async def _parked_at(pool: asyncpg.Pool, execution_id: str, step_number: int) -> bool:
    row = await execution_row(pool, execution_id)
    pending = await pool.fetchval(
        """SELECT count(*) FROM approvals WHERE execution_id = $1 AND step_number = $2
           AND state = 'pending'""",
        uuid.UUID(execution_id),
        step_number,
    )
    job = await queue_row(pool, execution_id)
    return bool(
        row["status"] == "awaiting_approval"
        and pending == 1
        and job["status"] == "queued"
        and job["leased_by"] is None
    )


async def test_level_3_deploy_parks_before_each_gate_and_frees_its_worker(
    http: httpx.AsyncClient,
    tenant: TenantFixture,
    pool: asyncpg.Pool,
    fleet: Fleet,
    api_server: ApiServer,
    tmp_path: Path,
) -> None:
    trail = tmp_path / "deployed"
    script = tmp_path / "deploy.sh"
    script.write_text(f'#!/bin/sh\necho "$1" >> {trail}\n')
    script.chmod(0o755)
    targets = ["prod-local-01", "prod-local-02"]
    await add_local_assets(http, tenant.admin_key, targets, "production")
    plan = load("deploy_prod_50.json")
    precheck, deploy, verify = plan["steps"]
    port = int(api_server.url.rsplit(":", 1)[1])
    plan["steps"] = [
        {**precheck, "targets": targets, "inputs": {"path": str(tmp_path)}},
        {**deploy, "targets": targets, "inputs": {**deploy["inputs"], "script": str(script)}},
        {**verify, "targets": targets, "inputs": {**verify["inputs"], "port": port}},
    ]
    plan["steps"][1]["requires_approval"] = True
    plan["steps"][2]["requires_approval"] = True
    _, deployer = await make_user(pool, tenant, ["deployer"])
    _, senior = await make_user(pool, tenant, ["senior_approver"])

    execution = await submit(http, deployer, plan)
    execution_id = execution["id"]
    assert (execution["approval_level"], execution["gated_step_ids"]) == (3, ["deploy", "verify"])
    assert execution["execution_mode"] == "background"
    await approve(http, senior, execution_id)
    await fleet.start("single-slot", concurrency=1)

    # Steps expand per target: precheck 1-2, deploy 3-4, verify 5-6.
    await wait_for(lambda: _parked_at(pool, execution_id, 3), "the gate before deploy")
    assert not trail.exists(), "nothing was deployed before the gate"
    other = await submit(
        http, tenant.admin_key, get_url(f"{api_server.url}/healthz", "other"), mode="background"
    )
    other_row = await wait_for(lambda: finished(pool, other["id"]), "the other job")
    assert (other_row["status"], other_row["worker_id"]) == ("succeeded", "single-slot")

    await approve(http, senior, execution_id, step_number=3)
    await wait_for(lambda: _parked_at(pool, execution_id, 5), "the gate before verify")
    assert trail.read_text().split() == ["7.0.0", "7.0.0"]
    await approve(http, senior, execution_id, step_number=5)
    row = await wait_for(lambda: finished(pool, execution_id), "the deploy to finish")

    assert row["status"] == "succeeded", fleet.log("single-slot")
    assert [s["status"] for s in await steps_of(pool, execution_id)] == ["succeeded"] * 6
    events = await events_of(pool, execution_id)
    gates = [
        e["payload"]["step_number"]
        for e in events
        if e["event_kind"] == "approval_requested" and e["payload"]["step_number"] is not None
    ]
    assert gates == [3, 5]


# --- Redis is optional ----------------------------------------------------------------------


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private ``redis-server`` the test may kill; skipped (or failed in CI) if absent."""
    with private_redis(tmp_path) as server:
        yield server


async def test_background_and_immediate_work_outlive_redis(
    database_dsn: str,
    tenant: TenantFixture,
    pool: asyncpg.Pool,
    fleet: Fleet,
    redis: RedisServer,
    tmp_path: Path,
) -> None:
    redis_url = redis.url
    key = tenant.admin_key
    async with (
        live_api(database_dsn, tmp_path / "api", worker_concurrency=0, redis_url=redis_url) as api,
        httpx.AsyncClient(base_url=api.url, timeout=30) as http,
    ):
        await fleet.start("redis-fed", env={"OPSEXEC_REDIS_URL": redis_url})

        async def both_kinds_of_work(group_by: str) -> None:
            immediate = await submit(http, key, count_plan(group_by))
            assert (immediate["execution_mode"], immediate["status"]) == ("immediate", "succeeded")
            background = await submit(
                http, key, get_url(f"{api.url}/healthz", group_by), mode="background"
            )
            row = await wait_for(lambda: finished(pool, background["id"]), "the background job")
            assert (row["status"], row["worker_id"]) == ("succeeded", "redis-fed")
            events = await http.get(
                f"/v1/executions/{background['id']}/events", headers=bearer(key)
            )
            assert events.status_code == 200, events.text
            assert events.json()["done"], events.text

        await both_kinds_of_work("tags")
        redis.kill()
        await both_kinds_of_work("environment")
    for worker in fleet.processes.values():
        assert worker.returncode is None, "the worker outlived Redis"


async def _signals_via_redis(fleet: Fleet, name: str) -> bool:
    return any(
        line.get("message") == "worker signals" and line.get("via") == "redis"
        for line in _json_lines(fleet.log(name))
    )


def _json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for raw in text.splitlines():
        with contextlib.suppress(ValueError):
            lines.append(json.loads(raw))
    return lines


async def test_force_cancel_reaches_a_worker_through_redis_within_a_second(
    database_dsn: str,
    tenant: TenantFixture,
    pool: asyncpg.Pool,
    fleet: Fleet,
    redis: RedisServer,
    tmp_path: Path,
) -> None:
    """The API's event bus relays the cancel to Redis; the worker holds no LISTEN."""
    key = tenant.admin_key
    async with (
        live_api(database_dsn, tmp_path / "api", worker_concurrency=0, redis_url=redis.url) as api,
        httpx.AsyncClient(base_url=api.url, timeout=30) as http,
    ):
        await add_local_assets(http, key, ["local-redis"], "development")
        await fleet.start("redis-ear", env={"OPSEXEC_REDIS_URL": redis.url})
        await wait_for(lambda: _signals_via_redis(fleet, "redis-ear"), "signals via Redis")
        marker = f"31.{uuid.uuid4().int % 10**6:06d}"
        execution = await submit(
            http,
            key,
            {"steps": [shell("sleep", f"sleep {marker}", "local-redis")]},
            mode="background",
        )
        if execution["status"] == "awaiting_approval":
            await approve(http, key, execution["id"])

        async def step_running() -> bool:
            return [s["status"] for s in await steps_of(pool, execution["id"])] == ["running"]

        await wait_for(step_running, "the step to start")
        started = asyncio.get_running_loop().time()
        cancelled = await http.post(
            f"/v1/executions/{execution['id']}/cancel",
            json={"force": True, "reason": "abort"},
            headers=bearer(key),
        )
        assert cancelled.status_code == 200, cancelled.text
        row = await wait_for(lambda: finished(pool, execution["id"]), "the cancel")
        elapsed = asyncio.get_running_loop().time() - started
    assert row["status"] == "cancelled", fleet.log("redis-ear")
    assert elapsed < 1.5, f"the forced cancel took {elapsed:.2f} s"
    assert await _signals_via_redis(fleet, "redis-ear"), "the worker stayed on Redis"


async def test_a_workers_log_lines_carry_the_executions_fields_and_request_id(
    http: httpx.AsyncClient,
    tenant: TenantFixture,
    pool: asyncpg.Pool,
    fleet: Fleet,
    api_server: ApiServer,
) -> None:
    """The X-Request-ID of the submit reaches the worker process's lines (R-OBS)."""
    request_id = f"bg-{uuid.uuid4().hex[:12]}"
    response = await http.post(
        "/v1/executions",
        json={"plan": get_url(f"{api_server.url}/healthz", "logged"), "mode": "background"},
        headers={**bearer(tenant.admin_key), "X-Request-ID": request_id},
    )
    assert response.status_code == 201, response.text
    execution = response.json()
    await fleet.start("logger")
    row = await wait_for(lambda: finished(pool, execution["id"]), "the job")
    assert row["status"] == "succeeded"

    async def finished_line_written() -> list[dict[str, Any]]:
        lines = _json_lines(fleet.log("logger"))
        ours = [line for line in lines if line.get("exec_id") == execution["id"]]
        return ours if any(x["message"] == "execution finished" for x in ours) else []

    ours = await wait_for(finished_line_written, "the worker's log lines")
    for line in ours:
        assert (line["tenant_id"], line["worker_id"]) == (str(tenant.id), "logger"), line
    engine_lines = [line for line in ours if "plan_hash" in line]
    assert engine_lines, "the engine's lines carry the execution's identity"
    for line in engine_lines:
        assert line["request_id"] == request_id, line
        assert line["plan_hash"] == execution["plan_hash"]
    (done,) = [line for line in ours if line["message"] == "execution finished"]
    assert done["status"] == "succeeded"
    assert done["action"] == "http.request"
    assert isinstance(done["queue_wait_ms"], int)


# --- a target locked by another execution ------------------------------------------------


async def _hold_target(
    http: httpx.AsyncClient, key: str, target: str, seconds: float
) -> asyncio.Task[httpx.Response]:
    """An immediate execution that holds ``target``'s lock for ``seconds`` (run in-request)."""
    plan = {"steps": [shell("hold", f"sleep {seconds}", target)]}
    plan["steps"][0]["estimated_duration_s"] = 2
    holder = (await http.post("/v1/executions", json={"plan": plan}, headers=bearer(key))).json()
    return asyncio.create_task(
        http.post(f"/v1/executions/{holder['id']}/approve", headers=bearer(key))
    )


async def _lock_held(pool: asyncpg.Pool, target: str) -> bool:
    held = await pool.fetchval(
        "SELECT count(*) FROM execution_locks WHERE lock_key LIKE '%' || $1 || '%'", target
    )
    return bool(held)


@pytest.mark.parametrize("budget", ["enough", "spent"])
async def test_a_busy_target_defers_the_job_uncharged_until_the_lock_wait_budget_is_spent(
    http: httpx.AsyncClient,
    tenant: TenantFixture,
    pool: asyncpg.Pool,
    fleet: Fleet,
    tmp_path: Path,
    budget: str,
) -> None:
    key = tenant.admin_key
    target = f"locked-{uuid.uuid4().hex[:6]}"
    await add_local_assets(http, key, [target], "staging")
    holder = await _hold_target(http, key, target, 2.5)
    await wait_for(lambda: _lock_held(pool, target), "the holder to take the lock")
    marker = tmp_path / "ran"
    execution = await submit(
        http, key, {"steps": [shell("write", f"echo ran > {marker}", target)]}, mode="background"
    )
    if execution["status"] == "awaiting_approval":
        await approve(http, key, execution["id"])
    if budget == "spent":  # the lock-wait budget is the execution's own timeout
        await pool.execute(
            "UPDATE executions SET timeout_ms = 400 WHERE id = $1", uuid.UUID(execution["id"])
        )
    await fleet.start("patient", env={"OPSEXEC_QUEUE_BACKOFF_UNIT_S": "0.1"})

    async def deferred_twice() -> bool:
        job = await queue_row(pool, execution["id"])
        return int(job["metadata"].get("lock_deferrals", 0)) >= 2

    if budget == "enough":
        await wait_for(deferred_twice, "the job to be deferred twice")
        job = await queue_row(pool, execution["id"])
        assert (job["status"], job["attempt"]) == ("queued", 0), "deferrals are not attempts"
        assert "waiting for lock" in job["last_error"]
        assert (await execution_row(pool, execution["id"]))["status"] == "approved"
    row = await wait_for(lambda: finished(pool, execution["id"]), "the job to end")
    assert (await holder).json()["status"] == "succeeded"
    job = await queue_row(pool, execution["id"])
    assert (job["status"], job["attempt"]) == ("completed", 0), fleet.log("patient")
    if budget == "enough":
        assert row["status"] == "succeeded", fleet.log("patient")
        assert marker.read_text().strip() == "ran"
    else:
        assert (row["status"], row["error_class"]) == ("failed", "ResourceBusyError")
        assert not marker.exists()


# --- cancelling background work that is not running ---------------------------------------


async def test_cancel_reaches_a_queued_job_and_a_job_parked_at_a_gate(
    http: httpx.AsyncClient,
    tenant: TenantFixture,
    pool: asyncpg.Pool,
    fleet: Fleet,
    api_server: ApiServer,
    tmp_path: Path,
) -> None:
    key = tenant.admin_key
    queued = await submit(
        http, key, get_url(f"{api_server.url}/healthz", "never-run"), mode="background"
    )
    assert queued["status"] == "approved"
    cancelled = await http.post(f"/v1/executions/{queued['id']}/cancel", headers=bearer(key))
    assert cancelled.json()["status"] == "cancelled", cancelled.text
    assert (await queue_row(pool, queued["id"]))["status"] == "completed"

    trail = tmp_path / "deployed"
    script = tmp_path / "deploy.sh"
    script.write_text(f'#!/bin/sh\necho "$1" >> {trail}\n')
    script.chmod(0o755)
    targets = ["prod-cancel-01"]
    await add_local_assets(http, key, targets, "production")
    plan = load("deploy_prod_50.json")
    precheck, deploy, _ = plan["steps"]
    plan["steps"] = [
        {**precheck, "targets": targets, "inputs": {"path": str(tmp_path)}},
        {
            **deploy,
            "targets": targets,
            "inputs": {**deploy["inputs"], "script": str(script)},
            "requires_approval": True,
        },
    ]
    _, deployer = await make_user(pool, tenant, ["deployer"])
    _, senior = await make_user(pool, tenant, ["senior_approver"])
    gated = await submit(http, deployer, plan)
    await approve(http, senior, gated["id"])
    await fleet.start("gate-keeper")
    await wait_for(lambda: _parked_at(pool, gated["id"], 2), "the gate before deploy")
    stopped = await http.post(
        f"/v1/executions/{gated['id']}/cancel", json={"reason": "no"}, headers=bearer(key)
    )
    assert stopped.json()["status"] == "cancelled", stopped.text
    job = await queue_row(pool, gated["id"])
    assert (job["status"], job["leased_by"]) == ("completed", None)
    await asyncio.sleep(1.5)  # the worker polls every second: it had its chance
    assert not trail.exists(), "nothing was deployed"
    assert (await execution_row(pool, queued["id"]))["started_at"] is None
