"""Masking at the log sink (R-MASK) and JSON log lines with bound context (R-OBS).

Everything here goes through real ``logging`` loggers, handlers and formatters writing
to a ``StringIO``: the guarantee under test is that *whatever a call site does*, the
bytes that reach the stream contain no secret.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import logging.config
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import uvicorn
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from uvicorn.logging import AccessFormatter
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from opsexec.observability.logging import (
    ConsoleFormatter,
    JsonFormatter,
    MaskingFilter,
    bind_log_context,
    configure_logging,
    current_log_context,
    install_masking_on_all_handlers,
    uvicorn_log_config,
)
from opsexec.safety.masking import REDACTED, registered_secrets

PASSWORD = "hunter2-Xy9"
RESOLVED = "rEs0lved-Secret-Value-42"  # what a secrets backend would hand to a step
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
PEM_BODY = "MIIEowIBAAKCAQEA7bq3dQ9xT1mH4mDNotARealKeyNotARealKey"
PEM = f"-----BEGIN PRIVATE KEY-----\n{PEM_BODY}\n-----END PRIVATE KEY-----"


class JsonLog:
    """A logger whose only handler is the production pipeline, writing to memory."""

    def __init__(self, formatter: logging.Formatter | None = None) -> None:
        self.stream = io.StringIO()
        self.logger = logging.getLogger(f"opsexec.test.{uuid.uuid4().hex[:12]}")
        self.logger.propagate = False
        self.logger.setLevel(logging.DEBUG)
        self.handler = logging.StreamHandler(self.stream)
        self.handler.addFilter(MaskingFilter())
        self.handler.setFormatter(formatter or JsonFormatter())
        self.logger.addHandler(self.handler)

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        """Every line, parsed: each must be one complete JSON object."""
        parsed = [json.loads(line) for line in self.text.splitlines()]
        assert all(isinstance(line, dict) for line in parsed)
        return parsed

    def close(self) -> None:
        self.logger.removeHandler(self.handler)


@pytest.fixture
def log() -> Iterator[JsonLog]:
    sink = JsonLog()
    yield sink
    sink.close()


@pytest.fixture
def logging_state() -> Iterator[None]:
    """Put back whatever a test's (dict)config changes on shared loggers and handlers."""
    names = ["", "uvicorn", "uvicorn.error", "uvicorn.access"]
    loggers = [logging.getLogger(name) for name in names]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate, lg.disabled) for lg in loggers]
    every_handler = {
        id(handler): handler
        for lg in [logging.getLogger(), *logging.root.manager.loggerDict.values()]
        if isinstance(lg, logging.Logger)
        for handler in lg.handlers
    }
    if logging.lastResort is not None:
        every_handler[id(logging.lastResort)] = logging.lastResort
    filters = {key: list(handler.filters) for key, handler in every_handler.items()}
    yield
    for lg, handlers, level, propagate, disabled in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
        lg.disabled = disabled
    for key, handler in every_handler.items():
        handler.filters[:] = filters[key]


# --- where a secret can hide ----------------------------------------------------------------


def test_secret_in_the_message(log: JsonLog) -> None:
    log.logger.info(f"connecting with password={PASSWORD} as deploy")
    [line] = log.lines()
    assert PASSWORD not in log.text
    assert line["message"] == f"connecting with password={REDACTED} as deploy"


def test_secret_in_percent_args(log: JsonLog) -> None:
    # Neither arg looks secret on its own; the formatted message does.
    log.logger.warning("login %s=%s for %s", "password", PASSWORD, "bob")
    [line] = log.lines()
    assert PASSWORD not in log.text
    assert line["message"] == f"login password={REDACTED} for bob"
    assert line["level"] == "WARNING"


