"""Run commands on the worker's own host, each in a process group of its own.

``start_new_session=True`` makes the shell a session and process-group leader (pgid ==
its pid), so a timeout or a forced cancel can signal the *group* with ``os.killpg`` and
take the shell's children with it. Killing only the shell would orphan them (DESIGN.md,
"Known traps").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from opsexec.actions.transports.base import (
    DEFAULT_KILL_GRACE_S,
    DEFAULT_OUTPUT_LIMIT,
    CommandResult,
    OutputBuffer,
    check_env,
    elapsed_ms,
    pump,
    status_from_signal,
)
from opsexec.errors import CommandTimeoutError, TransportError

logger = logging.getLogger(__name__)

INHERITED_ENV: tuple[str, ...] = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
)
"""What a local command inherits from the worker. Not everything: the worker's own
environment holds ``OPSEXEC_SECRET_KEY`` and the database URL, which a plan's shell step
has no business reading."""

FALLBACK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_WORKDIR_WRAPPER = 'cd -- "$1" || exit; exec /bin/sh -c "$2"'
"""With a workdir the shell changes directory itself, so a missing directory fails the
command exactly as it would over SSH (the shell's message, non-zero status) instead of
raising from ``exec``. ``exec`` keeps the pid, so the group leader stays the same."""

_POLL_S = 0.05


class LocalTransport:
    """Runs ``/bin/sh -c command`` locally; see :class:`~.base.Transport` for the contract.

    Secrets in ``env`` reach the child through its process environment (``execve``),
    which only the same user and root can read (``/proc/PID/environ``); they are never
    part of ``argv``, which every user sees in ``ps``.
    """

    def __init__(
        self,
        *,
        inherit_env: Iterable[str] = INHERITED_ENV,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        kill_grace_s: float = DEFAULT_KILL_GRACE_S,
    ) -> None:
        self._inherit_env = tuple(inherit_env)
        self._output_limit = output_limit
        self._kill_grace_s = kill_grace_s

    def __repr__(self) -> str:
        return "LocalTransport()"

    async def __aenter__(self) -> LocalTransport:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Nothing to release: every process is reaped by the ``run`` that started it."""

    async def run(
        self,
        command: str,
        *,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout_s: float,
        workdir: str | None = None,
    ) -> CommandResult:
        check_env(env)
        argv = ["/bin/sh", "-c", command]
        if workdir is not None:
            argv = ["/bin/sh", "-c", _WORKDIR_WRAPPER, "opsexec", workdir, command]
        started = time.monotonic()
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._environment(env),
                start_new_session=True,
            )
        except OSError as exc:
            raise TransportError(
                f"cannot start /bin/sh: {exc.strerror or exc}", retryable=False
            ) from None

        stdout = OutputBuffer(self._output_limit)
        stderr = OutputBuffer(self._output_limit)
        try:
            async with asyncio.timeout(timeout_s):
                assert process.stdout is not None
                assert process.stderr is not None
                await asyncio.gather(
                    pump(process.stdout, stdout),
                    pump(process.stderr, stderr),
                    _feed(process, stdin),
                )
                returncode = await process.wait()
        except TimeoutError:
            await self._kill_group(process)
            raise CommandTimeoutError(
                f"command timed out after {timeout_s:g} s; its process group was killed",
                stdout=stdout.getvalue(),
                stderr=stderr.getvalue(),
                extra={"timeout_s": timeout_s},
            ) from None
        except BaseException:
            # Cancellation (forced cancel) or anything unexpected: never leave it running.
            await self._kill_group(process)
            raise

        return CommandResult(
            exit_status=returncode if returncode >= 0 else status_from_signal(-returncode),
            stdout=stdout.getvalue(),
            stderr=stderr.getvalue(),
            duration_ms=elapsed_ms(started, time.monotonic()),
            stdout_truncated=stdout.truncated,
            stderr_truncated=stderr.truncated,
        )

    def _environment(self, env: Mapping[str, str] | None) -> dict[str, str]:
        inherited = {name: os.environ[name] for name in self._inherit_env if name in os.environ}
        inherited.setdefault("PATH", FALLBACK_PATH)
        return {**inherited, **(env or {})}

    async def _kill_group(self, process: asyncio.subprocess.Process) -> None:
        """SIGTERM the group, give it ``kill_grace_s`` to exit, SIGKILL what is left, reap.

        The SIGKILL sits in ``finally`` so that a second cancellation arriving during the
        grace period still cannot leave the group running.
        """
        pgid = process.pid  # start_new_session: the shell leads its own group
        _signal_group(pgid, signal.SIGTERM)
        try:
            deadline = time.monotonic() + self._kill_grace_s
            while time.monotonic() < deadline:
                if not _group_alive(pgid):
                    break
                await asyncio.sleep(_POLL_S)
        finally:
            _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), timeout=5)
        if process.returncode is None:
            logger.warning("local command pid %d did not exit after SIGKILL", pgid)


async def _feed(process: asyncio.subprocess.Process, data: bytes | None) -> None:
    """Write stdin then close it; a command that exits without reading it is not an error."""
    if data is None or process.stdin is None:
        return
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        process.stdin.write(data)
        await process.stdin.drain()
    process.stdin.close()


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _group_alive(pgid: int) -> bool:
    """Whether any *running* process is left in the group.

    Zombies count as gone: where PID 1 does not reap orphans (containers), a dead child
    stays a group member forever and ``killpg(pgid, 0)`` would keep saying "alive". On
    Linux ``/proc`` tells the two apart; elsewhere ``killpg(pgid, 0)`` is the answer.
    """
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp …"; comm may contain spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and fields[2] == str(pgid) and fields[0] not in {"Z", "X"}:
            return True
    return False
