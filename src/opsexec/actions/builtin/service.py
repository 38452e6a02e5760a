"""``service.status`` and ``service.restart``.

The service name is interpolated into a command on the target, so it is held to a
conservative subset of systemd unit-name characters: letters, digits and ``_.@:-``,
starting with a letter or digit (a leading ``-`` would read as an option). No spaces,
quotes, slashes, backslashes or shell metacharacters can get through.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import StringConstraints

from opsexec.actions.registry import ActionClass, ActionInputs, ActionSpec

__all__ = [
    "SERVICE_NAME_PATTERN",
    "SERVICE_RESTART",
    "SERVICE_STATUS",
    "SPECS",
    "ServiceInputs",
]

SERVICE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,127}$"

ServiceName = Annotated[str, StringConstraints(pattern=SERVICE_NAME_PATTERN)]


class ServiceInputs(ActionInputs):
    service: ServiceName


SERVICE_STATUS = ActionSpec(
    name="service.status",
    action_class=ActionClass.READ,
    base_level=0,
    permission="automation:execute",
    idempotent=True,
    input_model=ServiceInputs,
    default_duration_s=2.0,
    description="Whether a service is active on each target.",
)

SERVICE_RESTART = ActionSpec(
    name="service.restart",
    action_class=ActionClass.MODIFY,
    base_level=1,
    permission="automation:execute",
    # Restarting twice leaves the service in the same state as restarting once, so a
    # retry or a re-run after a crash is safe.
    idempotent=True,
    input_model=ServiceInputs,
    default_duration_s=10.0,
    description="Restart a service on each target.",
    # Whole-asset scope on purpose: a narrower "service:<name>" key would not conflict
    # with a deploy's "asset" lock on the same host (locks conflict on equal keys only).
    lock_scope="asset",
)

SPECS: tuple[ActionSpec, ...] = (SERVICE_STATUS, SERVICE_RESTART)
