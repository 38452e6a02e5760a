"""``deploy.script``: run a deployment script with a version on each target.

Besides the declared inputs, any extra input is accepted *only* as a secret reference
(``"token": {"$secret": "deploy-token"}``): deploy scripts commonly need a few
credentials, and this lets a plan name them without a schema change while making a
literal value impossible to smuggle in under an innocuous key.

How the script runs: ``'<script>' '<version>' '<arg>'…`` — the script is executed
directly (its own shebang decides the interpreter) with the version as its first
argument and ``args`` after it, every word single-quoted. Extra secret inputs are
exported as environment variables named after the input, upper-cased (``token`` →
``$TOKEN``, ``registry_password`` → ``$REGISTRY_PASSWORD``), next to the ``env`` input;
secrets therefore never appear in the command line. An extra input whose upper-cased
name is not a shell identifier, collides with an ``env`` entry, or would replace a
variable the shell itself depends on (``PATH``, ``HOME``, …) is refused at intake.

Not idempotent and never retried: a deploy that ran half-way is for a person to judge.
"""

from __future__ import annotations

import re
import shlex
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from opsexec.actions.builtin._common import (
    COMMAND_FAILED,
    ActionFailure,
    Deadline,
    decode_lenient,
    last_line,
    require_inputs,
    resolve_env,
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
    EnvVars,
    SecretOrStr,
    SecretRef,
)

__all__ = [
    "DEPLOY_SCRIPT",
    "RESERVED_ENV_NAMES",
    "SPECS",
    "VERSION_PATTERN",
    "DeployScriptAction",
    "DeployScriptInputs",
    "deploy_command",
]

VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}$"
"""Versions reach the script's command line; semver, dates and git hashes all fit."""

_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,127}$")

RESERVED_ENV_NAMES = frozenset(
    {"PATH", "HOME", "SHELL", "USER", "LOGNAME", "IFS", "ENV", "BASH_ENV", "PWD", "TERM"}
    | {"LD_PRELOAD", "LD_LIBRARY_PATH", "LANG", "LC_ALL"}
)
"""Names an extra secret input may not take: exporting a secret over ``PATH`` or
``LD_PRELOAD`` would change what runs, not hand the script a credential."""


class DeployScriptInputs(ActionInputs):
    model_config = ConfigDict(extra="allow")

    # Extra inputs are validated as secret references (pydantic types the extras).
    __pydantic_extra__: dict[str, SecretRef] = Field(init=False)

    script: AbsolutePath
    version: Annotated[str, StringConstraints(pattern=VERSION_PATTERN)]
    args: list[Annotated[str, StringConstraints(max_length=4_096)]] = Field(
        default_factory=list, max_length=100
    )
    env: EnvVars = Field(default_factory=dict, max_length=100)

    def secret_extras(self) -> dict[str, SecretRef]:
        """The extra secret-reference inputs, by name."""
        return dict(self.__pydantic_extra__ or {})

    def exported_env(self) -> dict[str, SecretOrStr]:
        """``env`` plus every extra secret input under its upper-cased name."""
        return {**self.env, **{name.upper(): ref for name, ref in self.secret_extras().items()}}

    @model_validator(mode="after")
    def _extras_become_env_names(self) -> Self:
        for name in self.secret_extras():
            variable = name.upper()
            if not _ENV_NAME.match(variable):
                raise ValueError(
                    f"extra input {name!r} cannot be exported as an environment variable: "
                    "use letters, digits and _ (not starting with a digit)"
                )
            if variable in RESERVED_ENV_NAMES:
                raise ValueError(f"extra input {name!r} would replace ${variable}")
            if variable in self.env:
                raise ValueError(f"extra input {name!r} and env {variable!r} collide")
        return self


DEPLOY_SCRIPT = ActionSpec(
    name="deploy.script",
    action_class=ActionClass.DEPLOY,
    base_level=2,
    permission="automation:deploy",
    idempotent=False,
    input_model=DeployScriptInputs,
    default_duration_s=60.0,
    description="Run a deployment script for a version on each target.",
)

SPECS: tuple[ActionSpec, ...] = (DEPLOY_SCRIPT,)


def deploy_command(script: str, version: str, args: list[str]) -> str:
    """``'<script>' '<version>' '<arg>'…`` — each word quoted, nothing else in the line."""
    return shlex.join([script, version, *args])


_EXEC_FAILURES = {
    126: "is not executable on the target",
    127: "was not found on the target",
}
"""Shell exit statuses that mean the script never started; said plainly, since
"exit status 127" is not an answer an operator should have to decode."""


class DeployScriptAction:
    """Runs the script with the version, args and exported secrets."""

    @property
    def spec(self) -> ActionSpec:
        return DEPLOY_SCRIPT

    async def run(
        self, ctx: ActionContext, target: AssetInfo | None, inputs: BaseModel
    ) -> ActionResult:
        params = require_inputs(inputs, DeployScriptInputs)
        deadline = Deadline(ctx.timeout_s)
        transport = await deadline.bound(ctx.transport())
        command = deploy_command(params.script, params.version, params.args)
        try:
            env = await deadline.bound(resolve_env(ctx, params.exported_env()))
        except ActionFailure as failure:
            return failure.result()
        result = await run_command(transport, command, deadline, env=env)
        del env

        output: dict[str, Any] = {
            "script": params.script,
            "version": params.version,
            "exit_status": result.exit_status,
            # A deploy prints a log, never data: always text, odd bytes replaced.
            "stdout": decode_lenient(result.stdout),
            "stderr": decode_lenient(result.stderr),
            "truncated": result.truncated,
            "duration_ms": result.duration_ms,
        }
        if result.ok:
            return ActionResult.success(
                output, summary=f"deployed {params.version} with {params.script}"
            )
        reason = _EXEC_FAILURES.get(result.exit_status)
        if reason and params.script in output["stderr"]:  # the shell's own complaint
            message = f"{params.script} {reason} (exit status {result.exit_status})"
        else:
            message = f"{params.script} exited with status {result.exit_status}"
            if line := last_line(output["stderr"]) or last_line(output["stdout"]):
                message += f": {line}"
        return ActionResult.failure(
            COMMAND_FAILED,
            message,
            output=output,
            summary=f"deploy of {params.version} failed: {message}",
        )