def test_secret_in_extra_fields_nested(log: JsonLog) -> None:
    log.logger.info(
        "step finished",
        extra={
            "exec_id": "e-123",
            "password": PASSWORD,
            "output": {
                "db": {"dsn": f"postgres://app:{PASSWORD}@db:5432/app", "api_key": 42},
                "lines": ["ok", {"token": PASSWORD}, f"Authorization: Bearer {PASSWORD}"],
            },
        },
    )
    [line] = log.lines()
    assert PASSWORD not in log.text
    assert line["exec_id"] == "e-123"
    assert line["password"] == REDACTED
    assert line["output"] == {
        "db": {"dsn": f"postgres://app:{REDACTED}@db:5432/app", "api_key": REDACTED},
        "lines": ["ok", {"token": REDACTED}, f"Authorization: {REDACTED}"],
    }


def test_secret_inside_a_json_string(log: JsonLog) -> None:
    body = json.dumps({"user": "bob", "password": PASSWORD, "items": [{"secret": "s-1"}]})
    log.logger.info("upstream said %s", body, extra={"response_body": body})
    [line] = log.lines()
    assert PASSWORD not in log.text
    assert "s-1" not in log.text
    assert json.loads(line["response_body"]) == {
        "user": "bob",
        "password": REDACTED,
        "items": [{"secret": REDACTED}],
    }


def test_secret_in_exception_text(log: JsonLog) -> None:
    try:
        raise ConnectionError(f"cannot reach postgres://admin:{PASSWORD}@db/app ({PASSWORD=})")
    except ConnectionError:
        log.logger.exception("migration failed")
    [line] = log.lines()
    assert PASSWORD not in log.text
    assert line["message"] == "migration failed"
    assert line["level"] == "ERROR"
    assert "Traceback (most recent call last)" in line["exc"]
    assert f"ConnectionError: cannot reach postgres://admin:{REDACTED}@db/app" in line["exc"]


def test_masked_exception_cannot_be_rendered_again_by_another_formatter() -> None:
    # The filter leaves only the masked text: a stock formatter that would normally
    # format exc_info itself has nothing live to render.
    sink = JsonLog(formatter=logging.Formatter("%(levelname)s %(message)s"))
    try:
        try:
            raise ValueError(f"bad credentials {RESOLVED}")
        except ValueError:
            with registered_secrets(RESOLVED):
                sink.logger.exception("oops")
        assert RESOLVED not in sink.text
        assert "ValueError: bad credentials " + REDACTED in sink.text
    finally:
        sink.close()


def test_registered_secret_values_anywhere(log: JsonLog) -> None:
    with registered_secrets(RESOLVED):
        log.logger.info(f"deploy used key{RESOLVED}suffix")  # a substring of a longer token
        log.logger.info("arg %s", RESOLVED, extra={"out": {"stdout": [f"> {RESOLVED} <"]}})
        try:
            raise RuntimeError(f"step failed with {RESOLVED}")
        except RuntimeError:
            log.logger.exception("failed", extra={"env": (f"X={RESOLVED}",)})
    assert RESOLVED not in log.text
    first, second, third = log.lines()
    assert first["message"] == f"deploy used key{REDACTED}suffix"
    assert second["out"] == {"stdout": [f"> {REDACTED} <"]}
    assert third["env"] == [f"X={REDACTED}"]


@pytest.mark.parametrize(
    ("message", "secret"),
    [
        (f"loaded key\n{PEM}\n", PEM_BODY),
        ("cloning https://deploy:gh-Pa55word@git.example.com/x.git", "gh-Pa55word"),
        (f"session cookie is {JWT}", JWT.split(".")[2]),
        ("using AKIAIOSFODNN7EXAMPLE for s3", "AKIAIOSFODNN7EXAMPLE"),
        ("curl -H 'Authorization: Bearer abcDEF123456' https://api", "abcDEF123456"),
        ("sent Bearer abcDEF123456 upstream", "abcDEF123456"),
    ],
)
def test_secret_shapes_in_log_lines(log: JsonLog, message: str, secret: str) -> None:
    log.logger.info(message)
    assert secret not in log.text
    assert REDACTED in log.lines()[0]["message"]


