"""``inventory.count`` and ``inventory.list``: questions about the tenant's inventory.

They run against the inventory (``ActionContext.inventory``), never on a host, so a step
using them takes no targets. Read-only and idempotent: asking twice is harmless.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from opsexec.actions.registry import ActionClass, ActionInputs, ActionSpec

__all__ = [
    "INVENTORY_COUNT",
    "INVENTORY_LIST",
    "SPECS",
    "InventoryCountInputs",
    "InventoryFilter",
    "InventoryListInputs",
]

Label = Annotated[str, StringConstraints(min_length=1, max_length=100)]


class InventoryFilter(ActionInputs):
    """Assets carrying *all* of ``tags`` and, when given, in ``environment``."""

    tags: list[Label] = Field(default_factory=list, max_length=50)
    environment: Label | None = None


class InventoryCountInputs(ActionInputs):
    group_by: Literal["tags", "environment", "transport"] | None = None
    filter: InventoryFilter | None = None


class InventoryListInputs(ActionInputs):
    filter: InventoryFilter | None = None


INVENTORY_COUNT = ActionSpec(
    name="inventory.count",
    action_class=ActionClass.READ,
    base_level=0,
    permission="asset:read",
    idempotent=True,
    input_model=InventoryCountInputs,
    default_duration_s=1.0,
    description="Count the tenant's assets, optionally filtered and grouped.",
    targets="none",
)

INVENTORY_LIST = ActionSpec(
    name="inventory.list",
    action_class=ActionClass.READ,
    base_level=0,
    permission="asset:read",
    idempotent=True,
    input_model=InventoryListInputs,
    default_duration_s=1.0,
    description="List the tenant's assets, optionally filtered.",
    targets="none",
)

SPECS: tuple[ActionSpec, ...] = (INVENTORY_COUNT, INVENTORY_LIST)
