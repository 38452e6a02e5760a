"""Structured logs with masking at the sink (R-MASK, R-OBS).

Every handler we install carries :class:`MaskingFilter`, and our formatters mask again if
a record reaches them unfiltered, so no call site can log a secret by accident: not in
the message, not in ``%``-args, not in ``extra=`` fields, not in a traceback. uvicorn gets
the same filter and formatter through :func:`uvicorn_log_config`, and
:func:`install_masking_on_all_handlers` catches handlers installed by anyone else.

Execution code binds correlation fields once (:func:`bind_log_context`) and every line
logged in that context carries them, which is how R-OBS's exec_id/tenant_id/plan_hash…
reach lines written deep inside helpers that never heard of the execution.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from types import TracebackType
from typing import IO, Any, Final, Literal

from opsexec.safety.masking import Masker, masker

__all__ = [
    "ConsoleFormatter",
    "JsonFormatter",
    "LogContext",
    "LogFormat",
    "MaskingFilter",
    "bind_log_context",
    "configure_logging",
    "current_log_context",
    "install_masking_on_all_handlers",
    "make_formatter",
    "mask_record",
    "uvicorn_log_config",
]

LogFormat = Literal["json", "console"]

# Attributes this module puts on a record. The marker is a private object, not True, so an
# ``extra={"_opsexec_masked": True}`` from a call site cannot switch masking off.
_MASKED_ATTR: Final = "_opsexec_masked"
_FIELDS_ATTR: Final = "_opsexec_fields"
_MASKED: Final = object()

# Everything a LogRecord has by itself; whatever else is on a record came from ``extra=``,
# the log context, or another library's filter, and is logged as a field.
_STANDARD_ATTRS: Final = frozenset(
    {
        *logging.LogRecord("", 0, "", 0, "", None, None).__dict__,
        "message",
        "asctime",
        "taskName",  # 3.12+
        _MASKED_ATTR,
        _FIELDS_ATTR,
    }
)
_RECORD_INIT_ATTRS: Final = len(logging.LogRecord("", 0, "", 0, "", None, None).__dict__)

_CORE_KEYS: Final = frozenset({"ts", "level", "logger", "message", "exc", "stack"})

_EMPTY_CONTEXT: Final[Mapping[str, Any]] = {}
_log_context: ContextVar[Mapping[str, Any]] = ContextVar(
    "opsexec_log_context", default=_EMPTY_CONTEXT
)


# --- log context ----------------------------------------------------------------------------


class LogContext:
    """Fields bound for the current context; undo with :meth:`reset` or by leaving ``with``.

    Binding happens when the object is created, so both styles work::

        with bind_log_context(exec_id=str(execution.id), tenant_id=str(tenant)):
            ...
        ctx = bind_log_context(request_id=rid)
        try: ... finally: ctx.reset()
    """

    __slots__ = ("_token",)

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self._token: Token[Mapping[str, Any]] | None = _log_context.set(
            {**_log_context.get(), **fields}
        )

    def reset(self) -> None:
        """Restore the fields bound before this one (idempotent)."""
        if self._token is not None:
            _log_context.reset(self._token)
            self._token = None

    def __enter__(self) -> LogContext:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.reset()


def bind_log_context(**fields: Any) -> LogContext:
    """Add ``fields`` to every record logged in this context (asyncio tasks inherit them).

    An explicit ``extra=`` field of the same name wins over a bound one.
    """
    return LogContext(fields)


def current_log_context() -> Mapping[str, Any]:
    """The fields bound right now (read-only view; bind to change it)."""
    return _log_context.get()


# --- masking a record -----------------------------------------------------------------------

_traceback_formatter = logging.Formatter()


def mask_record(record: logging.LogRecord, using: Masker = masker) -> dict[str, Any]:
    """Mask ``record`` in place, once, and return its masked extra fields.

    After this the record is safe for *any* formatter: ``msg`` is the final masked text
    with ``args`` cleared (so ``%``-args are masked in context: ``"password=%s"`` with a
    harmless-looking arg is still caught), every extra field is masked, and the
    traceback lives only as masked ``exc_text`` with ``exc_info`` cleared so no formatter
    can render the live exception again. Never raises: logging must not break the caller,
    and on an internal error the record is reduced to something that cannot leak.
    """
    state = record.__dict__
    if state.get(_MASKED_ATTR) is _MASKED:
        return state[_FIELDS_ATTR]  # type: ignore[no-any-return]
    try:
        fields = _mask_record_fields(record, state, using)
    except Exception as exc:  # a broken __str__, a cyclic extra… never the caller's problem
        record.msg = f"log record dropped: masking failed with {type(exc).__name__}"
        record.args = None
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        for key in [key for key in state if key not in _STANDARD_ATTRS]:
            del state[key]
        fields = {}
    state[_FIELDS_ATTR] = fields
    state[_MASKED_ATTR] = _MASKED
    return fields


def _mask_record_fields(
    record: logging.LogRecord, state: dict[str, Any], using: Masker
) -> dict[str, Any]:
    try:
        message = record.getMessage()
    except Exception:  # wrong number of %-args: keep the evidence, masked
        message = f"{record.msg!s} (unformattable log args: {record.args!r})"
    record.msg = using.mask_text(message)
    record.args = None

    if record.exc_info:
        if not record.exc_text:
            record.exc_text = _traceback_formatter.formatException(record.exc_info)
        record.exc_info = None
    if record.exc_text:
        record.exc_text = using.mask_text(record.exc_text)
    if record.stack_info:
        record.stack_info = using.mask_text(record.stack_info)

    bound = _log_context.get()
    if bound:
        for key, value in bound.items():
            if key not in state:
                state[key] = value

    # uvicorn's coloured copy of the message template: it cannot be rendered once the args
    # are folded into the message, and would only duplicate the message in JSON.
    state.pop("color_message", None)
    if type(record) is logging.LogRecord:
        # LogRecord.__init__ always sets the same attributes first; everything after them
        # was added later (extra=, the context above, other filters). Slicing the key list
        # in C beats testing two dozen names per record in Python.
        names = list(state)[_RECORD_INIT_ATTRS:]
        if not _STANDARD_ATTRS.isdisjoint(names):  # "message"/"asctime" from a formatter
            names = [name for name in names if name not in _STANDARD_ATTRS]
    else:  # a subclass may set attributes before calling LogRecord.__init__
        names = [name for name in state if name not in _STANDARD_ATTRS]
    if not names:
        return {}
    try:
        fields: dict[str, Any] = using.mask_items(
            zip(names, map(state.__getitem__, names), strict=True)
        )
    except Exception:  # one bad field (a cycle, a broken __eq__) must not cost the line
        fields = {}
        for name in names:
            try:
                fields.update(using.mask_items([(name, state[name])]))
            except Exception as exc:
                fields[name] = f"<unloggable: {type(exc).__name__}>"
    state.update(fields)
    if list(fields) != names:
        # An attribute *name* contained a registered secret and was masked: the field
        # now lives under the masked name, so the original attribute must go.
        for name in names:
            if name not in fields:
                del state[name]
    return fields


class MaskingFilter(logging.Filter):
    """Masks every record passing the handler it is attached to; never drops one.

    Attach it to *handlers*, not loggers: a logger's filters only see records logged on
    that very logger, while a handler's see everything propagated to it.
    """

    def __init__(self, name: str = "", using: Masker = masker) -> None:
        super().__init__(name)
        self._masker = using

    def filter(self, record: logging.LogRecord) -> bool:
        mask_record(record, self._masker)
        return True


# --- formatters -----------------------------------------------------------------------------


class _UtcClock:
    """ISO 8601 UTC timestamps with milliseconds, reusing the per-second prefix.

    strftime/gmtime is the most expensive part of a timestamp and changes once a second.
    The (second, prefix) pair is one tuple so a racing thread always reads a matching pair.
    """

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: tuple[int, str] = (-1, "")

    def stamp(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        last = self._last
        if last[0] != second:
            last = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
            self._last = last
        return "%s.%03dZ" % (last[1], record.msecs)  # noqa: UP031 - %d truncates, f-string can't


def _json_default(obj: Any) -> str:
    # Unknown objects are rendered as text; that text is masked like any other.
    try:
        text = str(obj)
    except Exception as exc:
        return f"<unprintable {type(obj).__name__}: {type(exc).__name__}>"
    return masker.mask_text(text)


def _compact_json_encoder() -> Callable[[Any], str]:
    """``json.dumps`` with compact separators, minus its per-call set-up.

    ASCII-only output: with raw Unicode, U+2028/U+0085 inside a value would look like line
    breaks to some line-oriented log shippers, and "one object per line" must hold for all.

    ``JSONEncoder.encode`` builds a new C encoder on every call, about a fifth of the cost
    of a log line; this builds it once. No circular-reference bookkeeping: a cycle fails
    as RecursionError, which the formatter catches. Falls back to the public API where
    the C accelerator is missing or its private signature has changed.
    """
    public = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), default=_json_default)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return public.encode
    try:
        c_encoder = make(
            None,
            _json_default,
            json.encoder.encode_basestring_ascii,
            None,
            ":",
            ",",
            False,
            False,
            True,
        )

        def encode(obj: Any) -> str:
            return "".join(c_encoder(obj, 0))

        if encode({"a": [1, 2.5, None, True, "é"]}) != '{"a":[1,2.5,null,true,"\\u00e9"]}':
            return public.encode
    except Exception:
        return public.encode
    return encode


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, exc, stack, then the fields.

    Masks the record itself when no :class:`MaskingFilter` did (a handler someone built
    by hand), and costs nothing extra when one did.
    """

    def __init__(self) -> None:
        super().__init__()
        self._clock = _UtcClock()
        self._encode = _compact_json_encoder()

    def format(self, record: logging.LogRecord) -> str:
        state = record.__dict__
        # The filter normally did the work; only the flag test stays on the hot path.
        fields: dict[str, Any] = (
            state[_FIELDS_ATTR] if state.get(_MASKED_ATTR) is _MASKED else mask_record(record)
        )
        line: dict[str, Any] = {
            "ts": self._clock.stamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.msg,
        }
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        if _CORE_KEYS.isdisjoint(fields):
            line.update(fields)
        else:  # a field may not impersonate a core key; it is kept under another name
            for key, value in fields.items():
                line["field_" + key if key in _CORE_KEYS else key] = value
        try:
            return self._encode(line)
        except Exception as exc:
            # e.g. a dict with tuple keys or a cycle: keep the line, lose the fields, say why.
            kept = ("ts", "level", "logger", "message", "exc")
            core: dict[str, Any] = {key: line[key] for key in kept if key in line}
            core["log_error"] = f"fields not serialisable: {type(exc).__name__}"
            return self._encode(core)


