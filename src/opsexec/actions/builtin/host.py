"""``host.disk_usage`` and ``host.uptime``: read-only facts from a target host.

Both run a fixed command through the target's transport and parse its output into
structured data plus a one-line answer. The commands are POSIX/Linux staples (``df -P``,
``/proc``) run under ``LC_ALL=C`` so the output we parse never depends on the target's
locale. Output we cannot parse is a failure naming what was wrong, never an exception.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from opsexec.actions.builtin._common import (
    OUTPUT_PARSE_ERROR,
    PARSE_ENV,
    ActionFailure,
    Deadline,
    command_failure,
    decode_lenient,
    require_inputs,
    run_command,
)
from opsexec.actions.registry import (
    AbsolutePath,
    ActionClass,
    ActionContext,
    ActionInputs,
    ActionResult,
    ActionSpec,
    AssetInfo,
)

__all__ = [
    "HOST_DISK_USAGE",
    "HOST_UPTIME",
    "SPECS",
    "DiskUsage",
    "DiskUsageAction",
    "DiskUsageInputs",
    "Uptime",
    "UptimeAction",
    "UptimeInputs",
    "disk_usage_command",
    "format_duration",
    "format_size_kb",
    "parse_df",
    "parse_uptime",
]


class DiskUsageInputs(ActionInputs):
    path: AbsolutePath = "/"


class UptimeInputs(ActionInputs):
    """No inputs; the model still refuses unknown ones."""


HOST_DISK_USAGE = ActionSpec(
    name="host.disk_usage",
    action_class=ActionClass.READ,
    base_level=0,
    permission="automation:execute",
    idempotent=True,
    input_model=DiskUsageInputs,
    default_duration_s=2.0,
    description="Disk usage of the filesystem holding `path` on each target.",
)

HOST_UPTIME = ActionSpec(
    name="host.uptime",
    action_class=ActionClass.READ,
    base_level=0,
    permission="automation:execute",
    idempotent=True,
    input_model=UptimeInputs,
    default_duration_s=1.0,
    description="Uptime and load of each target.",
)

SPECS: tuple[ActionSpec, ...] = (HOST_DISK_USAGE, HOST_UPTIME)


# --- host.disk_usage --------------------------------------------------------------------


def disk_usage_command(path: str) -> str:
    """``df -P -k -- PATH``: POSIX format (one line per filesystem, never wrapped),
    1024-byte blocks, and ``--`` so no path can read as an option."""
    return f"df -P -k -- {shlex.quote(path)}"


# POSIX df line: filesystem (may contain spaces), four numbers, "NN%" (or "-" for a
# size-less pseudo filesystem), mount point (may contain spaces). Anchoring on the numbers
# is what lets both free-text fields contain spaces. Available may be negative (root
# reserve on BSD-style filesystems).
_DF_LINE = re.compile(
    r"^(?P<filesystem>.+?)\s+(?P<size>\d+)\s+(?P<used>\d+)\s+(?P<available>-?\d+)"
    r"\s+(?P<capacity>\d+%|-)\s+(?P<mounted_on>\S.*)$"
)


@dataclass(frozen=True)
class DiskUsage:
    filesystem: str
    size_kb: int
    used_kb: int
    available_kb: int
    use_percent: int | None
    mounted_on: str

    def as_output(self, path: str) -> dict[str, Any]:
        return {
            "filesystem": self.filesystem,
            "size_kb": self.size_kb,
            "used_kb": self.used_kb,
            "available_kb": self.available_kb,
            "use_percent": self.use_percent,
            "mounted_on": self.mounted_on,
            "path": path,
        }

    def summary(self, path: str) -> str:
        """``/: 42% used, 120 GiB free`` — the path asked about, and its mount if different."""
        where = path if path == self.mounted_on else f"{path} (on {self.mounted_on})"
        used = f"{self.use_percent}% used" if self.use_percent is not None else "usage unknown"
        return f"{where}: {used}, {format_size_kb(max(self.available_kb, 0))} free"


def parse_df(stdout: str) -> DiskUsage:
    """Parse ``df -P -k`` output for one path; ``ValueError`` says what was unexpected.

    The header is skipped by shape, not by text, so a localised header would not matter
    (we run under ``LC_ALL=C`` anyway). Exactly one data line is expected: ``df`` reports
    the single filesystem holding the path.
    """
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ValueError("df printed nothing")
    rows = [match for line in lines[1:] if (match := _DF_LINE.match(line.rstrip()))]
    if len(rows) != 1 or len(lines) != 2:
        raise ValueError(
            f"expected a header and one filesystem line from df, got {len(lines)} line(s)"
        )
    row = rows[0]
    capacity = row["capacity"]
    return DiskUsage(
        filesystem=row["filesystem"],
        size_kb=int(row["size"]),
        used_kb=int(row["used"]),
        available_kb=int(row["available"]),
        use_percent=None if capacity == "-" else int(capacity.rstrip("%")),
        mounted_on=row["mounted_on"],
    )


_SIZE_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_size_kb(size_kb: int) -> str:
    """Binary units, as ``df -h`` users expect: ``512 KiB``, ``9.5 GiB``, ``120 GiB``.

    One decimal below 10 of a unit (where it matters), none above (where it is noise).
    """
    value = float(size_kb)
    unit = 0
    while value >= 1024 and unit < len(_SIZE_UNITS) - 1:
        value /= 1024
        unit += 1
    number = f"{value:.1f}".removesuffix(".0") if value < 10 else f"{value:.0f}"
    return f"{number} {_SIZE_UNITS[unit]}"


class DiskUsageAction:
    """Runs ``df`` for ``path`` on the target."""

    @property
    def spec(self) -> ActionSpec:
        return HOST_DISK_USAGE

    async def run(
        self, ctx: ActionContext, target: AssetInfo | None, inputs: BaseModel
    ) -> ActionResult:
        params = require_inputs(inputs, DiskUsageInputs)
        deadline = Deadline(ctx.timeout_s)
        transport = await deadline.bound(ctx.transport())
        result = await run_command(
            transport, disk_usage_command(params.path), deadline, env=PARSE_ENV
        )
        try:
            if not result.ok:
                raise command_failure("df", result)
            stdout = decode_lenient(result.stdout)
            try:
                usage = parse_df(stdout)
            except ValueError as exc:
                raise ActionFailure(
                    OUTPUT_PARSE_ERROR, f"cannot read df output: {exc}", output=stdout
                ) from None
        except ActionFailure as failure:
            return failure.result()
        return ActionResult.success(
            usage.as_output(params.path), summary=usage.summary(params.path)
        )


# --- host.uptime ------------------------------------------------------------------------

UPTIME_COMMAND = "cat /proc/uptime && { cat /proc/loadavg 2>/dev/null || true; }"
"""``/proc/uptime`` is the answer; ``/proc/loadavg`` is a bonus some containers hide."""


@dataclass(frozen=True)
class Uptime:
    seconds: float
    load: tuple[float, float, float] | None

    def as_output(self) -> dict[str, Any]:
        return {
            "uptime_seconds": self.seconds,
            "uptime": format_duration(self.seconds),
            "load": (
                None
                if self.load is None
                else {"1m": self.load[0], "5m": self.load[1], "15m": self.load[2]}
            ),
        }

    def summary(self) -> str:
        """``up 12 days, 3 hours; load 0.15 0.10 0.05``."""
        text = f"up {format_duration(self.seconds)}"
        if self.load is not None:
            text += "; load " + " ".join(f"{value:.2f}" for value in self.load)
        return text


def parse_uptime(stdout: str) -> Uptime:
    """Parse ``/proc/uptime`` (``SECONDS IDLE``) and, if present, ``/proc/loadavg``."""
    lines = [line.split() for line in stdout.splitlines() if line.strip()]
    if not lines or len(lines[0]) != 2:
        raise ValueError("expected '<seconds> <idle seconds>' from /proc/uptime")
    try:
        seconds = float(lines[0][0])
    except ValueError:
        raise ValueError(f"uptime {lines[0][0][:40]!r} is not a number") from None
    if not 0 <= seconds < 1e12:
        raise ValueError("uptime is out of range")
    load: tuple[float, float, float] | None = None
    if len(lines) > 1 and len(lines[1]) >= 3:
        try:
            load = (float(lines[1][0]), float(lines[1][1]), float(lines[1][2]))
        except ValueError:
            raise ValueError("/proc/loadavg does not start with three numbers") from None
    return Uptime(seconds=seconds, load=load)


_DURATION_UNITS = (("day", 86_400), ("hour", 3_600), ("minute", 60), ("second", 1))


def format_duration(seconds: float) -> str:
    """The two most significant units: ``12 days, 3 hours``; ``5 minutes, 2 seconds``.

    Two units answer "how long has it been up" at a glance; more is noise.
    """
    remaining = int(seconds)
    parts: list[str] = []
    for name, size in _DURATION_UNITS:
        count, remaining = divmod(remaining, size)
        if count or parts:
            parts.append(f"{count} {name}" + ("" if count == 1 else "s"))
        if len(parts) == 2:
            break
    parts = [part for part in parts if not part.startswith("0 ")]
    return ", ".join(parts) or "0 seconds"


class UptimeAction:
    """Reads ``/proc/uptime`` and ``/proc/loadavg`` on the target."""

    @property
    def spec(self) -> ActionSpec:
        return HOST_UPTIME

    async def run(
        self, ctx: ActionContext, target: AssetInfo | None, inputs: BaseModel
    ) -> ActionResult:
        require_inputs(inputs, UptimeInputs)
        deadline = Deadline(ctx.timeout_s)
        transport = await deadline.bound(ctx.transport())
        result = await run_command(transport, UPTIME_COMMAND, deadline, env=PARSE_ENV)
        try:
            if not result.ok:
                raise command_failure("cat /proc/uptime", result)
            stdout = decode_lenient(result.stdout)
            try:
                uptime = parse_uptime(stdout)
            except ValueError as exc:
                raise ActionFailure(
                    OUTPUT_PARSE_ERROR, f"cannot read uptime: {exc}", output=stdout
                ) from None
        except ActionFailure as failure:
            return failure.result()
        return ActionResult.success(uptime.as_output(), summary=uptime.summary())
