"""Reading inventories: the YAML list of ``shared/plans/inventory.yaml`` and Ansible INI."""

from __future__ import annotations

import re
import shlex
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from opsexec.errors import ValidationError as OpsexecValidationError
from opsexec.errors import from_pydantic

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$"


class AssetSpec(BaseModel):
    """One inventory entry as clients send it (HTTP body or import file)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_NAME, examples=["web-01"])
    address: str = Field(min_length=1, max_length=255, examples=["10.0.1.11"])
    transport: Literal["local", "ssh", "winrm"] = "ssh"
    port: int | None = Field(default=None, ge=1, le=65535)
    environment: str = Field(default="dev", min_length=1, max_length=50)
    tags: list[str] = Field(default_factory=list)
    credential_ref: str | None = Field(default=None, max_length=255)
    metadata: dict[str, Any] = Field(default_factory=dict)


def _validated(entries: list[Any]) -> list[AssetSpec]:
    assets = []
    for index, entry in enumerate(entries):
        try:
            assets.append(AssetSpec.model_validate(entry))
        except ValidationError as exc:
            raise from_pydantic(exc, prefix=f"/{index}") from None
    return assets


def parse_yaml_inventory(text: str) -> list[AssetSpec]:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise OpsexecValidationError(f"not valid YAML: {exc}", pointer="") from None
    if not isinstance(document, list):
        raise OpsexecValidationError("a YAML inventory is a list of assets", pointer="")
    return _validated(document)


_SECTION = re.compile(r"^\[([^\]]+)\]$")


def parse_ansible_ini(text: str) -> list[AssetSpec]:
    """Hosts of an Ansible INI inventory; groups become tags.

    Understood host variables: ``ansible_host``, ``ansible_port``,
    ``ansible_connection`` (``local`` → local transport, ``winrm`` → winrm), and
    ``opsexec_environment`` / ``env`` and ``opsexec_credential``. Group ``:vars`` and
    ``:children`` sections are skipped: they describe groups, not hosts.
    """
    hosts: dict[str, dict[str, Any]] = {}
    group: str | None = None
    skipping = False
    for line_number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        if section := _SECTION.match(line):
            group = section.group(1)
            skipping = ":" in group
            continue
        if skipping:
            continue
        try:
            name, *variables = shlex.split(line)
        except ValueError as exc:
            raise OpsexecValidationError(
                f"line {line_number}: {exc}", pointer=f"/lines/{line_number}"
            ) from None
        entry = hosts.setdefault(name, {"name": name, "address": name, "tags": []})
        if group and group not in {"all", "ungrouped"} and group not in entry["tags"]:
            entry["tags"].append(group)
        for variable in variables:
            key, _, value = variable.partition("=")
            if key == "ansible_host":
                entry["address"] = value
            elif key == "ansible_port":
                entry["port"] = value
            elif key == "ansible_connection":
                entry["transport"] = {"local": "local", "winrm": "winrm"}.get(value, "ssh")
            elif key in {"opsexec_environment", "env"}:
                entry["environment"] = value
            elif key == "opsexec_credential":
                entry["credential_ref"] = value
    return _validated(list(hosts.values()))


def parse_inventory(text: str) -> list[AssetSpec]:
    """Either format, told apart by the first meaningful line: ``- …`` starts a YAML list."""
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";")):
            if line.startswith("-"):
                return parse_yaml_inventory(text)
            return parse_ansible_ini(text)
    return []
