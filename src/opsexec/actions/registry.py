"""The action registry: what each action *is* (R-CLASS metadata) and how it is run.

An action has two halves, deliberately kept apart:

``ActionSpec``
    Pure metadata: name, action class, base approval level, required permission,
    idempotency, lock scope, default duration, input model, and the per-invocation hooks
    (``classify``, ``base_level_for``, ``is_idempotent``, ``lock_scope_for``,
    ``target_mode_for``) that let e.g. ``http.request`` be a read for ``GET`` and a modify
    for ``POST``. Intake, classification and the approval UI need only this half, and they
    must work without transports, SSH libraries or network access — so specs import
    nothing that does I/O and are safe to evaluate in the API process.

``Action``
    The runnable half: a ``spec`` plus ``async run(ctx, target, inputs)``. The engine
    pairs implementations with specs (``ActionRegistry.attach``); a third-party package can
    ship both at once through the ``opsexec.actions`` entry-point group.

Splitting them means a spec can never disagree with the code that runs it (``attach``
refuses a runner whose spec differs from the registered one), and that a plan can be
validated and classified in a process that could not run it.

The registry is the one piece of module-level-free, explicitly built state: build it with
:func:`default_registry` (built-ins only, pure) and call
:meth:`ActionRegistry.load_entry_points` when third-party actions are wanted — the only
part of this module that touches the outside world, and only when called.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, runtime_checkable
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints

from opsexec.plan import SecretRef, is_secret_ref

if TYPE_CHECKING:
    from opsexec.actions.transports.base import Transport

__all__ = [
    "ENTRY_POINT_GROUP",
    "AbsolutePath",
    "Action",
    "ActionClass",
    "ActionContext",
    "ActionInputs",
    "ActionRegistry",
    "ActionResult",
    "ActionSpec",
    "AssetInfo",
    "EnvName",
    "EnvVars",
    "InventoryReader",
    "LockScope",
    "RankedStrEnum",
    "SecretOrStr",
    "SecretRef",
    "TargetMode",
    "builtin_specs",
    "default_registry",
    "is_secret_ref",
]

ENTRY_POINT_GROUP = "opsexec.actions"

ACTION_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)+$")
"""``family.verb`` (``service.restart``); dotted lower-case so names are stable API."""


class RankedStrEnum(StrEnum):
    """A ``StrEnum`` ordered by declaration, not alphabetically.

    Plain ``StrEnum`` compares as strings, so ``max(["read", "deploy"])`` would be
    ``"read"`` — exactly the wrong answer for "the riskiest class in this plan". Members of
    the same enum compare by ``rank``; anything else falls back to string comparison.
    """

    @property
    def rank(self) -> int:
        return list(type(self)).index(self)

    def __lt__(self, other: str, /) -> bool:
        if isinstance(other, type(self)):
            return self.rank < other.rank
        return str.__lt__(self, other)

    def __le__(self, other: str, /) -> bool:
        if isinstance(other, type(self)):
            return self.rank <= other.rank
        return str.__le__(self, other)

    def __gt__(self, other: str, /) -> bool:
        if isinstance(other, type(self)):
            return self.rank > other.rank
        return str.__gt__(self, other)

    def __ge__(self, other: str, /) -> bool:
        if isinstance(other, type(self)):
            return self.rank >= other.rank
        return str.__ge__(self, other)


class ActionClass(RankedStrEnum):
    """How much an action can change the world; ordered ``read < modify < deploy``."""

    READ = "read"
    MODIFY = "modify"
    DEPLOY = "deploy"


TargetMode = Literal["none", "required", "optional"]
"""Whether a step of the action names assets: ``none`` (inventory queries run against the
tenant's inventory, never on a host), ``required`` (host commands), ``optional``
(``http.request`` with an absolute ``url`` runs once from the executor)."""

LockScope = str | Callable[[Mapping[str, Any]], str]
"""A lock scope: a fixed string, or a function of the step's (validated) inputs.

The lock key is ``lock:v1:{tenant}:{target}:{scope}`` and locks conflict only on equal
keys. A narrower scope (``service:nginx``) therefore does *not* conflict with an
``asset`` lock on the same host; that is why every built-in keeps the default ``asset``
and a narrower scope is only for actions that truly cannot interfere with anything else.
"""


def _validate_spec_fields(spec: ActionSpec) -> None:
    if not ACTION_NAME_PATTERN.match(spec.name):
        raise ValueError(f"action name {spec.name!r} must look like 'family.verb'")
    if not 0 <= spec.base_level <= 3:
        raise ValueError(f"{spec.name}: base_level must be 0-3, not {spec.base_level}")
    if not spec.permission:
        raise ValueError(f"{spec.name}: permission must not be empty")
    if not spec.default_duration_s > 0:
        raise ValueError(f"{spec.name}: default_duration_s must be > 0")
    if not (isinstance(spec.input_model, type) and issubclass(spec.input_model, BaseModel)):
        raise ValueError(f"{spec.name}: input_model must be a pydantic model class")
    if isinstance(spec.lock_scope, str) and not spec.lock_scope:
        raise ValueError(f"{spec.name}: lock_scope must not be empty")


@dataclass(frozen=True, kw_only=True)
class ActionSpec:
    """Everything SPEC R-CLASS says an action declares, plus per-invocation hooks.

    The ``*_for``/``classify``/``is_idempotent`` methods default to the static fields.
    An action whose risk depends on its inputs overrides them in a subclass (see
    ``HttpRequestSpec``); callers always go through the methods, never the fields, so an
    override cannot be bypassed. The hooks receive the step's inputs *after* they passed
    ``input_model`` validation, as the plain mapping stored in the plan.
    """

    name: str
    action_class: ActionClass
    base_level: int
    permission: str
    idempotent: bool
    input_model: type[BaseModel]
    default_duration_s: float
    description: str
    lock_scope: LockScope = "asset"
    targets: TargetMode = "required"

    def __post_init__(self) -> None:
        _validate_spec_fields(self)

    def parse_inputs(self, inputs: Mapping[str, Any]) -> BaseModel:
        """Validate inputs against the model (raises ``pydantic.ValidationError``)."""
        return self.input_model.model_validate(dict(inputs))

    def classify(self, inputs: Mapping[str, Any]) -> ActionClass:
        """The action class of this invocation."""
        return self.action_class

    def base_level_for(self, inputs: Mapping[str, Any]) -> int:
        """The base approval level of this invocation, before plan-wide raises."""
        return self.base_level

    def is_idempotent(self, inputs: Mapping[str, Any]) -> bool:
        """Safe to re-run (retries, crash recovery) for these inputs."""
        return self.idempotent

    def lock_scope_for(self, inputs: Mapping[str, Any]) -> str | None:
        """The lock scope for these inputs, or ``None`` when no lock is taken.

        Read invocations take no lock (R-MUTEX), so this is ``None`` whenever
        ``classify(inputs)`` is ``read`` — e.g. ``http.request`` with ``GET``.
        """
        if self.classify(inputs) is ActionClass.READ:
            return None
        scope = self.lock_scope
        return scope if isinstance(scope, str) else scope(inputs)

    def target_mode_for(self, inputs: Mapping[str, Any]) -> TargetMode:
        """Whether a step of this invocation must, may or must not name targets."""
        return self.targets


# --- input building blocks (shared by built-ins, offered to third parties) --------------


class ActionInputs(BaseModel):
    """Base of every input model: unknown inputs refused, no type coercion ("5" is not 5),
    immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


SecretOrStr = str | SecretRef
"""A value that may be given literally or as ``{"$secret": "<name>"}``. Under a
secret-shaped key intake refuses the literal form (R-SEC-1)."""

EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
"""A POSIX environment variable name; anything else could not be exported safely."""

EnvVars = dict[EnvName, SecretOrStr]


_WINDOWS_ABSOLUTE = re.compile(r"^[A-Za-z]:[\\/]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _absolute_path(value: str) -> str:
    """Absolute, bounded, no control characters. Paths reach commands as single quoted
    arguments; refusing relative paths keeps the meaning independent of the cwd."""
    if not (value.startswith("/") or _WINDOWS_ABSOLUTE.match(value)):
        raise ValueError("must be an absolute path")
    if len(value) > 4_096:
        raise ValueError("must be at most 4096 characters")
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


AbsolutePath = Annotated[str, AfterValidator(_absolute_path)]


# --- what the engine hands an action --------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AssetInfo:
    """One target asset as the engine resolved it from the tenant's inventory."""

    name: str
    address: str
    transport: str
    environment: str
    port: int | None = None
    tags: tuple[str, ...] = ()
    credential_ref: str | None = None
    id: UUID | None = None


class InventoryReader(Protocol):
    """Read access to the caller's tenant's inventory (for ``inventory.*`` actions).

    Tenant scoping is the implementer's job: an action can never see another tenant's
    assets because it never gets a reader that could.
    """

    async def list_assets(
        self, *, tags: Sequence[str] = (), environment: str | None = None
    ) -> list[AssetInfo]:
        """Assets carrying *all* of ``tags`` and, when given, in ``environment``."""
        ...


@runtime_checkable
class ActionContext(Protocol):
    """What the engine gives a running action — the action's only window on the world.

    Kept small on purpose: anything an action can reach through here is something the
    engine can scope (tenant), audit (logger), bound (timeout, cancel) and redact
    (secrets).
    """

    @property
    def execution_id(self) -> UUID:
        """The execution this step belongs to (also the lock owner tag)."""
        ...

    @property
    def tenant_id(self) -> UUID:
        """The tenant everything here is scoped to."""
        ...

    @property
    def step_number(self) -> int:
        """``execution_steps.step_number`` of this invocation (one per plan step x target)."""
        ...

    @property
    def attempt(self) -> int:
        """1 on the first run, higher on retries; lets an action log or adapt to retries."""
        ...

    @property
    def asset(self) -> AssetInfo | None:
        """The target asset (the same object passed to ``run`` as ``target``).

        On the context too so transports, which receive only the context, can reach the
        address, port and ``credential_ref``. ``None`` for target-less invocations.
        """
        ...

    @property
    def timeout_s(self) -> float:
        """The step timeout in force. The engine enforces it regardless; an action may
        pass it on to a remote side so a stuck remote command dies on its own too."""
        ...

    @property
    def logger(self) -> logging.Logger | logging.LoggerAdapter[Any]:
        """A logger bound to execution/step ids; its handlers mask secrets at the sink."""
        ...

    @property
    def inventory(self) -> InventoryReader:
        """The tenant's inventory (used by ``inventory.*``)."""
        ...

    async def transport(self) -> Transport:
        """A command transport to ``asset`` (local or SSH), connected with its credential.

        The engine owns connection details: credential lookup, host-key pinning
        (trust on first use, mismatch refused) and closing the connection after the step.
        Raises ``TransportUnavailableError`` for a target no transport can reach (winrm).
        """
        ...

    async def resolve_secret(self, name: str) -> str:
        """The value behind ``{"$secret": name}``, fetched just in time.

        Inputs reach ``run`` with secret references intact (``SecretRef`` objects); an
        action resolves them only when it builds the command or request, so a value lives
        as briefly as possible. The engine registers each value for redaction in output,
        errors, events and logs, and drops it after the step.
        """
        ...

    def cancel_requested(self) -> bool:
        """True once a cancel was asked for. Long-running actions check it between units
        of work; a ``force`` cancel additionally interrupts the task."""
        ...


@dataclass(frozen=True, kw_only=True)
class ActionResult:
    """What one invocation produced.

    ``output`` is the full output (the engine stores it as an artefact and keeps a ≤ 10 KiB
    summary); ``summary`` is the short human answer ("6 assets: 6 Windows workstations").
    On failure ``retryable`` says whether the failure is transient (connection refused,
    timeout) — the engine retries only retryable failures of idempotent invocations.
    """

    ok: bool
    output: dict[str, Any] | list[Any] | str | bytes = ""
    content_type: str = ""
    summary: str = ""
    retryable: bool = False
    error_class: str | None = None
    error_message: str | None = None

    def __post_init__(self) -> None:
        if not self.content_type:
            object.__setattr__(self, "content_type", _content_type_of(self.output))

    @classmethod
    def success(
        cls,
        output: dict[str, Any] | list[Any] | str | bytes,
        *,
        summary: str = "",
        content_type: str = "",
    ) -> ActionResult:
        return cls(ok=True, output=output, summary=summary, content_type=content_type)

    @classmethod
    def failure(
        cls,
        error_class: str,
        error_message: str,
        *,
        retryable: bool = False,
        output: dict[str, Any] | list[Any] | str | bytes = "",
        summary: str = "",
    ) -> ActionResult:
        return cls(
            ok=False,
            output=output,
            summary=summary or error_message,
            retryable=retryable,
            error_class=error_class,
            error_message=error_message,
        )


def _content_type_of(output: object) -> str:
    if isinstance(output, bytes):
        return "application/octet-stream"
    if isinstance(output, str):
        return "text/plain; charset=utf-8"
    return "application/json"


@runtime_checkable
class Action(Protocol):
    """A runnable action: its spec plus ``run``.

    ``target`` is ``None`` for target-less invocations (``inventory.*``, ``http.request``
    with a ``url``). ``inputs`` is an instance of ``spec.input_model``. ``run`` reports
    expected failures as ``ActionResult.failure`` and lets ``asyncio.CancelledError``
    propagate (after killing any child process) so timeouts and forced cancels work.
    """

    @property
    def spec(self) -> ActionSpec: ...

    async def run(
        self, ctx: ActionContext, target: AssetInfo | None, inputs: BaseModel
    ) -> ActionResult: ...


# --- the registry ---------------------------------------------------------------------


class ActionRegistry:
    """Action specs by name, plus any runner paired with them.

    ``get`` returns ``None`` for an unknown name because "unknown action" is an ordinary
    intake outcome (a 422 with a pointer), not an exceptional one; ``require`` raises
    ``KeyError`` for callers that already validated the plan.
    """

    def __init__(self, specs: Iterable[ActionSpec] = ()) -> None:
        self._specs: dict[str, ActionSpec] = {}
        self._implementations: dict[str, Action] = {}
        for spec in specs:
            self.register(spec)

    def register(self, spec: ActionSpec, implementation: Action | None = None) -> None:
        """Add an action. A second action with the same name is refused: silently
        replacing ``shell.run`` with a plugin's would change what approvals mean."""
        if not isinstance(spec, ActionSpec):
            raise TypeError(f"expected an ActionSpec, got {type(spec).__name__}")
        if spec.name in self._specs:
            raise ValueError(f"action {spec.name!r} is already registered")
        self._specs[spec.name] = spec
        if implementation is not None:
            self.attach(implementation)

    def attach(self, action: Action) -> None:
        """Pair a runner with its registered spec; the runner must carry that same spec."""
        registered = self._specs.get(action.spec.name)
        if registered is None:
            raise KeyError(action.spec.name)
        if action.spec != registered:
            raise ValueError(f"runner for {action.spec.name!r} carries a different spec")
        self._implementations[registered.name] = action

    def get(self, name: str) -> ActionSpec | None:
        return self._specs.get(name)

    def require(self, name: str) -> ActionSpec:
        return self._specs[name]

    def implementation(self, name: str) -> Action | None:
        """The runner paired with ``name``, if one was attached."""
        return self._implementations.get(name)

    def names(self) -> list[str]:
        return sorted(self._specs)

    def specs(self) -> list[ActionSpec]:
        return [self._specs[name] for name in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._specs)

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> list[str]:
        """Register third-party actions advertised under the ``group`` entry points.

        An entry point may name an ``ActionSpec``, an ``Action`` (spec + runner), an
        iterable of either, or a zero-argument callable returning one of those. Returns
        the names added. Errors (import failures, name clashes) propagate: a deployment
        with a broken plugin should fail at start-up, not at the first plan using it.
        """
        added: list[str] = []
        for entry_point in entry_points(group=group):
            loaded = entry_point.load()
            for item in _flatten_loaded(loaded, entry_point.name):
                if isinstance(item, ActionSpec):
                    self.register(item)
                    added.append(item.name)
                else:
                    self.register(item.spec, item)
                    added.append(item.spec.name)
        return added


def _flatten_loaded(loaded: object, origin: str) -> list[ActionSpec | Action]:
    if isinstance(loaded, ActionSpec):
        return [loaded]
    if isinstance(loaded, Action) and isinstance(loaded.spec, ActionSpec):
        return [loaded]
    if isinstance(loaded, Iterable) and not isinstance(loaded, str | bytes | Mapping):
        found: list[ActionSpec | Action] = []
        for item in loaded:
            found.extend(_flatten_loaded(item, origin))
        return found
    if callable(loaded):
        return _flatten_loaded(loaded(), origin)
    raise TypeError(
        f"entry point {origin!r} gave {type(loaded).__name__}, not an ActionSpec or Action"
    )


def builtin_specs() -> tuple[ActionSpec, ...]:
    """The specs of the built-in actions (DESIGN.md action table)."""
    # Imported here: the built-in modules import this one for ActionSpec.
    from opsexec.actions.builtin import deploy, host, http, inventory, service, shell

    return (*inventory.SPECS, *host.SPECS, *service.SPECS, *shell.SPECS, *http.SPECS, *deploy.SPECS)


def default_registry() -> ActionRegistry:
    """A fresh registry holding the built-ins with their runners (no entry points, no I/O).

    Fresh on every call so a test or a plugin load never leaks into another caller.
    Importing the runners loads ``httpx`` but opens nothing: transports and clients are
    created only inside ``run``.
    """
    from opsexec.actions.builtin import register_builtins

    registry = ActionRegistry(builtin_specs())
    register_builtins(registry)
    return registry
