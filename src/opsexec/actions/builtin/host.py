"""``host.disk_usage`` and ``host.uptime``: read-only facts from a target host."""

from __future__ import annotations

from opsexec.actions.registry import AbsolutePath, ActionClass, ActionInputs, ActionSpec

__all__ = ["HOST_DISK_USAGE", "HOST_UPTIME", "SPECS", "DiskUsageInputs", "UptimeInputs"]


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
