"""The masker itself (R-MASK): key rules, value shapes, JSON inside strings, the registry."""

from __future__ import annotations

import copy
import json
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from opsexec.safety.masking import (
    MIN_SECRET_LENGTH,
    REDACTED,
    Masker,
    is_secret_key,
    is_secret_reference,
    mask_text,
    mask_value,
    masker,
    register_secret,
    registered_secrets,
    unregister_secret,
)

# Shaped like the real thing, but made up.
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
GITHUB_TOKEN = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
SLACK_TOKEN = "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
SK_KEY = "sk-proj-Q2hhbmdlTWVQbGVhc2UxMjM0NTY3"
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEA7bq3dQ9xT1mH4mDfakefakefakefakefakefake\n"
    "c2VjcmV0LWtleS1tYXRlcmlhbC1ub3QtcmVhbA==\n"
    "-----END RSA PRIVATE KEY-----"
)


# --- key rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "db_password",
        "PASSWD",
        "token",
        "x-auth-token",
        "api_key",
        "apikey",
        "X-Api-Key",
        "secret",
        "client_secret",
        "credentials",
        "private_key",
        "privateKey",
        "aws_access_key_id",
        "auth",
        "Authorization",
        "proxy-authorization",
        "authToken",
        "oauth",
        "bearer",
        "session",
        "sessionId",
    ],
)
def test_secret_shaped_keys(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    # author/authority/authorized are deliberately *not* secret keys: they are common,
    # never secret, and worth seeing (see _KEY_WORDS in masking.py).
    ["author", "authors", "authored_by", "authority", "authorized", "exec_id", "path", "count"],
)
def test_ordinary_keys(key: str) -> None:
    assert not is_secret_key(key)


def test_secret_key_value_replaced_whatever_its_type() -> None:
    masked = mask_value(
        {
            "password": "hunter2",
            "token": 12345678,
            "credentials": {"user": "bob", "pass": "x"},
            "api_keys": ["k1", "k2"],
            "session": None,
        }
    )
    assert masked == {
        "password": REDACTED,
        "token": REDACTED,
        "credentials": REDACTED,
        "api_keys": REDACTED,
        "session": REDACTED,
    }


def test_secret_references_survive() -> None:
    plan_inputs = {
        "token": {"$secret": "deploy-token"},
        "env": {"DB_PASSWORD": {"$secret": "db-password"}, "MODE": "fast"},
        "api_keys": [{"$secret": "a"}, {"$secret": "b"}],
        "ref": {"$secret": "plain"},
    }
    assert mask_value(plan_inputs) == plan_inputs
    assert is_secret_reference({"$secret": "x"})
    assert not is_secret_reference({"$secret": "x", "other": 1})
    # Something that only looks like a reference is not kept under a secret key.
    assert mask_value({"token": {"$secret": "x", "value": "leak"}}) == {"token": REDACTED}


def test_mask_value_is_deep_returns_new_objects_and_keeps_scalars() -> None:
    original: dict[str, Any] = {
        "exec_id": "e-1",
        "count": 3,
        "ratio": 0.5,
        "ok": True,
        "none": None,
        "targets": ["host-1", "host-2"],
        "pair": ("a", "password=hunter2"),
        "nested": [{"secret": "s3"}, {"deeper": {"token": "t"}}],
    }
    before = copy.deepcopy(original)
    masked = mask_value(original)
    assert original == before  # never mutated
    assert masked is not original
    assert masked["targets"] is not original["targets"]
    assert masked["exec_id"] == "e-1"
    assert masked["count"] == 3
    assert masked["ratio"] == 0.5
    assert masked["ok"] is True
    assert masked["none"] is None
    assert masked["pair"] == ("a", f"password={REDACTED}")
    assert isinstance(masked["pair"], tuple)
    assert masked["nested"] == [{"secret": REDACTED}, {"deeper": {"token": REDACTED}}]


