"""Secrets (R-SEC): encryption, key handling, backends, reference resolution, rotation.

Against a real PostgreSQL. Rotation touches every tenant's rows, so its tests run in a
database of their own, where no other test's credentials (under other keys) can appear.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import stat
import sys
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest
from pydantic import SecretStr

from opsexec.config import Settings
from opsexec.errors import (
    SecretDecryptionError,
    SecretKeyError,
    SecretNotFoundError,
    SecretUnusableError,
    ValidationError,
)
from opsexec.plan import SecretRef
from opsexec.safety.masking import REDACTED, mask_text
from opsexec.safety.secrets import (
    KEY_FILE_NAME,
    NONCE_BYTES,
    ChainedSecretBackend,
    CredentialKind,
    DatabaseSecretBackend,
    EncryptedSecret,
    EnvSecretBackend,
    MasterKey,
    ResolvedSecret,
    default_secret_backend,
    load_master_key,
    load_or_create_key_file,
    resolve_references,
    resolved_secrets,
    rotate_master_key,
    save_credential,
    secret_reference_names,
    secret_scope,
)
from opsexec.store import create_pool, transaction
from opsexec.store import secrets as store
from opsexec.store.identity import ensure_tenant
from tests.conftest import REPO_ROOT, TenantFixture, migrated_database

pytestmark = pytest.mark.postgres


def planted(label: str = "value") -> str:
    """A value unique to one test, so a search for it cannot hit anything else."""
    return f"plnt-{label}-{secrets.token_hex(12)}"


async def store_secret(
    pool: asyncpg.Pool,
    key: MasterKey,
    tenant_id: uuid.UUID,
    name: str,
    value: str,
    kind: CredentialKind = "password",
    username: str | None = None,
) -> None:
    async with transaction(pool) as connection:
        await save_credential(
            connection,
            key,
            tenant_id,
            name=name,
            kind=kind,
            value=value,
            username=username,
        )


# --- the cipher -------------------------------------------------------------------------------


def test_round_trip_with_a_fresh_nonce_each_time() -> None:
    key = MasterKey.generate()
    tenant = uuid.uuid4()
    value = "pässwörd with ünïcode and\nnewlines"
    first = key.encrypt(value, tenant_id=tenant, name="db", kind="password")
    second = key.encrypt(value, tenant_id=tenant, name="db", kind="password")
    assert len(first.nonce) == NONCE_BYTES
    assert first.nonce != second.nonce
    assert first.ciphertext != second.ciphertext
    assert value.encode() not in first.ciphertext
    assert first.key_id == key.key_id
    assert key.decrypt(first, tenant_id=tenant, name="db", kind="password") == value
    assert key.decrypt(second, tenant_id=tenant, name="db", kind="password") == value


def test_altered_or_rebound_ciphertext_is_refused() -> None:
    key = MasterKey.generate()
    tenant = uuid.uuid4()
    value = planted()
    sealed = key.encrypt(value, tenant_id=tenant, name="db", kind="password")
    flipped = bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
    cases = [
        (EncryptedSecret(sealed.nonce, flipped, sealed.key_id), tenant, "db", "password"),
        (
            EncryptedSecret(os.urandom(12), sealed.ciphertext, sealed.key_id),
            tenant,
            "db",
            "password",
        ),
        (
            EncryptedSecret(sealed.nonce[:8], sealed.ciphertext, sealed.key_id),
            tenant,
            "db",
            "password",
        ),
        (sealed, uuid.uuid4(), "db", "password"),  # another tenant
        (sealed, tenant, "db2", "password"),  # another name
        (sealed, tenant, "db", "token"),  # another kind
    ]
    for encrypted, tenant_id, name, kind in cases:
        with pytest.raises(SecretDecryptionError) as caught:
            key.decrypt(encrypted, tenant_id=tenant_id, name=name, kind=kind)
        assert caught.value.code == "secret_undecryptable"
        assert value not in str(caught.value)


def test_a_different_key_is_diagnosed_by_key_id() -> None:
    tenant = uuid.uuid4()
    old, new = MasterKey.generate(), MasterKey.generate()
    sealed = old.encrypt("s3cret-value", tenant_id=tenant, name="db", kind="password")
    with pytest.raises(SecretDecryptionError, match=old.key_id) as caught:
        new.decrypt(sealed, tenant_id=tenant, name="db", kind="password")
    assert new.key_id in caught.value.detail
    # Even a forged key id cannot make the wrong key succeed: GCM authenticates.
    forged = EncryptedSecret(sealed.nonce, sealed.ciphertext, new.key_id)
    with pytest.raises(SecretDecryptionError, match="failed authentication"):
        new.decrypt(forged, tenant_id=tenant, name="db", kind="password")


def test_reprs_never_show_values_or_keys() -> None:
    key = MasterKey.generate()
    value = planted()
    resolved = ResolvedSecret(name="db", value=value, kind="password", username="app")
    for text in (repr(resolved), str(resolved), f"{resolved}", repr([resolved])):
        assert value not in text
        assert "db" in text
    material = key.to_base64()
    assert material not in repr(key)
    assert key.key_id in repr(key)
    sealed = key.encrypt(value, tenant_id=uuid.uuid4(), name="db", kind="password")
    assert sealed.ciphertext.hex() not in repr(sealed)


def test_values_too_short_to_redact_are_refused() -> None:
    with pytest.raises(SecretUnusableError) as caught:
        ResolvedSecret(name="pin", value="123")
    assert caught.value.code == "secret_unusable"
    assert "123" not in caught.value.detail


# --- the master key ---------------------------------------------------------------------------


def test_key_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", secret_key=None)
    first = load_master_key(settings)
    key_file = tmp_path / "data" / KEY_FILE_NAME
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(base64.b64decode(key_file.read_text().strip())) == 32
    assert load_master_key(settings) == first
    assert load_master_key(settings).key_id == first.key_id
    # No temporary files are left behind.
    assert sorted(p.name for p in key_file.parent.iterdir()) == [KEY_FILE_NAME]


def test_processes_racing_to_create_the_key_file_agree(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    with ThreadPoolExecutor(max_workers=8) as pool:
        keys = list(pool.map(lambda _: load_or_create_key_file(path), range(16)))
    assert len({key.key_id for key in keys}) == 1
    assert load_or_create_key_file(path).key_id == keys[0].key_id


def test_environment_key_is_honoured_and_no_file_is_written(tmp_path: Path) -> None:
    raw = os.urandom(32)
    for text in (base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()):
        settings = Settings(data_dir=tmp_path, secret_key=SecretStr(f" {text}\n"))
        assert load_master_key(settings) == MasterKey(raw)
    assert not (tmp_path / KEY_FILE_NAME).exists()


def test_environment_key_from_the_real_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = os.urandom(32)
    monkeypatch.setenv("OPSEXEC_SECRET_KEY", base64.b64encode(raw).decode())
    monkeypatch.setenv("OPSEXEC_DATA_DIR", str(tmp_path))
    assert load_master_key(Settings()) == MasterKey(raw)


@pytest.mark.parametrize(
    "text",
    [
        "not base64 at all!",
        base64.b64encode(os.urandom(16)).decode(),  # AES-128 is not what we use
        base64.b64encode(os.urandom(33)).decode(),
        "   ",
    ],
    ids=["not-base64", "16-bytes", "33-bytes", "blank"],
)
def test_malformed_environment_keys_are_refused_without_echo(tmp_path: Path, text: str) -> None:
    settings = Settings(data_dir=tmp_path, secret_key=SecretStr(text))
    with pytest.raises(SecretKeyError) as caught:
        load_master_key(settings)
    assert "OPSEXEC_SECRET_KEY" in caught.value.detail
    if text.strip():
        assert text not in caught.value.detail
    assert not (tmp_path / KEY_FILE_NAME).exists()


def test_malformed_key_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE_NAME).write_text("short\n")
    with pytest.raises(SecretKeyError, match="key file"):
        load_master_key(Settings(data_dir=tmp_path, secret_key=None))


# --- resolving references ---------------------------------------------------------------------


async def test_database_backend_resolves_nested_references(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    key = MasterKey.generate()
    backend = DatabaseSecretBackend(pool, key)
    password, token = planted("password"), planted("token")
    await store_secret(pool, key, tenant.id, "db-password", password, username="app")
    await store_secret(pool, key, tenant.id, "team/api-token", token, kind="token")

    inputs = {
        "command": "deploy",
        "env": {"DB_PASSWORD": {"$secret": "db-password"}, "PLAIN": "x"},
        "headers": [{"Authorization": {"$secret": "team/api-token"}}, "literal"],
        "again": ({"$secret": "db-password"}, 3, None),
        "model": SecretRef.model_validate({"$secret": "team/api-token"}),
    }
    original = repr(inputs)
    resolved, values = await resolve_references(inputs, backend, tenant.id)
    assert resolved == {
        "command": "deploy",
        "env": {"DB_PASSWORD": password, "PLAIN": "x"},
        "headers": [{"Authorization": token}, "literal"],
        "again": (password, 3, None),
        "model": token,
    }
    assert values == [password, token]  # each once, in document order
    assert repr(inputs) == original  # the input is not modified
    assert secret_reference_names(inputs) == ["db-password", "team/api-token"]

    direct = await backend.resolve(tenant.id, "db-password")
    assert (direct.value, direct.kind, direct.username) == (password, "password", "app")

    untouched, none = await resolve_references({"a": [1, "b"]}, backend, tenant.id)
    assert untouched == {"a": [1, "b"]}
    assert none == []


async def test_unknown_secret_names_the_reference_not_a_value(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    key = MasterKey.generate()
    known = planted()
    await store_secret(pool, key, tenant.id, "known", known)
    backend = default_secret_backend(pool, key)
    inputs = {"a": {"$secret": "known"}, "b": [{"$secret": "missing-one"}]}
    with pytest.raises(SecretNotFoundError) as caught:
        await resolve_references(inputs, backend, tenant.id)
    error = caught.value
    assert error.code == "secret_not_found"
    assert error.status == 404
    assert "missing-one" in error.detail
    assert error.pointer == "/b/0"
    assert known not in f"{error} {error.detail} {error.extra!r}"

    # Another tenant's secret does not exist for this one.
    with pytest.raises(SecretNotFoundError):
        await backend.resolve(uuid.uuid4(), "known")


async def test_malformed_reference_is_a_validation_error(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    backend = DatabaseSecretBackend(pool, MasterKey.generate())
    for bad in ({"$secret": 5}, {"$secret": "a", "extra": 1}, {"$secret": ""}):
        with pytest.raises(ValidationError) as caught:
            await resolve_references({"x": [bad]}, backend, tenant.id)
        assert caught.value.pointer == "/x/0"


async def test_row_copied_to_another_tenant_or_name_fails_to_decrypt(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    key = MasterKey.generate()
    value = planted()
    await store_secret(pool, key, tenant.id, "origin", value)
    async with transaction(pool) as connection:
        other = await ensure_tenant(connection, f"thief-{uuid.uuid4().hex[:8]}")
        copy = """INSERT INTO credentials (tenant_id, name, kind, nonce, ciphertext, key_id)
                  SELECT $3, $4, kind, nonce, ciphertext, key_id FROM credentials
                   WHERE tenant_id = $1 AND name = $2"""
        await connection.execute(copy, tenant.id, "origin", other, "origin")
        await connection.execute(copy, tenant.id, "origin", tenant.id, "renamed")
        await connection.execute(
            "UPDATE credentials SET kind = 'token' WHERE tenant_id = $1 AND name = 'origin'",
            other,
        )
    backend = DatabaseSecretBackend(pool, key)
    assert (await backend.resolve(tenant.id, "origin")).value == value
    for tenant_id, name in ((other, "origin"), (tenant.id, "renamed")):
        with pytest.raises(SecretDecryptionError) as caught:
            await backend.resolve(tenant_id, name)
        assert value not in str(caught.value)


async def test_environment_backend_and_router(
    pool: asyncpg.Pool, tenant: TenantFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = MasterKey.generate()
    from_env, from_db = planted("env"), planted("db")
    monkeypatch.setenv("OPSEXEC_SECRET_DEPLOY_TOKEN", from_env)
    monkeypatch.setenv("OPSEXEC_SECRET_KEY", base64.b64encode(os.urandom(32)).decode())
    await store_secret(pool, key, tenant.id, "db:prod", from_db)
    backend = default_secret_backend(pool, key)

    resolved = await backend.resolve(tenant.id, "env:DEPLOY_TOKEN")
    assert (resolved.name, resolved.value, resolved.kind) == (
        "env:DEPLOY_TOKEN",
        from_env,
        "generic",
    )
    # A colon without a registered scheme is an ordinary stored name.
    assert (await backend.resolve(tenant.id, "db:prod")).value == from_db

    # The master key is an opsexec setting, not a secret plans may read.
    with pytest.raises(SecretNotFoundError, match="opsexec setting"):
        await backend.resolve(tenant.id, "env:KEY")
    for name in ("env:KEY", "env:key", "env:NOPE", "env:bad-name", "env:"):
        with pytest.raises(SecretNotFoundError) as caught:
            await backend.resolve(tenant.id, name)
        assert os.environ["OPSEXEC_SECRET_KEY"] not in str(caught.value)

    # A backend of one's own, with its own variables and prefix, plugged in by scheme.
    own = EnvSecretBackend(prefix="APP_", environ={"APP_TOKEN": "tok-from-mapping"})
    router = ChainedSecretBackend(DatabaseSecretBackend(pool, key), {"app": own})
    assert (await router.resolve(tenant.id, "app:TOKEN")).name == "app:TOKEN"
    assert (await router.resolve(tenant.id, "app:TOKEN")).value == "tok-from-mapping"
    assert (await router.resolve(tenant.id, "db:prod")).value == from_db

    resolved_inputs, values = await resolve_references(
        {"env": {"T": {"$secret": "env:DEPLOY_TOKEN"}}}, backend, tenant.id
    )
    assert resolved_inputs == {"env": {"T": from_env}}
    assert values == [from_env]

    monkeypatch.setenv("OPSEXEC_SECRET_PIN", "123")
    with pytest.raises(SecretUnusableError):
        await backend.resolve(tenant.id, "env:PIN")


async def test_resolved_secrets_are_masked_only_while_inside(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    key = MasterKey.generate()
    value = planted()
    pem = (
        "-----BEGIN OPENSSH PRIVATE KEY-----\n"
        f"b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ{secrets.token_hex(8)}\n"
        "-----END OPENSSH PRIVATE KEY-----\n"
    )
    key_line = pem.splitlines()[1]
    await store_secret(pool, key, tenant.id, "db", value)
    await store_secret(pool, key, tenant.id, "ssh", pem, kind="ssh_key")
    backend = default_secret_backend(pool, key)
    line = f"connecting with {value}"
    assert mask_text(line) == line

    async with resolved_secrets(
        {"p": {"$secret": "db"}, "k": {"$secret": "ssh"}}, backend, tenant.id
    ) as resolved:
        assert resolved == {"p": value, "k": pem}
        assert mask_text(line) == f"connecting with {REDACTED}"
        assert value not in mask_text(f'{{"error": "{value}"}}')
        # A line of the key echoed on its own is scrubbed too.
        assert mask_text(f"echo: {key_line}") == f"echo: {REDACTED}"
    assert mask_text(line) == line
    assert mask_text(key_line) == key_line

    # Unregistered on error as well.
    async def failing_step() -> None:
        async with resolved_secrets({"$secret": "db"}, backend, tenant.id) as plain:
            assert plain == value
            assert mask_text(value) == REDACTED
            raise RuntimeError("step failed")

    with pytest.raises(RuntimeError):
        await failing_step()
    assert mask_text(line) == line


async def test_secret_scope_registers_on_first_use_and_releases(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    key = MasterKey.generate()
    value = planted()
    await store_secret(pool, key, tenant.id, "jit", value)
    backend = default_secret_backend(pool, key)
    async with secret_scope(backend, tenant.id) as scope:
        assert mask_text(value) == value  # nothing fetched yet
        assert await scope.value("jit") == value
        assert mask_text(value) == REDACTED
        assert (await scope.resolve("jit")).kind == "password"
        with pytest.raises(SecretNotFoundError):
            await scope.value("nope")
    assert mask_text(value) == value


# --- rotation ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def rotation_dsn(server_dsn: str) -> AsyncIterator[str]:
    """A database of this module's own: rotation re-encrypts every row of every tenant."""
    async with migrated_database(server_dsn, "opsexec_test_secrets") as dsn:
        yield dsn


