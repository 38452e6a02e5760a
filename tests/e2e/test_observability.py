"""Observability (R-OBS): Prometheus metrics, structured logs with request ids, readiness,
and the shipped operations files checked against what the service really exports."""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
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
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO_ROOT, ApiServer, TenantFixture, bearer, migrated_database
from tests.live_support import live_api, private_redis
from tests.services import missing_service
from tests.support import count_plan, other_tenant_admin, shell_plan
from tests.worker_support import wait_for

pytestmark = pytest.mark.postgres

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by name and label set (parsed by the client)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(http: httpx.AsyncClient) -> Samples:
    response = await http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over samples named ``name`` whose labels include ``labels`` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def step(step_id: str, command: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": step_id,
        "action": "shell.run",
        "targets": ["local-01"],
        "inputs": {"command": command},
        "estimated_duration_s": 1,
        **extra,
    }


async def submit(
    http: httpx.AsyncClient, key: str, plan: dict[str, Any], **body: Any
) -> httpx.Response:
    return await http.post("/v1/executions", json={"plan": plan, **body}, headers=bearer(key))


async def run_confirmed(http: httpx.AsyncClient, key: str, plan: dict[str, Any]) -> dict[str, Any]:
    """Submit a level-1 plan and confirm it as its requester: it runs in the request."""
    submitted = await submit(http, key, plan)
    assert submitted.status_code == 201, submitted.text
    execution: dict[str, Any] = submitted.json()
    approved = await http.post(f"/v1/executions/{execution['id']}/approve", headers=bearer(key))
    assert approved.status_code == 200, approved.text
    result: dict[str, Any] = approved.json()
    return result


# --- /metrics ---------------------------------------------------------------------------------


async def test_metrics_count_successes_failures_timeouts_and_cancellations(
    http: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool
) -> None:
    key = stocked.admin_key
    before = await scrape(http)

    once = {**bearer(key), "Idempotency-Key": f"metrics-{uuid.uuid4().hex}"}
    succeeded = await http.post("/v1/executions", json={"plan": count_plan()}, headers=once)
    assert succeeded.json()["status"] == "succeeded"
    again = await http.post("/v1/executions", json={"plan": count_plan()}, headers=once)
    assert again.json()["id"] == succeeded.json()["id"], "an idempotent hit"
    failed = await run_confirmed(http, key, shell_plan("exit 3"))
    assert failed["status"] == "failed"
    timed_out = await run_confirmed(http, key, {"steps": [step("slow", "sleep 30", timeout_s=1)]})
    assert (timed_out["status"], timed_out["timed_out"]) == ("failed", True)

    slow = [step(f"s{i}", "sleep 0.4", depends_on=[f"s{i - 1}"] if i else []) for i in range(4)]
    pending = (await submit(http, key, {"steps": slow})).json()
    running = asyncio.create_task(
        http.post(f"/v1/executions/{pending['id']}/approve", headers=bearer(key))
    )
    await _wait_until_running(pool, pending["id"])
    cancel = await http.post(f"/v1/executions/{pending['id']}/cancel", headers=bearer(key))
    assert cancel.status_code == 200, cancel.text
    assert (await running).json()["status"] == "cancelled"

    refused = (await submit(http, key, shell_plan("true"))).json()
    rejected = await http.post(
        f"/v1/executions/{refused['id']}/reject", json={"reason": "no"}, headers=bearer(key)
    )
    assert rejected.json()["status"] == "rejected", rejected.text

    foreign = await other_tenant_admin(pool)
    probe = await http.get(f"/v1/executions/{succeeded.json()['id']}", headers=bearer(foreign))
    assert probe.status_code == 404

    after = await scrape(http)
    finished = "opsexec_executions_finished_total"
    assert delta(before, after, finished, status="succeeded", mode="immediate") == 1
    assert delta(before, after, finished, status="failed", mode="immediate") == 2
    assert delta(before, after, finished, status="cancelled", mode="immediate") == 1
    assert delta(before, after, finished, status="rejected") == 1
    duration = "opsexec_execution_duration_seconds_count"
    assert delta(before, after, duration, action="inventory.count", status="succeeded") == 1
    assert delta(before, after, duration, action="shell.run", status="failed") == 2
    assert delta(before, after, duration, action="shell.run", status="cancelled") == 1
    timeouts = "opsexec_execution_timeouts_total"
    assert delta(before, after, timeouts, action="shell.run", sla_class=timed_out["sla_class"]) == 1
    assert delta(before, after, "opsexec_cancellations_total", source="user") == 1
    assert delta(before, after, "opsexec_cancellations_total", source="system") == 0
    assert delta(before, after, "opsexec_idempotent_hits_total") == 1
    assert delta(before, after, "opsexec_rbac_violations_total", layer="api") == 1
    route = "/v1/executions/{execution_id}/approve"
    http_count = "opsexec_http_request_duration_seconds_count"
    assert delta(before, after, http_count, route=route, method="POST", status="200") == 3
    assert delta(before, after, http_count, route="/v1/executions", status="201") == 5
    assert delta(before, after, http_count, route="/v1/executions", status="200") == 1
    assert value(after, "opsexec_database_up") == 1
    for state in ("ready", "deferred", "held"):
        assert ("opsexec_queue_depth", frozenset({("state", state)})) in after
    assert value(after, "opsexec_dlq_entries") >= 0
    assert value(after, "opsexec_build_info") == 1


