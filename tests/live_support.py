"""Helpers for the live-progress, console and CLI-client tests.

A worker-enabled API in the test's event loop, plans that run long enough to watch, and
small clients for the three stream transports.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import ApiServer, bearer, free_port
from tests.services import missing_service

TERMINAL = {"succeeded", "failed", "cancelled", "rejected"}


@asynccontextmanager
async def live_api(
    database_dsn: str, data_dir: Path, *, worker_concurrency: int = 2, **settings: Any
) -> AsyncIterator[ApiServer]:
    """The real app (with its event bus and a background worker) behind uvicorn."""
    import uvicorn

    from opsexec.api.app import create_app
    from opsexec.config import Settings

    config = Settings(database_url=database_dsn, data_dir=data_dir, **settings)
    app = create_app(config, worker_concurrency=worker_concurrency, retry_backoff_s=0.02)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    try:
        yield ApiServer(url=f"http://127.0.0.1:{port}", settings=config, app=app)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=60)


def chain_plan(steps: int, command: str, target: str = "local-01") -> dict[str, Any]:
    """``steps`` shell steps in a row on one target, each depending on the one before."""
    return {
        "steps": [
            {
                "id": f"s{i + 1}",
                "action": "shell.run",
                "targets": [target],
                "inputs": {"command": command.replace("{n}", str(i + 1))},
                "estimated_duration_s": 1,
                **({"depends_on": [f"s{i}"]} if i else {}),
            }
            for i in range(steps)
        ]
    }


async def submit(
    http: httpx.AsyncClient, key: str, plan: dict[str, Any], **body: Any
) -> dict[str, Any]:
    response = await http.post(
        "/v1/executions",
        json={"plan": plan, "mode": "background", **body},
        headers=bearer(key),
    )
    assert response.status_code == 201, response.text
    execution: dict[str, Any] = response.json()
    return execution


async def approve(http: httpx.AsyncClient, key: str, execution_id: str) -> None:
    response = await http.post(f"/v1/executions/{execution_id}/approve", headers=bearer(key))
    assert response.status_code == 200, response.text


async def db_seqs(pool: asyncpg.Pool, execution_id: str) -> list[int]:
    rows = await pool.fetch(
        "SELECT seq FROM execution_events WHERE execution_id = $1 ORDER BY seq",
        uuid.UUID(execution_id),
    )
    return [row["seq"] for row in rows]


async def wait_status(
    http: httpx.AsyncClient, key: str, execution_id: str, wanted: set[str], timeout: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = await http.get(f"/v1/executions/{execution_id}", headers=bearer(key))
        execution: dict[str, Any] = response.json()
        if execution["status"] in wanted:
            return execution
        if time.monotonic() > deadline:
            raise AssertionError(f"execution stayed {execution['status']}, wanted {wanted}")
        await asyncio.sleep(0.1)


# --- stream clients ----------------------------------------------------------------------------


@dataclass
class SseFrame:
    event: str
    data: dict[str, Any]
    id: str | None
    comment: bool = False


async def sse_frames(response: httpx.Response) -> AsyncIterator[SseFrame]:
    """Frames of an SSE response, heartbeat comments included (as ``comment=True``)."""
    event, data, frame_id = "message", [], None
    async for line in response.aiter_lines():
        if line.startswith(":"):
            yield SseFrame("comment", {}, None, comment=True)
        elif line == "":
            if data or event != "message":
                yield SseFrame(event, json.loads("\n".join(data)) if data else {}, frame_id)
            event, data, frame_id = "message", [], None
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
            elif name == "id":
                frame_id = value


# --- subprocesses: `opsexec serve` and a private redis-server ----------------------------------


@dataclass
class ServeProcess:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_serve(
    dsn: str, data_dir: Path, log: Path, *, worker_concurrency: int, **env: str
) -> ServeProcess:
    """``opsexec serve`` as a user runs it; ``env`` values of "" remove a variable."""
    environment = {**os.environ, "OPSEXEC_DATABASE_URL": dsn, "OPSEXEC_DATA_DIR": str(data_dir)}
    environment["OPSEXEC_LOG_LEVEL"] = "WARNING"
    for name, value in env.items():
        if value:
            environment[name] = value
        else:
            environment.pop(name, None)
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "opsexec",
            "serve",
            "--port",
            str(port),
            "--worker-concurrency",
            str(worker_concurrency),
        ],
        env=environment,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return ServeProcess(url=f"http://127.0.0.1:{port}", process=process, log=log)


async def wait_ready(serve: ServeProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            if serve.process.poll() is not None:
                pytest.fail(
                    f"serve exited with {serve.process.returncode}:\n{serve.log.read_text()}"
                )
            try:
                if (await client.get(f"{serve.url}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    pytest.fail(f"serve never became ready:\n{serve.log.read_text()}")


def _spawn_redis(port: int, tmp: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        missing_service("redis-server is not installed")
    arguments = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp)]
    process = subprocess.Popen(
        [binary, *arguments, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)


@dataclass
class RedisServer:
    url: str
    port: int
    tmp: Path
    process: subprocess.Popen[bytes]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def restart(self) -> None:
        """Back on the same port, empty (pub/sub keeps no state anyway)."""
        self.kill()
        self.process = _spawn_redis(self.port, self.tmp)


@contextmanager
def private_redis(tmp: Path) -> Iterator[RedisServer]:
    """A throwaway ``redis-server`` on a free loopback port, killed afterwards."""
    port = free_port()
    server = RedisServer(
        url=f"redis://127.0.0.1:{port}/0", port=port, tmp=tmp, process=_spawn_redis(port, tmp)
    )
    try:
        yield server
    finally:
        server.kill()
