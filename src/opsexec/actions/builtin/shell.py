"""``shell.run``: an arbitrary command on each target.

Not idempotent: opsexec cannot know what the command does, so it is never retried and a
run interrupted mid-flight is left for a person to decide (R-QUEUE crash recovery).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

from opsexec.actions.registry import AbsolutePath, ActionClass, ActionInputs, ActionSpec, EnvVars

__all__ = ["SHELL_RUN", "SPECS", "ShellRunInputs"]


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
