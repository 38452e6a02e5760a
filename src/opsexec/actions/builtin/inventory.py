"""``inventory.count`` and ``inventory.list``: questions about the tenant's inventory.

They run against the inventory (``ActionContext.inventory``), never on a host, so a step
using them takes no targets. Read-only and idempotent: asking twice is harmless.

Outputs
-------
``inventory.count``: ``{"total", "group_by", "groups", "filter"}``; ``groups`` maps each
environment / transport / tag to its number of assets, largest first. Tags overlap (an
asset carries several), so tag counts add up to more than ``total``; assets without any
tag are counted under the separate key ``untagged`` (a tag may be called anything, so it
cannot share ``groups``).

``inventory.list``: ``{"total", "assets": [{name, address, port, transport, environment,
tags}]}`` sorted by name. Credential references stay out: which secret opens a host is
the engine's business, not an answer.

How the count summary reads
---------------------------
The summary is the sentence a person would say, e.g. for the shared inventory
``60 assets: 54 linux, 6 windows workstations``. The rules:

1. It starts with the total: ``60 assets`` (``1 asset``). Without ``group_by`` that is
   all, plus the filter in words: ``6 assets tagged windows in production``.
2. With ``group_by`` it goes on with a breakdown whose numbers **always add up to the
   total**, largest first (ties alphabetically), at most five phrases; the rest is
   folded into ``N other``.
3. Environments and transports partition the assets already: ``57 production,
   2 staging, 1 dev``.
4. Tags do not, so a partition is built from them. Tags carried by exactly the same
   assets are one label, in the order the assets list them (``windows`` +
   ``workstation`` → ``windows workstation``). Then, largest first, a label is taken if
   none of its assets is already counted. Assets left over are ``N untagged`` (no tags)
   or ``N other``.
5. Tags that *every* counted asset carries (typically because of the filter) lead the
   sentence instead of being repeated in each phrase: filtering on ``linux`` gives
   ``54 linux assets: 50 api, 2 nginx, 1 demo, 1 postgres``. When nothing is left to
   break down, the common label becomes the breakdown: ``6 assets: 6 windows
   workstations``.
6. Only the last word of a label is ever inflected, and only when it is a countable
   asset noun (``workstation``, ``server``, ``router``…): tags like ``linux``, ``nginx``
   or ``api`` describe assets, and ``54 linuxes`` would read worse than ``54 linux``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints

from opsexec.actions.builtin._common import Deadline, require_inputs
from opsexec.actions.registry import (
    ActionClass,
    ActionContext,
    ActionInputs,
    ActionResult,
    ActionSpec,
    AssetInfo,
)

__all__ = [
    "INVENTORY_COUNT",
    "INVENTORY_LIST",
    "SPECS",
    "InventoryCount",
    "InventoryCountAction",
    "InventoryCountInputs",
    "InventoryFilter",
    "InventoryListAction",
    "InventoryListInputs",
    "count_assets",
    "describe_filter",
    "list_summary",
    "pluralize",
]

Label = Annotated[str, StringConstraints(min_length=1, max_length=100)]
GroupBy = Literal["tags", "environment", "transport"]


class InventoryFilter(ActionInputs):
    """Assets carrying *all* of ``tags`` and, when given, in ``environment``."""

    tags: list[Label] = Field(default_factory=list, max_length=50)
    environment: Label | None = None


class InventoryCountInputs(ActionInputs):
    group_by: GroupBy | None = None
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


# --- words ------------------------------------------------------------------------------

MAX_PHRASES = 5
LIST_NAMES_SHOWN = 5

_COUNTABLE_NOUNS = frozenset(
    {
        "appliance",
        "balancer",
        "box",
        "camera",
        "cluster",
        "container",
        "controller",
        "database",
        "desktop",
        "device",
        "firewall",
        "gateway",
        "host",
        "hypervisor",
        "instance",
        "laptop",
        "machine",
        "node",
        "phone",
        "printer",
        "proxy",
        "router",
        "sensor",
        "server",
        "switch",
        "tablet",
        "terminal",
        "vm",
        "worker",
        "workstation",
    }
)
"""Tag words that name a kind of thing and so take a plural; everything else is read as
a description (``linux``, ``nginx``, ``api``, ``production``) and left alone."""


def _plural_word(word: str) -> str:
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def pluralize(label: str, count: int) -> str:
    """``windows workstation`` → ``windows workstations`` for a count other than 1;
    labels not ending in a countable noun are returned unchanged (rule 6)."""
    head, _, last = label.rpartition(" ")
    if count == 1 or last.lower() not in _COUNTABLE_NOUNS:
        return label
    return f"{head} {_plural_word(last)}" if head else _plural_word(last)


def _assets(count: int) -> str:
    return "1 asset" if count == 1 else f"{count} assets"


def _and_join(words: Sequence[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def describe_filter(tags: Sequence[str], environment: str | None) -> str:
    """`` tagged windows and workstation in production`` (leading space), or ``""``."""
    text = f" tagged {_and_join(list(tags))}" if tags else ""
    return text + (f" in {environment}" if environment else "")


# --- counting ---------------------------------------------------------------------------


@dataclass(frozen=True)
class InventoryCount:
    output: dict[str, Any]
    summary: str


def _ranked(counter: Counter[str]) -> list[tuple[str, int]]:
    return sorted(counter.items(), key=lambda item: (-item[1], item[0]))


def _breakdown(parts: list[tuple[str, int]], total: int) -> list[str]:
    """``N label`` phrases, at most ``MAX_PHRASES``, the rest as ``N other`` (rule 2)."""
    shown = parts[:MAX_PHRASES]
    phrases = [f"{count} {pluralize(label, count)}" for label, count in shown]
    rest = total - sum(count for _, count in shown)
    if rest > 0:
        phrases.append(f"{rest} other")
    return phrases


def _tag_order(assets: Sequence[AssetInfo]) -> dict[str, tuple[int, int]]:
    """Where each tag first appears: (asset index, position in that asset's tags)."""
    order: dict[str, tuple[int, int]] = {}
    for index, asset in enumerate(assets):
        for position, tag in enumerate(asset.tags):
            order.setdefault(tag, (index, position))
    return order


def _tag_summary(assets: Sequence[AssetInfo]) -> str:
    """Rules 4 and 5 of the module docstring."""
    total = len(assets)
    order = _tag_order(assets)
    members: dict[str, frozenset[int]] = {
        tag: frozenset(i for i, asset in enumerate(assets) if tag in asset.tags) for tag in order
    }
    common = [tag for tag in order if len(members[tag]) == total]

    labels: dict[frozenset[int], list[str]] = {}
    for tag in sorted(order, key=order.__getitem__):
        if tag not in common:
            labels.setdefault(members[tag], []).append(tag)
    candidates = sorted(
        ((" ".join(tags), group) for group, tags in labels.items()),
        key=lambda item: (-len(item[1]), item[0]),
    )

    covered: set[int] = set()
    parts: list[tuple[str, int]] = []
    for label, group in candidates:
        if len(parts) == MAX_PHRASES or len(covered) == total:
            break
        if covered.isdisjoint(group):
            parts.append((label, len(group)))
            covered |= group

    common_label = " ".join(common)
    if common and not parts:
        return f"{_assets(total)}: {total} {pluralize(common_label, total)}"

    phrases = [f"{count} {pluralize(label, count)}" for label, count in parts]
    leftover = [i for i in range(total) if i not in covered]
    if leftover:
        untagged = all(not assets[i].tags for i in leftover)
        phrases.append(f"{len(leftover)} {'untagged' if untagged else 'other'}")
    if common:
        return f"{total} {common_label} {'asset' if total == 1 else 'assets'}: " + ", ".join(
            phrases
        )
    return f"{_assets(total)}: " + ", ".join(phrases)


def count_assets(
    assets: Sequence[AssetInfo],
    group_by: GroupBy | None = None,
    filter_tags: Sequence[str] = (),
    environment: str | None = None,
) -> InventoryCount:
    """The structured count and its one-sentence summary (pure: testable without I/O)."""
    total = len(assets)
    output: dict[str, Any] = {
        "total": total,
        "group_by": group_by,
        "groups": {},
        "filter": {"tags": list(filter_tags), "environment": environment}
        if filter_tags or environment
        else None,
    }
    if group_by is None or total == 0:
        return InventoryCount(output, _assets(total) + describe_filter(filter_tags, environment))

    if group_by == "tags":
        counter: Counter[str] = Counter(tag for asset in assets for tag in set(asset.tags))
        output["groups"] = dict(_ranked(counter))
        output["untagged"] = sum(1 for asset in assets if not asset.tags)
        return InventoryCount(output, _tag_summary(assets))

    counter = Counter(
        asset.environment if group_by == "environment" else asset.transport for asset in assets
    )
    ranked = _ranked(counter)
    output["groups"] = dict(ranked)
    return InventoryCount(output, f"{_assets(total)}: " + ", ".join(_breakdown(ranked, total)))


def _asset_row(asset: AssetInfo) -> dict[str, Any]:
    return {
        "name": asset.name,
        "address": asset.address,
        "port": asset.port,
        "transport": asset.transport,
        "environment": asset.environment,
        "tags": list(asset.tags),
    }


def list_summary(names: Iterable[str], filter_text: str = "") -> str:
    """``3 assets: db-prod, web-01, web-02`` — up to five names, then ``and N more``."""
    ordered = list(names)
    head = _assets(len(ordered)) + filter_text
    if not ordered:
        return head
    shown = ", ".join(ordered[:LIST_NAMES_SHOWN])
    more = len(ordered) - LIST_NAMES_SHOWN
    return f"{head}: {shown}" + (f" and {more} more" if more > 0 else "")


async def _filtered(
    ctx: ActionContext, deadline: Deadline, filter_: InventoryFilter | None
) -> tuple[list[AssetInfo], list[str], str | None]:
    tags = list(filter_.tags) if filter_ else []
    environment = filter_.environment if filter_ else None
    assets = await deadline.bound(ctx.inventory.list_assets(tags=tags, environment=environment))
    return sorted(assets, key=lambda asset: asset.name), tags, environment


class InventoryCountAction:
    """Counts the tenant's assets; see the module docstring for the summary's rules."""

    @property
    def spec(self) -> ActionSpec:
        return INVENTORY_COUNT

    async def run(
        self, ctx: ActionContext, target: AssetInfo | None, inputs: BaseModel
    ) -> ActionResult:
        params = require_inputs(inputs, InventoryCountInputs)
        assets, tags, environment = await _filtered(ctx, Deadline(ctx.timeout_s), params.filter)
        counted = count_assets(assets, params.group_by, tags, environment)
        return ActionResult.success(counted.output, summary=counted.summary)


class InventoryListAction:
    """Lists the tenant's assets without their credential references."""

    @property
    def spec(self) -> ActionSpec:
        return INVENTORY_LIST

    async def run(
        self, ctx: ActionContext, target: AssetInfo | None, inputs: BaseModel
    ) -> ActionResult:
        params = require_inputs(inputs, InventoryListInputs)
        assets, tags, environment = await _filtered(ctx, Deadline(ctx.timeout_s), params.filter)
        return ActionResult.success(
            {"total": len(assets), "assets": [_asset_row(asset) for asset in assets]},
            summary=list_summary((a.name for a in assets), describe_filter(tags, environment)),
        )
