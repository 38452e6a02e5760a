"""``shell.run``: an arbitrary command on each target.

Not idempotent: opsexec cannot know what the command does, so it is never retried and a
run interrupted mid-flight is left for a person to decide (R-QUEUE crash recovery).

The command *is* shell by design — the plan author wrote it and an approver read it — so
it is passed as written. What must never be spliced into it are secrets: ``env`` values
(literal or ``{"$secret": …}``) reach the command through the transport's environment,
resolved the moment before it starts, so they never appear in a command line, ``ps`` or
an sshd log.

Output: ``{"exit_status", "stdout", "stderr", "truncated", "duration_ms"}`` with text
decoded as UTF-8 (stderr with replacement characters where it is not). When stdout is
not text (invalid UTF-8 or NUL bytes) the output is the raw stdout bytes instead, with a
sniffed content type, so the engine stores it base64 rather than mangling it; exit
status and stderr then appear in the summary. A non-zero exit is a failure
(``CommandFailedError``), never retryable.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, StringConstraints

from opsexec.actions.builtin._common import (
    COMMAND_FAILED,
    ActionFailure,
    Deadline,
    decode_lenient,
    decode_text,
    first_line,
    last_line,
    require_inputs,
    resolve_env,
    run_command,
    sniff_content_type,
)
from opsexec.actions.registry import (
    AbsolutePath,
    ActionClass,
    ActionContext,
    ActionInputs,
    ActionResult,
    ActionSpec,
    AssetInfo,
    EnvVars,
)
from opsexec.actions.transports.base import CommandResult

__all__ = ["SHELL_RUN", "SPECS", "ShellRunAction", "ShellRunInputs", "command_result"]


class ShellRunInputs(ActionInputs):
    command: Annotated[str, StringConstraints(min_length=1, max_length=16_384)]
    env: EnvVars = Field(default_factory=dict, max_length=100)
    workdir: AbsolutePath | None = None


SHELL_RUN = ActionSpec(
    name="shell.run",
    action_class=ActionClass.MODIFY,
    base_level=1,
    permission="automation:execute",
    idempotent=False,
    input_model=ShellRunInputs,
    default_duration_s=10.0,
    description="Run a shell command on each target.",
)

SPECS: tuple[ActionSpec, ...] = (SHELL_RUN,)


def command_result(result: CommandResult, *, what: str = "command") -> ActionResult:
    """A finished command as an ``ActionResult`` (shared with ``deploy.script``).

    Text stdout → a JSON object; binary stdout → the bytes themselves (see the module
    docstring). ``ok`` follows the exit status.
    """
    stderr = decode_lenient(result.stderr)
    stdout = decode_text(result.stdout, truncated=result.stdout_truncated)
    status = result.exit_status
    failure_message = f"{what} exited with status {status}"
    if reason := last_line(stderr):
        failure_message += f": {reason}"

    if stdout is None:
        size = len(result.stdout)
        content_type = sniff_content_type(result.stdout)
        summary = f"exit {status}: {size} bytes of binary output ({content_type})"
        if status != 0:
            summary = f"{failure_message}; {size} bytes of binary output ({content_type})"
        return ActionResult(
            ok=status == 0,
            output=result.stdout,
            content_type=content_type,
            summary=summary,
            error_class=None if status == 0 else COMMAND_FAILED,
            error_message=None if status == 0 else failure_message,
        )

    output: dict[str, Any] = {
        "exit_status": status,
        "stdout": stdout,
        "stderr": stderr,
        "truncated": result.truncated,
        "duration_ms": result.duration_ms,
    }
    if status != 0:
        return ActionFailure(COMMAND_FAILED, failure_message, output=output).result()
    line = first_line(stdout)
    return ActionResult.success(output, summary=f"exit 0: {line}" if line else "exit 0 (no output)")


class ShellRunAction:
    """Runs the plan's command with its environment and working directory."""

    @property
    def spec(self) -> ActionSpec:
        return SHELL_RUN

    async def run(
        self, ctx: ActionContext, target: AssetInfo | None, inputs: BaseModel
    ) -> ActionResult:
        params = require_inputs(inputs, ShellRunInputs)
        deadline = Deadline(ctx.timeout_s)
        transport = await deadline.bound(ctx.transport())
        try:
            # Resolved only now, after the transport is up: the values live for the
            # duration of the command and no longer.
            env = await deadline.bound(resolve_env(ctx, params.env))
        except ActionFailure as failure:
            return failure.result()
        result = await run_command(
            transport, params.command, deadline, env=env, workdir=params.workdir
        )
        del env
        return command_result(result)
