"""`opsexec serve` with no database URL: embedded PostgreSQL, first-start bootstrap."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.postgres


def _start(data_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "OPSEXEC_DATABASE_URL"}
    env["OPSEXEC_DATA_DIR"] = str(data_dir)
    return subprocess.Popen(
        [sys.executable, "-m", "opsexec", "serve", "--port", str(port)],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def _wait_ready(process: subprocess.Popen[bytes], port: int, log: Path) -> httpx.Response:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            if response.status_code == 200:
                return response
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    pytest.fail(f"serve never became ready:\n{log.read_text()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then a clean exit (uvicorn re-raises the signal after graceful shutdown)."""
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) in (0, -signal.SIGTERM)


def test_first_start_bootstraps_and_second_start_reuses(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    first_log = tmp_path / "first.log"
    process = _start(data_dir, port, first_log)
    try:
        ready = _wait_ready(process, port, first_log)
        assert ready.json()["checks"]["migrations"]["status"] == "ok"
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "ok"}
    finally:
        _stop(process)

    key_file = data_dir / "admin-api-key"
    api_key = key_file.read_text().strip()
    assert api_key.startswith("opx_")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    first_output = first_log.read_text()
    assert first_output.count(api_key) == 1, "the key is printed exactly once"

    second_log = tmp_path / "second.log"
    process = _start(data_dir, port, second_log)
    try:
        _wait_ready(process, port, second_log)
    finally:
        _stop(process)
    second_output = second_log.read_text()
    assert "opx_" not in second_output
    assert "Admin API key" not in second_output
    assert key_file.read_text().strip() == api_key

    # The last process to leave stops the embedded server.
    assert not (data_dir / "pgdata" / "postmaster.pid").exists()