# --- value shapes in text -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("password=hunter2 user=bob", f"password={REDACTED} user=bob"),
        ("db_password: hunter2", f"db_password: {REDACTED}"),
        ('{"password": "hunter 2", "user": "bob"', f'{{"password": "{REDACTED}", "user": "bob"'),
        ("{'api_key': 'k-123', 'n': 1}", f"{{'api_key': '{REDACTED}', 'n': 1}}"),
        ('body={\\"token\\": \\"abc\\"}', f'body={{\\"token\\": \\"{REDACTED}\\"}}'),
        ("Authorization: Bearer abc.def", f"Authorization: {REDACTED}"),
        ("Authorization: Basic dXNlcjpwYXNz", f"Authorization: {REDACTED}"),
        ("sent Bearer abc123XYZ to upstream", f"sent Bearer {REDACTED} to upstream"),
        (
            "GET /v1/x?access_token=abc123&x=1 HTTP/1.1",
            f"GET /v1/x?access_token={REDACTED}&x=1 HTTP/1.1",
        ),
        ("postgres://admin:s3cr3t@db:5432/app", f"postgres://admin:{REDACTED}@db:5432/app"),
        ("redis://:pw123@localhost:6379/0", f"redis://:{REDACTED}@localhost:6379/0"),
        (f"jwt {JWT} end", f"jwt {REDACTED} end"),
        (f"key {AWS_KEY} in use", f"key {REDACTED} in use"),
        (f"clone with {GITHUB_TOKEN}", f"clone with {REDACTED}"),
        (f"slack {SLACK_TOKEN}", f"slack {REDACTED}"),
        (f"openai {SK_KEY}", f"openai {REDACTED}"),
        (f"key file:\n{PEM}\nafter", f"key file:\n{REDACTED}\nafter"),
        # An output truncated in the middle of a key must not leak the rest of it.
        ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAA", REDACTED),
        ("author=alice authority=ca", "author=alice authority=ca"),
        ('{"token": {"$secret": "deploy-token"}', '{"token": {"$secret": "deploy-token"}'),
    ],
)
def test_value_shapes(text: str, expected: str) -> None:
    assert mask_text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "step 3/5 service.restart on host-01.example.com finished in 1234 ms",
        "https://example.com/path/to/thing?page=2",
        "disk usage of / is 42% on task-7",
        "",
        "ok",
    ],
)
def test_ordinary_text_untouched(text: str) -> None:
    assert mask_text(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "password=a token: b",
        f"{PEM} {JWT} Bearer x postgres://u:p@h",
        '{"password": "x", "list": [1, "token=y"]}',
    ],
)
def test_masking_is_idempotent(text: str) -> None:
    once = mask_text(text)
    assert mask_text(once) == once


def test_json_inside_a_string_is_masked_structurally() -> None:
    document = json.dumps(
        {
            "user": "bob",
            "password": "hunter2",
            "nested": {"items": [{"api_key": 7}], "dsn": "postgres://u:pw@db/app"},
            "token": {"$secret": "deploy-token"},
        }
    )
    masked = mask_text(document)
    parsed = json.loads(masked)  # still valid JSON
    assert parsed == {
        "user": "bob",
        "password": REDACTED,
        "nested": {"items": [{"api_key": REDACTED}], "dsn": f"postgres://u:{REDACTED}@db/app"},
        "token": {"$secret": "deploy-token"},
    }
    assert mask_text('[{"secret": 1}]') == json.dumps([{"secret": REDACTED}])


def test_clean_json_keeps_its_formatting() -> None:
    document = '{ "a" : 1,   "b" : ["x"] }'
    assert mask_text(document) == document


# --- the registry ---------------------------------------------------------------------------


def test_registered_value_masked_anywhere() -> None:
    secret = "Tr0ub4dor&3-horse"
    assert mask_text(f"x{secret}y") == f"x{secret}y"
    with registered_secrets(secret):
        assert mask_text(f"prefix{secret}suffix and {secret}") == (
            f"prefix{REDACTED}suffix and {REDACTED}"
        )
        assert mask_value({"out": [f"line with {secret}"], "n": 1}) == {
            "out": [f"line with {REDACTED}"],
            "n": 1,
        }
        # As it travels: JSON-escaped and percent-encoded.
        assert secret not in mask_text(json.dumps({"msg": secret}))
        assert "Tr0ub4dor%263-horse" not in mask_text("q=Tr0ub4dor%263-horse")
        # As a mapping key.
        assert mask_value({secret: 1}) == {REDACTED: 1}
    assert mask_text(f"x{secret}y") == f"x{secret}y"  # unregistered again


def test_registration_is_refcounted() -> None:
    local = Masker()
    assert local.register("deploy-key-1")
    assert local.register("deploy-key-1")
    local.unregister("deploy-key-1")
    assert local.mask_text("deploy-key-1") == REDACTED  # the other user still holds it
    local.unregister("deploy-key-1")
    assert local.mask_text("deploy-key-1") == "deploy-key-1"
    local.unregister("deploy-key-1")  # one too many: harmless
    assert local.registered_count() == 0


