"""What every command transport promises, and the pieces local and SSH share.

A transport runs one shell command line (``/bin/sh -c``) on a target and brings back its
exit status and output. The promises that matter for safety (SPEC R-TIMEOUT, R-CANCEL,
R-SEC) are the same for every transport, so they are stated once here:

* **Timeout kills the whole process group**, not just the shell, then raises
  :class:`~opsexec.errors.CommandTimeoutError` (a ``StepTimeoutError``). A shell's
  children otherwise outlive it and keep holding the target (and its locks' meaning).
* **Cancellation kills too.** ``asyncio.CancelledError`` (a forced cancel) reaches the
  transport inside ``run``; the process group is killed before the error propagates.
* **Output is bounded.** Each stream keeps its first ``output_limit`` bytes; the rest is
  read and dropped (so the command never blocks on a full pipe) and the result says so.
* **Environment values are secrets** until proven otherwise: they never appear on a
  command line, in a log record or in an error message.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from opsexec.errors import ValidationError

DEFAULT_OUTPUT_LIMIT = 16 * 1024 * 1024
"""Bytes kept per stream (stdout, stderr) before truncation."""

DEFAULT_KILL_GRACE_S = 2.0
"""How long a process group gets between SIGTERM and SIGKILL to clean up after itself."""

READ_CHUNK = 64 * 1024

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class CommandResult:
    """The outcome of a command that ran to completion (a timeout raises instead).

    ``exit_status`` follows the shell convention: 0-255 from ``exit``, ``128 + N`` when
    the shell was killed by signal N, so local and SSH results read the same.
    """

    exit_status: int
    stdout: bytes
    stderr: bytes
    duration_ms: int
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    @property
    def truncated(self) -> bool:
        return self.stdout_truncated or self.stderr_truncated


class Transport(Protocol):
    """Runs shell command lines on one target. Implementations: local, ssh."""

    async def run(
        self,
        command: str,
        *,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout_s: float,
        workdir: str | None = None,
    ) -> CommandResult:
        """Run ``/bin/sh -c command`` and wait for it (and its output pipes) to finish.

        ``env`` adds variables to the command's environment without exposing them;
        ``stdin`` is fed to the command then closed (``None`` means empty input);
        ``workdir`` is entered with ``cd`` first, and a failure there is the command's
        failure (non-zero exit, the shell's message on stderr), the same on every
        transport. Raises ``CommandTimeoutError`` after killing the process group when
        ``timeout_s`` passes, ``TransportError`` when the target cannot be reached.
        """
        ...

    async def close(self) -> None:
        """Release connections; the transport may not be used afterwards."""
        ...


class OutputBuffer:
    """Keeps the first ``limit`` bytes of a stream and counts what it had to drop."""

    def __init__(self, limit: int = DEFAULT_OUTPUT_LIMIT) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._kept = 0
        self.dropped = 0

    def feed(self, data: bytes) -> None:
        room = self._limit - self._kept
        if room >= len(data):
            self._chunks.append(data)
            self._kept += len(data)
            return
        if room > 0:
            self._chunks.append(data[:room])
            self._kept += room
        self.dropped += len(data) - max(room, 0)

    @property
    def truncated(self) -> bool:
        return self.dropped > 0

    def getvalue(self) -> bytes:
        return b"".join(self._chunks)


class ByteReader(Protocol):
    """The part of ``asyncio.StreamReader`` / ``asyncssh.SSHReader`` the pumps use."""

    async def read(self, n: int = -1) -> bytes: ...


async def pump(reader: ByteReader, sink: OutputBuffer) -> None:
    """Copy a stream into ``sink`` until EOF, reading on past the cap to keep pipes flowing."""
    while chunk := await reader.read(READ_CHUNK):
        sink.feed(chunk)


def check_env(env: Mapping[str, str] | None) -> None:
    """Refuse names a shell cannot export and values an environment cannot hold.

    The error names the variable, never its value: values are presumed secret.
    """
    for name, value in (env or {}).items():
        if not _ENV_NAME.match(name):
            raise ValidationError(
                f"environment variable name {name!r} is not a valid shell identifier",
                pointer=f"/env/{name}",
            )
        if "\0" in value:
            raise ValidationError(
                f"environment variable {name} contains a NUL byte", pointer=f"/env/{name}"
            )


def status_from_signal(signum: int) -> int:
    """Shell convention for "killed by signal N"."""
    return 128 + signum


def signal_number(name: str) -> int | None:
    """``"KILL"`` → 9, as SSH reports exit signals by name without the ``SIG`` prefix."""
    try:
        return int(signal.Signals["SIG" + name.upper().removeprefix("SIG")])
    except KeyError:
        return None


def elapsed_ms(started: float, now: float) -> int:
    return max(0, round((now - started) * 1000))


def shell_quote(value: str) -> str:
    """Quote ``value`` as one POSIX shell word that contains no newline character.

    Newlines are spliced in from ``$__opsexec_nl`` so the quoted word fits on one line;
    the SSH preamble relies on that (it is read with ``read -r``). Callers that use it
    must define the variable first (see :data:`NEWLINE_SETUP`).
    """
    parts = value.split("\n")
    return '"$__opsexec_nl"'.join("'" + part.replace("'", "'\"'\"'") + "'" for part in parts)


NEWLINE_SETUP = "__opsexec_nl=$(printf '\\n_'); __opsexec_nl=${__opsexec_nl%_}"
"""Shell that sets ``$__opsexec_nl`` to a newline (``$(…)`` strips one, hence the ``_``)."""