@pytest.fixture
async def rotation_pool(rotation_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(rotation_dsn, min_size=1, max_size=4)
    try:
        await pool.execute("DELETE FROM credentials")
        yield pool
    finally:
        await pool.close()


async def two_tenants_with_secrets(
    pool: asyncpg.Pool, key: MasterKey, per_tenant: int = 7
) -> dict[tuple[uuid.UUID, str], str]:
    stored: dict[tuple[uuid.UUID, str], str] = {}
    async with transaction(pool) as connection:
        tenants = [await ensure_tenant(connection, f"rot-{uuid.uuid4().hex[:8]}") for _ in "ab"]
    for tenant_id in tenants:
        for index in range(per_tenant):
            name = f"cred-{index}"
            stored[tenant_id, name] = planted(name)
            await store_secret(pool, key, tenant_id, name, stored[tenant_id, name])
    return stored


async def test_rotation_reencrypts_every_row_and_is_idempotent(
    rotation_pool: asyncpg.Pool,
) -> None:
    old, new = MasterKey.generate(), MasterKey.generate()
    stored = await two_tenants_with_secrets(rotation_pool, old)
    before = {r["id"]: r for r in await rotation_pool.fetch("SELECT * FROM credentials")}

    assert await rotate_master_key(rotation_pool, old, new, batch_size=3) == len(stored)

    after = {r["id"]: r for r in await rotation_pool.fetch("SELECT * FROM credentials")}
    assert after.keys() == before.keys()
    for row_id, row in after.items():
        assert row["key_id"] == new.key_id
        assert row["ciphertext"] != before[row_id]["ciphertext"]
        assert row["nonce"] != before[row_id]["nonce"]
        assert row["updated_at"] == before[row_id]["updated_at"]
    new_backend = DatabaseSecretBackend(rotation_pool, new)
    old_backend = DatabaseSecretBackend(rotation_pool, old)
    for (tenant_id, name), value in stored.items():
        assert (await new_backend.resolve(tenant_id, name)).value == value
        with pytest.raises(SecretDecryptionError):
            await old_backend.resolve(tenant_id, name)

    assert await rotate_master_key(rotation_pool, old, new) == 0
    assert await rotate_master_key(rotation_pool, new, new) == 0


async def test_interrupted_rotation_resumes(rotation_pool: asyncpg.Pool) -> None:
    old, new = MasterKey.generate(), MasterKey.generate()
    stored = await two_tenants_with_secrets(rotation_pool, old, per_tenant=3)
    # As if a previous run committed one batch before it died.
    (tenant_id, name), value = next(iter(stored.items()))
    await store_secret(rotation_pool, new, tenant_id, name, value)

    assert await rotate_master_key(rotation_pool, old, new) == len(stored) - 1
    backend = DatabaseSecretBackend(rotation_pool, new)
    for (tenant_id, name), value in stored.items():
        assert (await backend.resolve(tenant_id, name)).value == value


async def test_rotation_refuses_rows_under_a_third_key(rotation_pool: asyncpg.Pool) -> None:
    old, new, stray = MasterKey.generate(), MasterKey.generate(), MasterKey.generate()
    stored = await two_tenants_with_secrets(rotation_pool, old, per_tenant=2)
    tenant_id = next(iter(stored))[0]
    await store_secret(rotation_pool, stray, tenant_id, "stray", planted())
    async with rotation_pool.acquire() as connection:
        before = await store.count_credentials_by_key(connection)

    with pytest.raises(SecretKeyError, match=stray.key_id):
        await rotate_master_key(rotation_pool, old, new)

    async with rotation_pool.acquire() as connection:
        assert await store.count_credentials_by_key(connection) == before


async def run_rotate_command(
    dsn: str, data_dir: Path, *args: str, secret_key: str | None = None
) -> tuple[int, str, str]:
    """``opsexec admin rotate-secret-key`` in a process of its own, as an operator runs it."""
    program = (
        "import typer\n"
        "from opsexec.cli_secrets import register\n"
        "app = typer.Typer()\n"
        "admin = typer.Typer()\n"
        "app.add_typer(admin, name='admin')\n"
        "register(admin)\n"
        "app()\n"
    )
    env = {
        **os.environ,
        "OPSEXEC_DATABASE_URL": dsn,
        "OPSEXEC_DATA_DIR": str(data_dir),
        "OPSEXEC_LOG_LEVEL": "WARNING",
    }
    env.pop("OPSEXEC_SECRET_KEY", None)
    if secret_key is not None:
        env["OPSEXEC_SECRET_KEY"] = secret_key
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        program,
        "admin",
        "rotate-secret-key",
        *args,
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_rotate_command_with_the_key_file(
    rotation_pool: asyncpg.Pool, rotation_dsn: str, tmp_path: Path
) -> None:
    settings = Settings(database_url=rotation_dsn, data_dir=tmp_path, secret_key=None)
    old = load_master_key(settings)
    stored = await two_tenants_with_secrets(rotation_pool, old, per_tenant=2)

    code, out, err = await run_rotate_command(rotation_dsn, tmp_path, "--batch-size", "3")
    assert code == 0, out + err
    new = load_master_key(settings)
    assert new.key_id != old.key_id
    assert f"re-encrypted {len(stored)} credentials" in out
    assert new.to_base64() not in out + err
    assert old.to_base64() not in out + err
    key_file = tmp_path / KEY_FILE_NAME
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert not (tmp_path / "secret.key.next").exists()
    backend = DatabaseSecretBackend(rotation_pool, new)
    for (tenant_id, name), value in stored.items():
        assert (await backend.resolve(tenant_id, name)).value == value


async def test_rotate_command_resumes_with_the_staged_key(
    rotation_pool: asyncpg.Pool, rotation_dsn: str, tmp_path: Path
) -> None:
    settings = Settings(database_url=rotation_dsn, data_dir=tmp_path, secret_key=None)
    old = load_master_key(settings)
    stored = await two_tenants_with_secrets(rotation_pool, old, per_tenant=2)
    # A run that staged its key and moved one batch, then died.
    staged = load_or_create_key_file(tmp_path / "secret.key.next")
    await rotate_master_key(rotation_pool, old, staged, batch_size=1)  # all, then "undo" one
    (tenant_id, name), value = next(iter(stored.items()))
    await store_secret(rotation_pool, old, tenant_id, name, value)

    code, out, err = await run_rotate_command(rotation_dsn, tmp_path)
    assert code == 0, out + err
    assert "resuming" in out
    assert "re-encrypted 1 credentials" in out
    assert load_master_key(settings).key_id == staged.key_id


async def test_rotate_command_with_environment_key_and_given_new_key(
    rotation_pool: asyncpg.Pool, rotation_dsn: str, tmp_path: Path
) -> None:
    old, new = MasterKey.generate(), MasterKey.generate()
    stored = await two_tenants_with_secrets(rotation_pool, old, per_tenant=2)
    new_file = tmp_path / "new.key"
    new_file.write_text(new.to_base64())
    new_file.chmod(0o600)

    code, out, err = await run_rotate_command(
        rotation_dsn, tmp_path, "--new-key-file", str(new_file), secret_key=old.to_base64()
    )
    assert code == 0, out + err
    assert "OPSEXEC_SECRET_KEY" in out
    assert str(new_file) in out
    assert new.to_base64() not in out + err
    assert not (tmp_path / KEY_FILE_NAME).exists()  # the environment owns the key
    backend = DatabaseSecretBackend(rotation_pool, new)
    for (tenant_id, name), value in stored.items():
        assert (await backend.resolve(tenant_id, name)).value == value


async def test_rotate_command_reports_a_bad_key_without_echo(
    rotation_dsn: str, tmp_path: Path
) -> None:
    code, out, err = await run_rotate_command(rotation_dsn, tmp_path, secret_key="bogus!!")
    assert code == 1
    assert "OPSEXEC_SECRET_KEY is not valid base64" in err
    assert "bogus" not in out + err
