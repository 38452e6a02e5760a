"""The built-in actions (DESIGN.md action table): specs and their runners, one module each.

``builtin_actions()`` returns fresh runner instances; ``register_builtins(registry)``
pairs them with a registry — attaching to specs it already holds (as
:func:`~opsexec.actions.registry.default_registry` builds it) and registering the rest.
The runners hold no state, so sharing or recreating them is equally safe.
"""

from __future__ import annotations

from opsexec.actions.builtin.deploy import DeployScriptAction
from opsexec.actions.builtin.host import DiskUsageAction, UptimeAction
from opsexec.actions.builtin.http import HttpRequestAction
from opsexec.actions.builtin.inventory import InventoryCountAction, InventoryListAction
from opsexec.actions.builtin.service import ServiceRestartAction, ServiceStatusAction
from opsexec.actions.builtin.shell import ShellRunAction
from opsexec.actions.registry import Action, ActionRegistry

__all__ = [
    "DeployScriptAction",
    "DiskUsageAction",
    "HttpRequestAction",
    "InventoryCountAction",
    "InventoryListAction",
    "ServiceRestartAction",
    "ServiceStatusAction",
    "ShellRunAction",
    "UptimeAction",
    "builtin_actions",
    "register_builtins",
]


def builtin_actions() -> list[Action]:
    """One runner per built-in action, in the DESIGN.md table's order."""
    return [
        InventoryCountAction(),
        InventoryListAction(),
        DiskUsageAction(),
        UptimeAction(),
        ServiceStatusAction(),
        ServiceRestartAction(),
        ShellRunAction(),
        HttpRequestAction(),
        DeployScriptAction(),
    ]


def register_builtins(registry: ActionRegistry) -> None:
    """Give ``registry`` a runner for every built-in.

    A spec the registry already holds gets the runner attached (``attach`` refuses a
    runner whose spec differs, so a registry holding a look-alike spec fails loudly);
    a missing one is registered together with its runner.
    """
    for action in builtin_actions():
        if action.spec.name in registry:
            registry.attach(action)
        else:
            registry.register(action.spec, action)
