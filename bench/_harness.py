"""Shared bench plumbing: a scratch database and a real `opsexec serve` on a free port.

Benchmarks talk to the service the way users do (HTTP, real PostgreSQL), never to mocks.
``OPSEXEC_DATABASE_URL`` picks the server; unset, the embedded PostgreSQL is used.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from opsexec.store.embedded import EmbeddedPostgres

RequestFn = Callable[[httpx.AsyncClient], Awaitable[None]]


@dataclass(frozen=True)
class Service:
    url: str
    api_key: str
    dsn: str


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def report(
    title: str,
    rows: list[tuple[str, float, float]],
    *,
    lower_is_better: frozenset[str] = frozenset(),
) -> None:
    """Print ``(label, measured, target)`` rows with their ratio to the target.

    The ratio reads the same way for every row: above 1.0 beats the target. For rows
    named in ``lower_is_better`` (latencies) it is target / measured.
    """
    print(f"\n{title}")
    print(f"{'figure':<48}{'measured':>12}{'target':>12}{'ratio':>8}")
    for label, measured, target in rows:
        ratio = target / measured if label in lower_is_better else measured / target
        print(f"{label:<48}{measured:>12.1f}{target:>12.1f}{ratio:>8.2f}")


@asynccontextmanager
async def scratch_database() -> AsyncIterator[str]:
    url = os.environ.get("OPSEXEC_DATABASE_URL")
    embedded = None
    tmp = None
    if not url:
        tmp = tempfile.TemporaryDirectory(prefix="opsexec-bench-")
        embedded = await EmbeddedPostgres.start(Path(tmp.name))
        url = embedded.dsn
    name = f"opsexec_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(url)._replace(path="/" + name))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        if embedded is not None:
            await embedded.stop()
        if tmp is not None:
            tmp.cleanup()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_service(dsn: str, *extra_args: str) -> Iterator[Service]:
    """`opsexec serve` in a subprocess; yields once /readyz answers, stops it afterwards."""
    data_dir = tempfile.mkdtemp(prefix="opsexec-bench-data-")
    port = _free_port()
    env = {
        **os.environ,
        "OPSEXEC_DATABASE_URL": dsn,
        "OPSEXEC_DATA_DIR": data_dir,
        "OPSEXEC_LOG_LEVEL": "WARNING",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "opsexec", "serve", "--port", str(port), *extra_args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        key = (Path(data_dir) / "admin-api-key").read_text().strip()
        yield Service(url=url, api_key=key, dsn=dsn)
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(data_dir, ignore_errors=True)  # it holds the admin API key


async def run_clients(
    clients: int, duration_s: float, request: RequestFn
) -> tuple[int, list[float]]:
    """``clients`` concurrent loops calling ``request`` for ``duration_s``; latencies in ms."""
    latencies: list[float] = []
    stop_at = time.monotonic() + duration_s

    async def loop(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            await request(client)
            latencies.append((time.perf_counter() - started) * 1000)

    async with httpx.AsyncClient(timeout=30) as http:
        await asyncio.gather(*(loop(http) for _ in range(clients)))
    return len(latencies), latencies
