"""The pure core imports nothing that does I/O (DESIGN.md): checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

PURE = ("opsexec.plan", "opsexec.intake", "opsexec.policy", "opsexec.fsm")
IO_MODULES = ("asyncpg", "httpx", "asyncssh", "redis", "fastapi", "opsexec.store")


def test_the_pure_core_loads_no_io_module() -> None:
    probe = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in PURE)
        + f"print(','.join(m for m in {IO_MODULES!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "", f"the pure core pulled in: {result.stdout.strip()}"
