"""``service.status`` and ``service.restart`` (systemd).

The service name is interpolated into a command on the target, so it is held to a
conservative subset of systemd unit-name characters: letters, digits and ``_.@:-``,
starting with a letter or digit (a leading ``-`` would read as an option). No spaces,
quotes, slashes, backslashes or shell metacharacters can get through. It is quoted
anyway, and put after ``--``: validation and quoting are two locks, not one.

State is read with ``systemctl show``, whose ``Key=Value`` lines are made for machines,
rather than ``systemctl status``, whose layout is for people and changes between
versions. Outcomes:

* ``status``: succeeds whenever systemd answered — an inactive or failed service is an
  answer, not an error — except for a unit systemd does not know (``LoadState`` is
  ``not-found``), which fails with ``ServiceNotFoundError`` so a plan that names the wrong
  service stops before it restarts anything.
* ``restart``: ``systemctl restart`` waits for the restart job; a non-zero exit fails with
  systemd's message. The state is then read back and the step succeeds only if the
  service is ``active`` — "restarted into a crash loop" is a failure
  (``ServiceNotActiveError``) with the state in the output. Neither is retryable.

The SSH user needs the right to restart units (root, or a polkit rule);
``--no-ask-password`` makes a missing right fail at once instead of waiting for a
password prompt nobody will answer.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, StringConstraints

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
    ActionClass,
    ActionContext,
    ActionInputs,
    ActionResult,
    ActionSpec,
    AssetInfo,
)
from opsexec.actions.transports.base import Transport

__all__ = [
    "SERVICE_NAME_PATTERN",
    "SERVICE_NOT_ACTIVE",
    "SERVICE_NOT_FOUND",
    "SERVICE_RESTART",
    "SERVICE_STATUS",
    "SPECS",
    "ServiceInputs",
    "ServiceRestartAction",
    "ServiceState",
    "ServiceStatusAction",
    "parse_systemctl_show",
    "restart_command",
    "show_command",
]

SERVICE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,127}$"

ServiceName = Annotated[str, StringConstraints(pattern=SERVICE_NAME_PATTERN)]

SERVICE_NOT_FOUND = "ServiceNotFoundError"
SERVICE_NOT_ACTIVE = "ServiceNotActiveError"

SHOW_PROPERTIES = ("ActiveState", "SubState", "LoadState", "MainPID")


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


def show_command(service: str) -> str:
    return (
        f"systemctl show --no-pager --property={','.join(SHOW_PROPERTIES)} "
        f"-- {shlex.quote(service)}"
    )


def restart_command(service: str) -> str:
    return f"systemctl restart --no-ask-password -- {shlex.quote(service)}"


@dataclass(frozen=True)
class ServiceState:
    service: str
    load_state: str
    active_state: str
    sub_state: str
    main_pid: int | None

    @property
    def active(self) -> bool:
        return self.active_state == "active"

    @property
    def found(self) -> bool:
        return self.load_state != "not-found"

    def as_output(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "active": self.active,
            "active_state": self.active_state,
            "sub_state": self.sub_state,
            "load_state": self.load_state,
            "main_pid": self.main_pid,
        }

    def summary(self) -> str:
        """``nginx: active (running), pid 1234`` — the words ``systemctl status`` uses."""
        if not self.found:
            return f"{self.service}: not found"
        text = f"{self.service}: {self.active_state} ({self.sub_state})"
        return text + (f", pid {self.main_pid}" if self.main_pid else "")


def parse_systemctl_show(service: str, stdout: str) -> ServiceState:
    """``Key=Value`` lines of ``systemctl show`` → state; ``ValueError`` if keys are missing.

    Values may contain ``=`` (only the first one splits). ``MainPID=0`` means no main
    process, reported as ``None``.
    """
    values: dict[str, str] = {}
    for line in stdout.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep:
            values[key] = value
    missing = [name for name in SHOW_PROPERTIES if name not in values]
    if missing:
        raise ValueError(f"systemctl show did not report {', '.join(missing)}")
    try:
        pid = int(values["MainPID"])
    except ValueError:
        raise ValueError("MainPID is not a number") from None
    return ServiceState(
        service=service,
        load_state=values["LoadState"],
        active_state=values["ActiveState"],
        sub_state=values["SubState"],
        main_pid=pid if pid > 0 else None,
    )


async def _read_state(transport: Transport, service: str, deadline: Deadline) -> ServiceState:
    result = await run_command(transport, show_command(service), deadline, env=PARSE_ENV)
    if not result.ok:
        raise command_failure("systemctl show", result)
    stdout = decode_lenient(result.stdout)
    try:
        return parse_systemctl_show(service, stdout)
    except ValueError as exc:
        raise ActionFailure(
            OUTPUT_PARSE_ERROR, f"cannot read the state of {service}: {exc}", output=stdout
        ) from None


def _not_found(state: ServiceState) -> ActionFailure:
    return ActionFailure(
        SERVICE_NOT_FOUND,
        f"service {state.service} is not known to systemd on this host",
        output=state.as_output(),
    )


class ServiceStatusAction:
    """Reads the unit's state with ``systemctl show``."""

    @property
    def spec(self) -> ActionSpec:
        return SERVICE_STATUS

    async def run(
        self, ctx: ActionContext, target: AssetInfo | None, inputs: BaseModel
    ) -> ActionResult:
        params = require_inputs(inputs, ServiceInputs)
        deadline = Deadline(ctx.timeout_s)
        transport = await deadline.bound(ctx.transport())
        try:
            state = await _read_state(transport, params.service, deadline)
            if not state.found:
                raise _not_found(state)
        except ActionFailure as failure:
            return failure.result()
        return ActionResult.success(state.as_output(), summary=state.summary())


class ServiceRestartAction:
    """``systemctl restart``, then the state it left the unit in."""

    @property
    def spec(self) -> ActionSpec:
        return SERVICE_RESTART

    async def run(
        self, ctx: ActionContext, target: AssetInfo | None, inputs: BaseModel
    ) -> ActionResult:
        params = require_inputs(inputs, ServiceInputs)
        deadline = Deadline(ctx.timeout_s)
        transport = await deadline.bound(ctx.transport())
        try:
            restarted = await run_command(
                transport, restart_command(params.service), deadline, env=PARSE_ENV
            )
            if not restarted.ok:
                raise command_failure(f"systemctl restart {params.service}", restarted)
            state = await _read_state(transport, params.service, deadline)
            if not state.found:
                raise _not_found(state)
            if not state.active:
                raise ActionFailure(
                    SERVICE_NOT_ACTIVE,
                    f"{params.service} was restarted but is {state.active_state} "
                    f"({state.sub_state})",
                    output=state.as_output(),
                )
        except ActionFailure as failure:
            return failure.result()
        return ActionResult.success(
            {**state.as_output(), "restarted": True},
            summary=f"restarted {state.summary()}",
        )