class ConsoleFormatter(logging.Formatter):
    """Human-readable lines for a terminal (``OPSEXEC_LOG_FORMAT=console``), masked too."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _UtcClock()

    def format(self, record: logging.LogRecord) -> str:
        fields = mask_record(record)
        parts = [
            self._clock.stamp(record),
            f"{record.levelname:<8}",
            f"{record.name}:",
            str(record.msg),
        ]
        parts.extend(f"{key}={_console_value(value)}" for key, value in fields.items())
        text = " ".join(parts)
        if record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + record.stack_info
        return text


def _console_value(value: Any) -> str:
    if type(value) is str:
        return value if value and " " not in value else json.dumps(value, ensure_ascii=False)
    if value is None or type(value) in (int, float, bool):
        return str(value)
    try:
        rendered = json.dumps(value, ensure_ascii=False, default=_json_default)
    except Exception:
        try:
            rendered = repr(value)
        except Exception as exc:
            rendered = f"<unprintable {type(value).__name__}: {type(exc).__name__}>"
    # Masked again: str()/repr() of an unknown object is text the masker has not seen.
    return masker.mask_text(rendered)


def make_formatter(fmt: LogFormat = "json", use_colors: bool | None = None) -> logging.Formatter:
    """The formatter for ``fmt``; the factory dictConfig (and uvicorn) calls.

    ``use_colors`` is accepted and ignored: uvicorn injects it into the ``default`` and
    ``access`` formatter configs when started with ``use_colors=``.
    """
    if fmt == "console":
        return ConsoleFormatter()
    if fmt == "json":
        return JsonFormatter()
    raise ValueError(f"unknown log format {fmt!r} (expected 'json' or 'console')")


# --- installation ---------------------------------------------------------------------------

_OWNED_ATTR: Final = "_opsexec_handler"


def configure_logging(
    level: str = "INFO", fmt: LogFormat = "json", stream: IO[str] | None = None
) -> None:
    """Route the root logger to one masked stream handler (stderr unless ``stream``).

    Idempotent: a handler installed by an earlier call is replaced, not duplicated.
    Handlers someone else put on the root logger stay, but get the masking filter.
    """
    formatter = make_formatter(fmt)  # a bad format fails before anything is changed
    level_number = logging.getLevelName(level.upper())
    if not isinstance(level_number, int):
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _OWNED_ATTR, False):
            root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _OWNED_ATTR, True)
    handler.addFilter(MaskingFilter())
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level_number)
    install_masking_on_all_handlers(fmt)


def uvicorn_log_config(level: str = "INFO", fmt: LogFormat = "json") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dict for ``uvicorn.run(log_config=...)``.

    uvicorn applies its own config at start-up and would otherwise replace ours with
    formatters that render the unmasked access line (request path with query string).
    The formatter names ``default`` and ``access`` are the ones uvicorn patches when
    started with ``use_colors``. The root logger gets the same handler, so application
    logs look the same whether or not :func:`configure_logging` ran first.
    """
    level = level.upper()
    formatter = {"()": f"{__name__}.make_formatter", "fmt": fmt}
    handler = {
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
        "filters": ["masking"],
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"masking": {"()": f"{__name__}.MaskingFilter"}},
        "formatters": {"default": dict(formatter), "access": dict(formatter)},
        "handlers": {
            "default": {**handler, "formatter": "default"},
            "access": {**handler, "formatter": "access"},
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["access"], "level": level, "propagate": False},
        },
        "root": {"handlers": ["default"], "level": level},
    }


def install_masking_on_all_handlers(fmt: LogFormat = "json") -> int:
    """Attach the masking filter to every handler of every logger; returns how many.

    Belt and braces for handlers installed after (or around) our configuration: a
    library's own handler, uvicorn's defaults, ``logging.lastResort``. A uvicorn formatter
    is replaced by ours (``fmt``), because it unpacks the raw ``%``-args that the filter has
    already folded into the masked message.
    """
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers.extend(
        logger
        for logger in list(logging.root.manager.loggerDict.values())
        if isinstance(logger, logging.Logger)
    )
    handlers: dict[int, logging.Handler] = {}
    for logger in loggers:
        for handler in list(logger.handlers):
            handlers[id(handler)] = handler
    if logging.lastResort is not None:
        handlers[id(logging.lastResort)] = logging.lastResort
    installed = 0
    for handler in handlers.values():
        if not any(isinstance(existing, MaskingFilter) for existing in handler.filters):
            handler.addFilter(MaskingFilter())
            installed += 1
        formatter = handler.formatter
        if formatter is not None and type(formatter).__module__.startswith("uvicorn."):
            handler.setFormatter(make_formatter(fmt))
    return installed