def test_uvicorn_access_line_is_masked(logging_state: None) -> None:
    config = uvicorn_log_config("INFO", "json")
    del config["root"]  # leave the test runner's root handlers alone
    buffer = io.StringIO()
    for handler in config["handlers"].values():
        handler["stream"] = buffer
    logging.config.dictConfig(config)

    # Exactly what uvicorn's h11/httptools protocols log for a request.
    scope: Any = {
        "type": "http",
        "client": ("127.0.0.1", 51234),
        "path": "/v1/executions",
        "query_string": b"access_token=abc123secret&limit=5",
    }
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d',
        get_client_addr(scope),
        "GET",
        get_path_with_query_string(scope),
        "1.1",
        200,
    )
    logging.getLogger("uvicorn.error").info(
        "Started server process [%d]",
        4242,
        extra={"color_message": "Started server process [\x1b[36m%d\x1b[0m]"},
    )
    access, started = (json.loads(line) for line in buffer.getvalue().splitlines())
    assert "abc123secret" not in buffer.getvalue()
    assert access["logger"] == "uvicorn.access"
    assert access["message"] == (
        f'127.0.0.1:51234 - "GET /v1/executions?access_token={REDACTED}&limit=5 HTTP/1.1" 200'
    )
    assert started["message"] == "Started server process [4242]"
    assert "color_message" not in started


def test_uvicorn_accepts_the_config_and_its_use_colors_override(logging_state: None) -> None:
    config = uvicorn_log_config("debug", "console")
    assert config["root"]["handlers"] == ["default"]
    assert config["handlers"]["default"]["filters"] == ["masking"]
    del config["root"]
    buffer = io.StringIO()
    for handler in config["handlers"].values():
        handler["stream"] = buffer

    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
        pass

    # uvicorn.Config applies log_config itself and patches use_colors into "default" and
    # "access"; both must keep working with our formatter factory.
    uvicorn.Config(app, log_config=config, use_colors=True)
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "10.0.0.1:1", "POST", "/v1/x?token=t0ken-value", "1.1", 201
    )
    assert "t0ken-value" not in buffer.getvalue()
    assert f"token={REDACTED}" in buffer.getvalue()
    assert logging.getLogger("uvicorn.access").level == logging.DEBUG


def test_install_masking_on_handlers_installed_by_others(logging_state: None) -> None:
    stream = io.StringIO()
    foreign = logging.getLogger(f"thirdparty.{uuid.uuid4().hex[:8]}")
    foreign.propagate = False
    foreign.setLevel(logging.INFO)
    plain = logging.StreamHandler(stream)
    plain.setFormatter(logging.Formatter("%(message)s"))
    foreign.addHandler(plain)
    access = logging.getLogger(f"uvicornlike.{uuid.uuid4().hex[:8]}")
    access.propagate = False
    access.setLevel(logging.INFO)
    uvicorn_handler = logging.StreamHandler(stream)
    uvicorn_handler.setFormatter(AccessFormatter('%(client_addr)s "%(request_line)s"'))
    access.addHandler(uvicorn_handler)
    try:
        assert install_masking_on_all_handlers() >= 2
        assert install_masking_on_all_handlers() == 0  # already there: not added twice
        foreign.info("password=%s", PASSWORD)
        # uvicorn's AccessFormatter unpacks raw args the filter has folded into the
        # message; it is swapped for ours instead of crashing or leaking.
        access.info('%s - "%s %s HTTP/%s" %d', "1.2.3.4:5", "GET", "/?api_key=k-99", "1.1", 200)
    finally:
        foreign.removeHandler(plain)
        access.removeHandler(uvicorn_handler)
    assert PASSWORD not in stream.getvalue()
    assert "k-99" not in stream.getvalue()
    assert f"password={REDACTED}" in stream.getvalue()
    assert "api_key=" + REDACTED in stream.getvalue()


