"""Worker processes, a systemctl stand-in and small probes for the background-queue tests.

Workers run as real ``python -m opsexec worker`` subprocesses against the session's
database, with short reaper intervals and backoffs so crash recovery happens within a
test's patience. Every process a test starts is killed in the fixture's teardown, even a
stopped (SIGSTOP) one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx

from tests.conftest import bearer

T = TypeVar("T")
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "rejected"})

WORKER_ENV = {
    "OPSEXEC_REAPER_INTERVAL_S": "0.3",
    "OPSEXEC_QUEUE_BACKOFF_UNIT_S": "0.05",
    "OPSEXEC_SHUTDOWN_GRACE_S": "20",
}
"""Defaults for test workers: a dead worker's lease is reaped within a third of a second."""


@dataclass
class Fleet:
    """The worker subprocesses of one test; logs go to ``<root>/<worker id>.log``."""

    dsn: str
    root: Path
    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)

    async def start(
        self, name: str, *, concurrency: int = 1, env: dict[str, str] | None = None
    ) -> asyncio.subprocess.Process:
        process = await start_worker(self.dsn, self.root, name, concurrency=concurrency, env=env)
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        """What a worker printed; assertion messages include it."""
        return (self.root / f"{name}.log").read_text(errors="replace")[-4000:]

    async def kill_all(self) -> None:
        for process in self.processes.values():
            await stop(process)


async def start_worker(
    dsn: str,
    root: Path,
    name: str,
    *,
    concurrency: int = 1,
    env: dict[str, str] | None = None,
) -> asyncio.subprocess.Process:
    """``opsexec worker --worker-id name`` on ``dsn``, logging to ``<root>/<name>.log``."""
    environment = {
        **os.environ,
        "OPSEXEC_DATABASE_URL": dsn,
        "OPSEXEC_DATA_DIR": str(root / "worker-data"),
        **WORKER_ENV,
        **(env or {}),
    }
    with (root / f"{name}.log").open("ab") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "opsexec",
            "worker",
            "--concurrency",
            str(concurrency),
            "--worker-id",
            name,
            env=environment,
            stdout=log,
            stderr=log,
        )


