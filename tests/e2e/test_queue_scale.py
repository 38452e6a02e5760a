"""1,000 background jobs over 4 worker processes: every job runs exactly once."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import TenantFixture, bearer
from tests.worker_support import start_worker, stop

pytestmark = pytest.mark.postgres
JOBS = 1000


class _Counting(BaseHTTPRequestHandler):
    hits: Counter[str] = Counter()
    lock = threading.Lock()

    def do_GET(self) -> None:
        with _Counting.lock:
            _Counting.hits[self.path] += 1
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def counting_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


async def test_thousand_jobs_over_four_workers_run_exactly_once(
    http: httpx.AsyncClient,
    stocked: TenantFixture,
    pool: asyncpg.Pool,
    database_dsn: str,
    tmp_path: Path,
    counting_server: str,
) -> None:
    headers = bearer(stocked.admin_key)
    semaphore = asyncio.Semaphore(8)

    async def submit(n: int) -> str:
        plan = {
            "steps": [
                {
                    "id": "hit",
                    "action": "http.request",
                    "targets": [],
                    "inputs": {"method": "GET", "url": f"{counting_server}/job/{n}"},
                    "estimated_duration_s": 1,
                }
            ]
        }
        async with semaphore:
            response = await http.post(
                "/v1/executions", json={"plan": plan, "mode": "background"}, headers=headers
            )
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    ids = await asyncio.gather(*(submit(n) for n in range(JOBS)))
    workers = [await start_worker(database_dsn, tmp_path, f"w{i}", concurrency=4) for i in range(4)]
    try:
        deadline = asyncio.get_running_loop().time() + 240
        while True:
            done = await pool.fetchval(
                "SELECT count(*) FROM executions WHERE id = ANY($1::uuid[])"
                " AND status IN ('succeeded', 'failed')",
                ids,
            )
            if done == JOBS:
                break
            assert asyncio.get_running_loop().time() < deadline, f"{done}/{JOBS} finished"
            await asyncio.sleep(0.5)
    finally:
        for worker in workers:
            await stop(worker)
    assert len(_Counting.hits) == JOBS
    assert set(_Counting.hits.values()) == {1}, "a job ran more than once"
    statuses = await pool.fetch(
        "SELECT status, count(*) AS n, count(DISTINCT worker_id) AS workers FROM executions"
        " WHERE id = ANY($1::uuid[]) GROUP BY status",
        ids,
    )
    assert [(r["status"], r["n"]) for r in statuses] == [("succeeded", JOBS)]
    assert statuses[0]["workers"] == 4, "the work was spread over every worker"