def test_formatter_alone_still_masks() -> None:
    # A handler someone built without the filter: the formatter is the last defence.
    stream = io.StringIO()
    logger = logging.getLogger(f"opsexec.test.nofilter.{uuid.uuid4().hex[:8]}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    try:
        logger.info("token=%s", PASSWORD, extra={"secret": PASSWORD, "ok": 1})
    finally:
        logger.removeHandler(handler)
    assert PASSWORD not in stream.getvalue()
    assert json.loads(stream.getvalue())["ok"] == 1


def test_a_call_site_cannot_switch_masking_off(log: JsonLog) -> None:
    log.logger.info("x", extra={"_opsexec_masked": True, "password": PASSWORD})
    assert PASSWORD not in log.text


def test_the_record_is_masked_in_place_for_every_later_handler(log: JsonLog) -> None:
    later = io.StringIO()
    plain = logging.StreamHandler(later)
    plain.setFormatter(logging.Formatter("%(message)s %(password)s %(output)s"))
    log.logger.addHandler(plain)  # runs after the masking handler
    log.logger.info(
        "password=%s", PASSWORD, extra={"password": PASSWORD, "output": [f"token={PASSWORD}"]}
    )
    log.logger.removeHandler(plain)
    assert PASSWORD not in log.text
    assert PASSWORD not in later.getvalue()


# --- what must survive ----------------------------------------------------------------------


def test_ordinary_fields_survive_untouched(log: JsonLog) -> None:
    fields = {
        "exec_id": "0b8f4a52-5c0e-4d0e-9d55-2f3b1b8a9d10",
        "tenant_id": "tenant-acme",
        "plan_hash": "9f2c1e0d4b7a6c5e8f1d2c3b4a5968776f5e4d3c2b1a09f8e7d6c5b4a3928170",
        "author": "alice@example.com",
        "targets": ["web-01", "web-02"],
        "path": "/var/log/nginx/access.log",
        "url": "https://example.com/runbooks/restart?step=2",
        "duration_ms": 1234,
        "ratio": 0.25,
        "dry_run": False,
        "error_class": None,
        "output": {"exit_code": 0, "stdout": ["Restarted nginx.service"]},
    }
    log.logger.info("ordinary line with 3 steps", extra=fields)
    [line] = log.lines()
    assert line["message"] == "ordinary line with 3 steps"
    assert {key: line[key] for key in fields} == fields
    assert REDACTED not in log.text


def test_secret_references_survive(log: JsonLog) -> None:
    inputs = {"token": {"$secret": "deploy-token"}, "env": {"DB_PASSWORD": {"$secret": "db"}}}
    log.logger.info("plan inputs", extra={"inputs": inputs, "token": {"$secret": "x"}})
    [line] = log.lines()
    assert line["inputs"] == inputs
    assert line["token"] == {"$secret": "x"}


def test_line_shape(log: JsonLog) -> None:
    before = datetime.now(UTC)
    log.logger.debug("one")
    log.logger.error("two", extra={"level": "field named like a core key"})
    one, two = log.lines()
    assert set(one) == {"ts", "level", "logger", "message"}
    assert one["logger"] == log.logger.name
    stamp = datetime.fromisoformat(one["ts"])
    assert stamp.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= stamp <= datetime.now(UTC)
    assert one["ts"].endswith("Z")
    assert two["level"] == "ERROR"
    assert two["field_level"] == "field named like a core key"


def test_broken_values_never_break_the_caller(log: JsonLog) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

        __repr__ = __str__

    cyclic: list[Any] = []
    cyclic.append(cyclic)
    log.logger.info("too few args %s %s", "one")
    log.logger.info("object", extra={"thing": Unprintable()})
    log.logger.info("cycle", extra={"loop": cyclic, "password": PASSWORD})
    few, thing, cycle = log.lines()
    assert "too few args" in few["message"]
    assert thing["thing"] == "<unprintable Unprintable: RuntimeError>"
    assert cycle["message"] == "cycle"
    assert cycle["loop"] == "<unloggable: RecursionError>"
    assert cycle["password"] == REDACTED
    assert PASSWORD not in log.text


def test_console_format_is_masked_and_readable() -> None:
    sink = JsonLog(formatter=ConsoleFormatter())
    try:
        sink.logger.info(
            "restarted %s",
            "nginx",
            extra={"exec_id": "e-1", "password": PASSWORD, "note": "two words"},
        )
    finally:
        sink.close()
    text = sink.text
    assert PASSWORD not in text
    assert "INFO" in text
    assert f"{sink.logger.name}: restarted nginx" in text
    assert "exec_id=e-1" in text
    assert f"password={REDACTED}" in text
    assert 'note="two words"' in text


# --- log context (R-OBS) --------------------------------------------------------------------


def test_bound_context_reaches_every_line(log: JsonLog) -> None:
    with bind_log_context(exec_id="e-9", tenant_id="t-1", plan_hash="abc"):
        log.logger.info("inside")
        with bind_log_context(step=2, exec_id="e-10"):
            log.logger.info("nested", extra={"tenant_id": "explicit wins"})
        assert current_log_context()["exec_id"] == "e-9"
    log.logger.info("outside")
    inside, nested, outside = log.lines()
    assert (inside["exec_id"], inside["tenant_id"], inside["plan_hash"]) == ("e-9", "t-1", "abc")
    assert (nested["exec_id"], nested["step"], nested["tenant_id"]) == ("e-10", 2, "explicit wins")
    assert "exec_id" not in outside
    assert current_log_context() == {}


def test_bound_context_is_masked_and_follows_asyncio_tasks(log: JsonLog) -> None:
    async def step() -> None:
        log.logger.info("in task")

    async def main() -> None:
        token = bind_log_context(request_id="r-1", auth_header=f"Bearer {PASSWORD}")
        try:
            await asyncio.create_task(step())
        finally:
            token.reset()
            token.reset()  # idempotent

    asyncio.run(main())
    [line] = log.lines()
    assert line["request_id"] == "r-1"
    assert line["auth_header"] == REDACTED
    assert PASSWORD not in log.text


# --- configuration --------------------------------------------------------------------------


def test_configure_logging_is_idempotent(logging_state: None) -> None:
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    configure_logging("debug", "json", stream=stream)
    root = logging.getLogger()
    ours = [h for h in root.handlers if any(isinstance(f, MaskingFilter) for f in h.filters)]
    assert root.level == logging.DEBUG
    assert ours
    child = logging.getLogger(f"opsexec.test.cfg.{uuid.uuid4().hex[:8]}")
    child.debug("hello %s", f"token={PASSWORD}")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["message"] for line in lines] == [f"hello token={REDACTED}"]  # once


