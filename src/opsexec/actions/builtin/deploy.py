"""``deploy.script``: run a deployment script with a version on each target.

Besides the declared inputs, any extra input is accepted *only* as a secret reference
(``"token": {"$secret": "deploy-token"}``): deploy scripts commonly need a few
credentials, and this lets a plan name them without a schema change while making a
literal value impossible to smuggle in under an innocuous key.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field, StringConstraints

from opsexec.actions.registry import (
    AbsolutePath,
    ActionClass,
    ActionInputs,
    ActionSpec,
    EnvVars,
    SecretRef,
)

__all__ = ["DEPLOY_SCRIPT", "SPECS", "VERSION_PATTERN", "DeployScriptInputs"]

VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}$"
"""Versions reach the script's command line; semver, dates and git hashes all fit."""


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