def test_short_values_are_not_registered() -> None:
    # Masking "abc" everywhere would shred ordinary text; see MIN_SECRET_LENGTH.
    local = Masker()
    assert not local.register("abc")
    assert not local.register("")
    assert local.mask_text("abcdef") == "abcdef"
    assert local.register("a" * MIN_SECRET_LENGTH)


def test_longest_secret_wins_when_one_contains_another() -> None:
    local = Masker()
    local.register("alpha-1")
    local.register("alpha-1-beta-2")
    assert local.mask_text("v=alpha-1-beta-2;") == f"v={REDACTED};"


def test_registration_after_a_cached_result_takes_effect() -> None:
    local = Masker()
    line = "deploy hook used zq9-Rt5-mm2 at 12:00"
    assert local.mask_text(line) == line  # now cached
    local.register("zq9-Rt5-mm2")
    assert local.mask_text(line) == f"deploy hook used {REDACTED} at 12:00"


def test_module_level_functions_share_the_process_registry() -> None:
    assert register_secret("shared-registry-value")
    try:
        assert masker.mask_text("shared-registry-value") == REDACTED
        assert mask_text("x shared-registry-value") == f"x {REDACTED}"
    finally:
        unregister_secret("shared-registry-value")


def test_registration_while_other_threads_mask() -> None:
    local = Masker()
    secrets = [f"thread-secret-{n:04d}" for n in range(50)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def mask_forever() -> None:
        try:
            while not stop.is_set():
                local.mask_value({"line": " ".join(secrets), "n": 1})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=mask_forever) for _ in range(4)]
    for worker in workers:
        worker.start()
    for secret in secrets:
        local.register(secret)
    stop.set()
    for worker in workers:
        worker.join()
    assert errors == []
    masked = local.mask_text(" ".join(secrets))
    assert not any(secret in masked for secret in secrets)


SECRET_ALPHABET = st.characters(
    codec="utf-8",
    categories=("L", "N", "P", "S"),
    exclude_characters="*",  # the marker's own character, see the assume() below
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    secret=st.text(SECRET_ALPHABET, min_size=8, max_size=40),
    before=st.text(max_size=80),
    after=st.text(max_size=80),
)
def test_a_registered_secret_never_survives(secret: str, before: str, after: str) -> None:
    # Without "*" in the secret, an occurrence in the output can only come from the text
    # around the markers or from the letters of "REDACTED" itself.
    assume(secret not in REDACTED)
    local = Masker()
    assert local.register(secret)
    text = before + secret + after
    assert secret not in local.mask_text(text)
    masked = local.mask_value({"out": [text], "k": {"v": (text,)}})
    assert secret not in masked["out"][0]
    assert secret not in masked["k"]["v"][0]


# Pieces that come close to every shape, so random joins probe the trigger's edges.
NEAR_MISSES = [
    "password",
    "passwd",
    "pass",
    "token",
    "tok",
    "api_key",
    "api-key",
    "apikey",
    "key",
    "secret",
    "credential",
    "private_key",
    "access-key",
    "auth",
    "author",
    "Authorization",
    "bearer",
    "Basic ",
    "session",
    "eyJ",
    "AKIA",
    "ASIA",
    "ghp_",
    "github_pat_",
    "glpat-",
    "xoxb-",
    "sk-",
    "sk_live_",
    "AIza",
    "://",
    "@",
    ":",
    "=",
    " ",
    '"',
    "'",
    "\\",
    "{",
    "[",
    "-----BEGIN RSA PRIVATE KEY-----",
    "-----END RSA PRIVATE KEY-----",
    ".",
    "$",
    "0123456789abcdefghijKLMNOP",
    "ABCDEFGHIJKLMNOP1234",
]
near_miss = st.sampled_from(NEAR_MISSES).flatmap(
    lambda piece: st.sampled_from([piece, piece.upper(), piece.lower(), piece.title()])
)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.one_of(near_miss, st.text(max_size=4)), max_size=10).map("".join))
def test_fast_path_never_skips_what_the_slow_path_would_mask(text: str) -> None:
    # The fast path returns a string untouched when the trigger does not fire; that is
    # only safe while the trigger is a superset of every shape and key rule. Private
    # names on purpose: this is the invariant the speed of the whole masker rests on.
    from opsexec.safety.masking import _STATIC_TRIGGER_RE

    local = Masker()
    if _STATIC_TRIGGER_RE.search(text.casefold()) is None:
        assert local._mask_text_slow(text, local._matcher) == text