async def stop(process: asyncio.subprocess.Process) -> None:
    """Kill a worker (even a SIGSTOPped one) and reap it."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)  # a stopped process cannot die
            process.kill()
        await process.wait()


async def wait_for(
    probe: Callable[[], Awaitable[T]],
    what: str = "the condition",
    timeout: float = 60.0,
    interval: float = 0.05,
) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


async def execution_row(pool: asyncpg.Pool, execution_id: str) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM executions WHERE id = $1", uuid.UUID(execution_id))
    assert row is not None
    return row


async def finished(pool: asyncpg.Pool, execution_id: str) -> asyncpg.Record | None:
    row = await execution_row(pool, execution_id)
    return row if row["status"] in TERMINAL else None


async def step_status(pool: asyncpg.Pool, execution_id: str, number: int) -> str:
    status: str = await pool.fetchval(
        "SELECT status FROM execution_steps WHERE execution_id = $1 AND step_number = $2",
        uuid.UUID(execution_id),
        number,
    )
    return status


async def queue_row(pool: asyncpg.Pool, execution_id: str) -> asyncpg.Record:
    row = await pool.fetchrow(
        "SELECT * FROM execution_queue WHERE execution_id = $1", uuid.UUID(execution_id)
    )
    assert row is not None
    return row


async def events_of(pool: asyncpg.Pool, execution_id: str) -> list[asyncpg.Record]:
    return list(
        await pool.fetch(
            """SELECT seq, event_kind, payload, "timestamp" FROM execution_events
               WHERE execution_id = $1 ORDER BY seq""",
            uuid.UUID(execution_id),
        )
    )


async def kinds_of(pool: asyncpg.Pool, execution_id: str) -> list[str]:
    return [r["event_kind"] for r in await events_of(pool, execution_id)]


async def steps_of(pool: asyncpg.Pool, execution_id: str) -> list[asyncpg.Record]:
    return list(
        await pool.fetch(
            "SELECT * FROM execution_steps WHERE execution_id = $1 ORDER BY step_number",
            uuid.UUID(execution_id),
        )
    )


async def set_lease(pool: asyncpg.Pool, execution_id: str, lease_ms: int) -> None:
    """Shorten (or lengthen) one job's lease before any worker leases it.

    The executor derives the lease from the timeout policy (tens of seconds); a test that
    waits for a dead worker's lease to run out sets a short one on its own job only.
    """
    await pool.execute(
        "UPDATE execution_queue SET metadata = metadata || $2 WHERE execution_id = $1",
        uuid.UUID(execution_id),
        {"lease_ms": lease_ms},
    )


async def add_local_assets(
    http: httpx.AsyncClient, key: str, names: list[str], environment: str
) -> None:
    """Assets on this machine (local transport) standing in for remote hosts."""
    assets = [
        {
            "name": name,
            "address": "127.0.0.1",
            "transport": "local",
            "environment": environment,
            "tags": ["linux", "test"],
        }
        for name in names
    ]
    response = await http.post("/v1/assets", json=assets, headers=bearer(key))
    assert response.status_code == 201, response.text


def retarget(plan: dict[str, Any], targets: dict[str, str]) -> dict[str, Any]:
    """A shared plan with its targets renamed (``web-01`` → a local asset)."""
    steps = [
        {**step, "targets": [targets.get(t, t) for t in step["targets"]]} for step in plan["steps"]
    ]
    return {**plan, "steps": steps}


# --- systemctl stand-in ------------------------------------------------------------------

SYSTEMCTL_STAND_IN = """\
#!/bin/sh
# Stands in for systemd's systemctl (systemd cannot run in a test container). Logs
# "<verb> <unit>" per call; a restart can be held (to kill its worker mid-step) or slowed.
dir='{dir}'
verb=$1; shift
while [ "${{1#-}}" != "$1" ]; do shift; done   # options, up to and including --
unit=$1
echo "$verb $unit" >> "$dir/systemctl.log"
case "$verb" in
  restart)
    if [ -e "$dir/hold" ]; then
      rm -f "$dir/hold"
      echo $$ > "$dir/held.tmp" && mv "$dir/held.tmp" "$dir/held.pid"
      exec sleep 300
    fi
    if [ -e "$dir/delay" ]; then sleep "$(cat "$dir/delay")"; fi ;;
  show) printf 'ActiveState=active\\nSubState=running\\nLoadState=loaded\\nMainPID=4321\\n' ;;
  *) echo "unexpected: $verb" >&2; exit 64 ;;
esac
"""


@dataclass
class Systemctl:
    """The stand-in's directory: its log, and switches for the next restart."""

    dir: Path

    @property
    def path(self) -> str:
        """A PATH for worker processes with the stand-in first."""
        return f"{self.dir / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"

    def calls(self) -> list[str]:
        log = self.dir / "systemctl.log"
        return log.read_text().splitlines() if log.exists() else []

    def hold_next_restart(self) -> None:
        (self.dir / "hold").touch()

    def delay_restarts(self, seconds: float) -> None:
        (self.dir / "delay").write_text(f"{seconds}")

    def held_pid(self) -> int | None:
        """The held restart's process, once it is in flight."""
        marker = self.dir / "held.pid"
        return int(marker.read_text()) if marker.exists() else None

    async def held_restart(self) -> int | None:
        """For ``wait_for``: the held restart's process id once it is in flight."""
        return self.held_pid()

    def kill_held(self) -> None:
        """Kill the held restart's process group (a SIGKILLed worker leaves it behind)."""
        pid = self.held_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)


def install_systemctl(root: Path) -> Systemctl:
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    script = bin_dir / "systemctl"
    script.write_text(SYSTEMCTL_STAND_IN.format(dir=root))
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return Systemctl(root)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0; it is dead for every purpose here.
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split()[2] == "Z")