async def _wait_until_running(pool: asyncpg.Pool, execution_id: str) -> None:
    for _ in range(200):
        status = await pool.fetchval(
            "SELECT status FROM execution_steps WHERE execution_id = $1 AND step_number = 2",
            uuid.UUID(execution_id),
        )
        if status == "running":
            return
        await asyncio.sleep(0.05)
    pytest.fail("step 2 never started")


async def test_metrics_report_the_database_down_instead_of_failing(
    database_dsn: str, tmp_path: Path
) -> None:
    async with live_api(database_dsn, tmp_path, worker_concurrency=0) as api:
        await api.app.state.db.pool.close()  # as good as a database that went away
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
            response = await http.get("/metrics")
            ready = await http.get("/readyz")
    assert response.status_code == 200
    samples = parse(response.text)
    assert value(samples, "opsexec_database_up") == 0
    assert not any(name == "opsexec_queue_depth" for name, _ in samples)
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"]["status"] == "unavailable"


# --- request ids and structured logs ----------------------------------------------------------


class _RecordingServer:
    """A downstream HTTP service that remembers the headers of every request it got."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        recorded = self.headers

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                recorded.append({k.lower(): v for k, v in self.headers.items()})
                body = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def downstream() -> Iterator[_RecordingServer]:
    server = _RecordingServer()
    try:
        yield server
    finally:
        server.close()


R_OBS_IDENTITY = ("exec_id", "tenant_id", "plan_hash", "request_id", "actor_id", "approval_level")


async def test_one_executions_log_lines_carry_its_fields_and_request_id_goes_downstream(
    http: httpx.AsyncClient,
    stocked: TenantFixture,
    downstream: _RecordingServer,
    captured_logs: io.StringIO,
) -> None:
    request_id = f"obs-{uuid.uuid4().hex[:12]}"
    plan = {
        "steps": [
            {
                "id": "probe",
                "action": "http.request",
                "targets": [],
                "inputs": {"method": "GET", "url": f"{downstream.url}/health"},
                "estimated_duration_s": 1,
            },
            step("fail", "echo about to fail; exit 4", depends_on=["probe"]),
        ]
    }
    headers = {**bearer(stocked.admin_key), "X-Request-ID": request_id}
    submitted = await http.post("/v1/executions", json={"plan": plan}, headers=headers)
    assert submitted.status_code == 201, submitted.text
    assert submitted.headers["x-request-id"] == request_id
    execution_id = submitted.json()["id"]
    approved = await http.post(f"/v1/executions/{execution_id}/approve", headers=headers)
    assert approved.json()["status"] == "failed"

    assert [h.get("x-request-id") for h in downstream.headers] == [request_id]
    lines = [json.loads(line) for line in captured_logs.getvalue().splitlines() if line]
    ours = [line for line in lines if line.get("exec_id") == execution_id]
    messages = [line["message"] for line in ours]
    assert "execution submitted" in messages
    assert "execution finished" in messages
    for line in ours:
        missing = [name for name in R_OBS_IDENTITY if name not in line]
        assert not missing, f"{line['message']!r} lacks {missing}"
        assert line["request_id"] == request_id
        assert line["tenant_id"] == str(stocked.id)
        assert line["plan_hash"] == approved.json()["plan_hash"]
    (done,) = [line for line in ours if line["message"] == "execution finished"]
    assert done["status"] == "failed"
    assert done["error_class"] == approved.json()["error_class"]
    assert done["action"] == "shell.run"
    assert done["targets"] == ["local-01"]
    for name in ("duration_ms", "retries_total", "cancel_checks_performed"):
        assert isinstance(done[name], int), name


@pytest.mark.parametrize("incoming", [None, "", "x" * 129, "bad id\twith tab", "ümlaut"])
async def test_a_missing_or_unsafe_request_id_is_replaced(
    http: httpx.AsyncClient, incoming: str | None
) -> None:
    headers = {} if incoming is None else {"X-Request-ID": incoming}
    try:
        response = await http.get("/healthz", headers=headers)
    except UnicodeEncodeError:
        response = await http.get("/healthz", headers={"X-Request-ID": incoming.encode()})
    generated = response.headers["x-request-id"]
    assert generated != incoming
    assert uuid.UUID(generated).version == 4


async def test_errors_carry_the_request_id_too(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/executions", headers={"X-Request-ID": "trace-42"})
    assert response.status_code == 401
    assert response.headers["x-request-id"] == "trace-42"
    assert response.headers["content-type"] == "application/problem+json"


# --- readiness -------------------------------------------------------------------------------


async def test_readyz_reports_database_migrations_redis_and_workers(
    database_dsn: str, tmp_path: Path
) -> None:
    with private_redis(tmp_path) as redis:
        async with (
            live_api(
                database_dsn,
                tmp_path / "data",
                worker_concurrency=1,
                redis_url=redis.url,
                worker_heartbeat_s=1.0,
            ) as api,
            httpx.AsyncClient(base_url=api.url, timeout=30) as http,
        ):

            async def workers_reported() -> dict[str, Any]:
                body: dict[str, Any] = (await http.get("/readyz")).json()
                workers = body["checks"].get("workers", {})
                return body if workers.get("status") == "ok" else {}

            # The in-process worker registers its heartbeat once its task starts.
            ready = await wait_for(workers_reported, "the worker's first heartbeat", 10)
            assert ready["status"] == "ready"
            checks = ready["checks"]
            assert checks["database"]["status"] == "ok"
            assert checks["migrations"]["current"] == checks["migrations"]["head"]
            assert checks["redis"]["status"] == "ok"
            assert checks["workers"]["status"] == "ok"
            assert checks["workers"]["running"] >= 1
            assert checks["workers"]["newest_heartbeat_age_s"] < 5
            assert ready["degraded"] == []

            redis.kill()
            degraded = await http.get("/readyz")
            assert degraded.status_code == 200, "Redis is optional: degraded, still ready"
            body = degraded.json()
            assert body["checks"]["redis"]["status"] == "degraded"
            assert "redis" in body["degraded"]


# --- shipped operations files -----------------------------------------------------------------

DEPLOY = REPO_ROOT / "deploy"
_METRIC = re.compile(r"\bopsexec_[a-z0-9_]+\b")


def _exported_names(text: str) -> set[str]:
    """Sample names and family names (without a histogram's or counter's suffixes)."""
    names: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    for family in text_string_to_metric_families(text):
        # A labelled series appears at its first observation; its family is declared now.
        names.add(family.name)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


def _names_used(document: str) -> set[str]:
    return set(_METRIC.findall(document))


def test_promtool_accepts_the_alert_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        missing_service("promtool is not installed (Debian package prometheus)")
    result = subprocess.run(
        [promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


async def test_every_metric_the_dashboard_and_alerts_use_is_exported(
    http: httpx.AsyncClient, api_server: ApiServer
) -> None:
    exported = _exported_names((await http.get("/metrics")).text)
    dashboard = json.loads((DEPLOY / "grafana" / "opsexec.json").read_text())
    expressions = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert len(expressions) >= 8
    alerts = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    used = _names_used("\n".join(expressions)) | _names_used(alerts)
    assert used, "the files name no opsexec metric"
    unknown = sorted(name for name in used if name not in exported)
    assert not unknown, f"used but not exported: {unknown}"
    for wanted in (
        "p95",
        "throughput",
        "queue depth",
        "dead-letter queue",
        "timeouts",
        "cancellations",
        "lock conflicts",
        "rbac",
    ):
        titles = " ".join(panel.get("title", "") for panel in dashboard["panels"]).lower()
        assert wanted in titles, f"no dashboard panel about {wanted}"


def test_systemd_units_run_serve_and_worker() -> None:
    serve = (DEPLOY / "systemd" / "opsexec.service").read_text()
    worker = (DEPLOY / "systemd" / "opsexec-worker.service").read_text()
    assert re.search(r"^ExecStart=.*opsexec serve", serve, re.M)
    assert re.search(r"^ExecStart=.*opsexec worker", worker, re.M)
    for unit in (serve, worker):
        assert re.search(r"^KillSignal=SIGTERM", unit, re.M) or "KillSignal" not in unit
        assert re.search(r"^User=", unit, re.M), "services never run as root"
    verify = shutil.which("systemd-analyze")
    if verify is None:
        return
    for name in ("opsexec.service", "opsexec-worker.service"):
        result = subprocess.run(
            [verify, "verify", str(DEPLOY / "systemd" / name)],
            capture_output=True,
            text=True,
            check=False,
        )
        # Missing binaries and users on this machine are expected; syntax errors are not.
        assert "Unknown key" not in result.stderr, result.stderr
        assert "Invalid" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("revision", "status_code", "migrations"), [("0001", 503, "pending"), ("9999", 200, "ahead")]
)
async def test_readyz_fails_behind_the_code_and_tolerates_a_schema_ahead_of_it(
    server_dsn: str, tmp_path: Path, revision: str, status_code: int, migrations: str
) -> None:
    """Ahead: newer code already migrated (rolling deploy); migrations only add."""
    async with (
        migrated_database(server_dsn, "opsexec_readyz") as dsn,
        live_api(dsn, tmp_path, worker_concurrency=0) as api,
    ):
        connection = await asyncpg.connect(dsn)
        try:
            await connection.execute("UPDATE alembic_version SET version_num = $1", revision)
        finally:
            await connection.close()
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
            response = await http.get("/readyz")
    assert response.status_code == status_code, response.text
    assert response.json()["checks"]["migrations"]["status"] == migrations