def test_configure_logging_console(logging_state: None) -> None:
    stream = io.StringIO()
    configure_logging("INFO", "console", stream=stream)
    logging.getLogger(f"opsexec.test.console.{uuid.uuid4().hex[:8]}").info("api_key=k-1234")
    assert stream.getvalue().rstrip().endswith(f"api_key={REDACTED}")
    handlers = list(logging.getLogger().handlers)
    with pytest.raises(ValueError, match="unknown log format"):
        configure_logging("INFO", "xml", stream=stream)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("LOUD", "json", stream=stream)
    assert logging.getLogger().handlers == handlers  # a bad call changes nothing


# --- the property ---------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    secret=st.text(
        st.characters(codec="utf-8", categories=("L", "N", "P", "S"), exclude_characters="*"),
        min_size=8,
        max_size=40,
    ),
    before=st.text(max_size=60),
    after=st.text(max_size=60),
)
def test_registered_secret_never_reaches_a_log_line(secret: str, before: str, after: str) -> None:
    assume(secret not in REDACTED)  # see the same property in test_masking.py
    sink = JsonLog()
    try:
        with registered_secrets(secret):
            text = before + secret + after
            sink.logger.info(text, extra={"out": {"lines": [text]}})
            sink.logger.info("%s", text)
        for line in sink.lines():  # check the decoded strings, not the JSON escapes
            assert secret not in line["message"]
            assert secret not in json.dumps(line, ensure_ascii=False)
    finally:
        sink.close()
