"""Secrets (SPEC R-SEC): the master key, credential encryption, and the backends that turn
``{"$secret": "name"}`` references into values just before a step runs.

Plans carry references, never values. A value exists in memory only between
:func:`resolve_references` (or :meth:`SecretScope.resolve`) and the end of the step, and
is registered with the masker for exactly that time, so it is scrubbed from output,
errors, events and logs. Nothing here logs a value or puts one in an exception.

**Encryption.** Stored credentials are AES-256-GCM ciphertexts under one master key, from
``OPSEXEC_SECRET_KEY`` (base64 of 32 bytes) or else a ``secret.key`` file in the data
directory, created 0600 on first use. Every row records the ``key_id`` (a short digest of
the key) that encrypted it, so a wrong or rotated key is diagnosed as such instead of as
corruption. The associated data binds a ciphertext to its tenant, name and kind: a row
edited in place, or copied into another tenant or under another name, fails to decrypt.

**Backends.** :class:`SecretBackend` is the whole interface: ``resolve(tenant_id, name)``
→ :class:`ResolvedSecret`. Built in:

* :class:`DatabaseSecretBackend` — the ``credentials`` table (the default);
* :class:`EnvSecretBackend` — ``{"$secret": "env:NAME"}`` reads ``OPSEXEC_SECRET_NAME``;
* :class:`ChainedSecretBackend` — routes ``scheme:rest`` references to the backend
  registered for ``scheme`` and everything else to the default.

**Plugging in Vault (or any other store).** Nothing Vault-specific ships, on purpose: a
pretend implementation would be worse than none. To add one, write a class with
``async def resolve(self, tenant_id: UUID, name: str) -> ResolvedSecret`` that scopes the
lookup to the tenant (for instance a path ``opsexec/<tenant_id>/<name>``), raises
:class:`~opsexec.errors.SecretNotFoundError` for an unknown name (naming the reference,
never a value), and returns ``ResolvedSecret(name=f"vault:{name}", value=..., kind=...)``.
Register it under its scheme, and plans may say ``{"$secret": "vault:db/prod"}``::

    backend = default_secret_backend(pool, master_key, schemes={"vault": VaultBackend(...)})

The router hands a scheme backend the part after ``scheme:``. Stored credential names may
not begin with a reserved scheme (:data:`RESERVED_SCHEMES`), so a name can never be
shadowed by, or shadow, another backend.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import secrets as random_source
import stat
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, Protocol, get_args, runtime_checkable
from uuid import UUID

import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from opsexec.config import Settings
from opsexec.errors import (
    OpsexecError,
    SecretDecryptionError,
    SecretKeyError,
    SecretNotFoundError,
    SecretUnusableError,
    ValidationError,
)
from opsexec.plan import SECRET_REF_KEY, SecretRef, json_pointer
from opsexec.safety.masking import MIN_SECRET_LENGTH, masker
from opsexec.store import Connection, transaction
from opsexec.store import secrets as store

__all__ = [
    "CREDENTIAL_KINDS",
    "ENV_SCHEME",
    "KEY_BYTES",
    "KEY_FILE_NAME",
    "NONCE_BYTES",
    "RESERVED_SCHEMES",
    "ChainedSecretBackend",
    "CredentialKind",
    "DatabaseSecretBackend",
    "EncryptedSecret",
    "EnvSecretBackend",
    "MasterKey",
    "ResolvedSecret",
    "SecretBackend",
    "SecretScope",
    "default_secret_backend",
    "key_file_path",
    "load_master_key",
    "load_or_create_key_file",
    "read_key_file",
    "redaction_forms",
    "resolve_references",
    "resolved_secrets",
    "rotate_master_key",
    "save_credential",
    "secret_reference_names",
    "secret_scope",
    "write_key_file",
]

logger = logging.getLogger(__name__)

CredentialKind = Literal["password", "ssh_key", "token", "generic"]
CREDENTIAL_KINDS: Final[tuple[str, ...]] = get_args(CredentialKind)

KEY_BYTES: Final = 32  # AES-256
NONCE_BYTES: Final = 12  # the GCM standard nonce; random per encryption
KEY_FILE_NAME: Final = "secret.key"

ENV_SCHEME: Final = "env"
RESERVED_SCHEMES: Final = frozenset({ENV_SCHEME, "vault"})
"""Reference schemes that belong to backends; stored credential names may not use them."""

_AAD_PREFIX: Final = "opsexec:credential:v1"
_KEY_TEXT: Final = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
_KEY_HINT: Final = (
    "generate one with: python -c 'import base64, os; "
    "print(base64.b64encode(os.urandom(32)).decode())'"
)


# --- the master key ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EncryptedSecret:
    """One encryption's output, as the ``credentials`` row stores it."""

    nonce: bytes
    ciphertext: bytes
    key_id: str

    def __repr__(self) -> str:
        return f"EncryptedSecret(key_id={self.key_id!r}, {len(self.ciphertext)} bytes)"


def _associated_data(tenant_id: UUID, name: str, kind: str) -> bytes:
    # Unambiguous even if a name contained "|": the tenant id and the kind around it
    # never do. The version prefix leaves room for a different binding later.
    return f"{_AAD_PREFIX}|{tenant_id}|{name}|{kind}".encode()


class MasterKey:
    """The AES-256-GCM key that encrypts stored credentials.

    ``key_id`` (16 hex digits of the key's SHA-256) is safe to show and store: it says
    *which* key encrypted a row without revealing anything usable about the key. The key
    itself never appears in ``repr``, so logging a key object by mistake leaks nothing.
    """

    __slots__ = ("_aead", "_key", "key_id")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise SecretKeyError(f"a master key is {KEY_BYTES} bytes, not {len(key)}")
        self._key = bytes(key)
        self._aead = AESGCM(self._key)
        self.key_id: str = hashlib.sha256(self._key).hexdigest()[:16]

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(AESGCM.generate_key(bit_length=KEY_BYTES * 8))

    @classmethod
    def from_base64(cls, text: str, *, source: str) -> MasterKey:
        """Parse standard or URL-safe base64; ``source`` names where it came from in errors.

        The error never quotes the text: a malformed key is usually a real key mangled by
        quoting or truncation, and still mostly secret.
        """
        compact = "".join(text.split())
        if not compact:
            raise SecretKeyError(f"{source} is empty; {_KEY_HINT}")
        if _KEY_TEXT.fullmatch(compact) is None:
            raise SecretKeyError(f"{source} is not valid base64; {_KEY_HINT}")
        padded = compact + "=" * (-len(compact) % 4)
        try:
            if "-" in padded or "_" in padded:
                raw = base64.urlsafe_b64decode(padded)
            else:
                raw = base64.b64decode(padded, validate=True)
        except (binascii.Error, ValueError):
            raise SecretKeyError(f"{source} is not valid base64; {_KEY_HINT}") from None
        if len(raw) != KEY_BYTES:
            raise SecretKeyError(
                f"{source} must be the base64 encoding of {KEY_BYTES} random bytes, "
                f"not {len(raw)} bytes; {_KEY_HINT}"
            )
        return cls(raw)

    def to_base64(self) -> str:
        """The key as ``OPSEXEC_SECRET_KEY`` expects it (only for writing a key file)."""
        return base64.b64encode(self._key).decode("ascii")

    def encrypt(self, plaintext: str, *, tenant_id: UUID, name: str, kind: str) -> EncryptedSecret:
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = self._aead.encrypt(
            nonce, plaintext.encode("utf-8"), _associated_data(tenant_id, name, kind)
        )
        return EncryptedSecret(nonce=nonce, ciphertext=ciphertext, key_id=self.key_id)

    def decrypt(self, encrypted: EncryptedSecret, *, tenant_id: UUID, name: str, kind: str) -> str:
        """The plaintext, or :class:`SecretDecryptionError` naming the credential."""
        if encrypted.key_id != self.key_id:
            raise SecretDecryptionError(
                f"credential {name!r} is encrypted under key {encrypted.key_id}, but the "
                f"current master key is {self.key_id}: was OPSEXEC_SECRET_KEY or the key "
                "file replaced without `opsexec admin rotate-secret-key`?",
                extra={"credential": name, "key_id": encrypted.key_id},
            )
        try:
            if len(encrypted.nonce) != NONCE_BYTES:
                raise InvalidTag
            plaintext = self._aead.decrypt(
                encrypted.nonce, encrypted.ciphertext, _associated_data(tenant_id, name, kind)
            )
            return plaintext.decode("utf-8")
        except (InvalidTag, UnicodeDecodeError):
            raise SecretDecryptionError(
                f"credential {name!r} failed authentication: its stored ciphertext was "
                "altered, or the row was copied from another tenant, name or kind",
                extra={"credential": name},
            ) from None

    def __repr__(self) -> str:
        return f"MasterKey(key_id={self.key_id!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MasterKey):
            return NotImplemented
        return random_source.compare_digest(self._key, other._key)

    def __hash__(self) -> int:
        return hash(self.key_id)

    def __reduce__(self) -> Any:
        # Pickling would copy the key into whatever stores the pickle (a cache, a queue).
        raise TypeError("a MasterKey cannot be pickled")


def key_file_path(settings: Settings) -> Path:
    return settings.data_dir / KEY_FILE_NAME


def load_master_key(settings: Settings) -> MasterKey:
    """The master key: ``OPSEXEC_SECRET_KEY`` when set, else ``<data_dir>/secret.key``.

    The key file is created (mode 0600) on first use and reused afterwards, so a
    single-host install needs no setup. A set-but-empty ``OPSEXEC_SECRET_KEY`` is an
    error rather than "unset": silently falling back to a key file would encrypt new
    rows under a key the operator does not know they are using.
    """
    if settings.secret_key is not None:
        return MasterKey.from_base64(
            settings.secret_key.get_secret_value(), source="OPSEXEC_SECRET_KEY"
        )
    return load_or_create_key_file(key_file_path(settings))


def read_key_file(path: Path) -> MasterKey:
    """Read a key file; warn when group or others may read it (the key is then exposed)."""
    try:
        info = path.stat()
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretKeyError(f"cannot read key file {path}: {type(exc).__name__}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "secret key file %s is accessible to group or others (mode %o); run chmod 600",
            path,
            stat.S_IMODE(info.st_mode),
        )
    return MasterKey.from_base64(text, source=f"key file {path}")


def write_key_file(path: Path, key: MasterKey, *, replace: bool = False) -> bool:
    """Publish ``key`` at ``path`` with mode 0600, atomically; False if it already existed.

    The key is written and fsynced under a temporary name first, then linked into place
    (exclusive: fails if ``path`` exists) or renamed over it (``replace=True``). So a
    reader never sees a half-written key, and two processes creating the file at once
    agree on one key: the loser gets False and reads the winner's.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    content = (key.to_base64() + "\n").encode("ascii")
    temporary = path.with_name(f".{path.name}.{random_source.token_hex(8)}.tmp")
    _write_exclusive(temporary, content)
    try:
        if replace:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)
            except FileExistsError:
                return False
            except OSError:
                # No hard links on this filesystem (some network and FUSE mounts): create
                # the file exclusively in place; a racing reader may then see it empty
                # for a moment, and fails loudly rather than using a wrong key.
                try:
                    _write_exclusive(path, content)
                except FileExistsError:
                    return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    _fsync_directory(path.parent)
    return True


def _write_exclusive(path: Path, content: bytes) -> None:
    """Create ``path`` (never overwriting), mode 0600 whatever the umask, and fsync it."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, content)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_directory(directory: Path) -> None:
    """Make the new directory entry durable, so a crash cannot lose a key in use."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the data itself is synced
    finally:
        os.close(descriptor)


def load_or_create_key_file(path: Path) -> MasterKey:
    """The key in ``path``, generating and publishing a new one if there is none yet."""
    try:
        return read_key_file(path)
    except FileNotFoundError:
        pass
    key = MasterKey.generate()
    if write_key_file(path, key):
        logger.info("created secret key file %s (key id %s)", path, key.key_id)
        return key
    return read_key_file(path)  # another process created it first: use theirs


# --- resolved values and backends -------------------------------------------------------------


@dataclass(frozen=True, slots=True, repr=False)
class ResolvedSecret:
    """A secret's value with what an action needs to use it (kind, username).

    ``repr``/``str`` never show the value, so a stray ``logger.debug(secret)`` or an
    exception carrying one stays harmless. Values too short to be redacted are refused
    here, once, for every backend.
    """

    name: str
    value: str
    kind: CredentialKind = "generic"
    username: str | None = None

    def __post_init__(self) -> None:
        if len(self.value) < MIN_SECRET_LENGTH:
            raise SecretUnusableError(
                f"secret {self.name!r} is shorter than {MIN_SECRET_LENGTH} characters and "
                "could not be redacted from output; store a longer value",
                extra={"reference": self.name},
            )

    def __repr__(self) -> str:
        return (
            f"ResolvedSecret(name={self.name!r}, kind={self.kind!r}, "
            f"username={self.username!r}, value=<redacted>)"
        )

    __str__ = __repr__


@runtime_checkable
class SecretBackend(Protocol):
    """Where secret values come from. The one method is the whole contract.

    ``resolve`` returns the value behind ``name`` for ``tenant_id`` and must never return
    another tenant's secret. An unknown name raises
    :class:`~opsexec.errors.SecretNotFoundError` whose detail names the reference and
    never a value. Implementations are called just in time, once per step (results are not
    cached across steps), so a changed or deleted secret takes effect on the next step.
    """

    async def resolve(self, tenant_id: UUID, name: str) -> ResolvedSecret: ...


def _not_found(reference: str, detail: str = "") -> SecretNotFoundError:
    return SecretNotFoundError(
        f"secret {reference!r} not found{detail}", extra={"reference": reference}
    )


class DatabaseSecretBackend:
    """The ``credentials`` table, decrypted with the master key (the default backend)."""

    def __init__(self, pool: asyncpg.Pool, master_key: MasterKey) -> None:
        self._pool = pool
        self._master_key = master_key

    @property
    def key_id(self) -> str:
        return self._master_key.key_id

    async def resolve(self, tenant_id: UUID, name: str) -> ResolvedSecret:
        async with self._pool.acquire() as connection:
            row = await store.get_credential(connection, tenant_id, name)
        if row is None:
            raise _not_found(name)
        try:
            value = self._master_key.decrypt(
                EncryptedSecret(row["nonce"], row["ciphertext"], row["key_id"]),
                tenant_id=tenant_id,
                name=name,
                kind=row["kind"],
            )
        except SecretDecryptionError as exc:
            logger.error(
                "credential cannot be decrypted: %s",
                exc.detail,
                extra={"tenant_id": str(tenant_id), "credential": name},
            )
            raise
        return ResolvedSecret(name=name, value=value, kind=row["kind"], username=row["username"])

    def __repr__(self) -> str:
        return f"DatabaseSecretBackend(key_id={self.key_id!r})"


_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_SETTINGS_VARIABLES: Final = frozenset(
    f"OPSEXEC_{field}".upper() for field in Settings.model_fields
)


class EnvSecretBackend:
    """``env:NAME`` → the environment variable ``<prefix>NAME`` (``OPSEXEC_SECRET_NAME``).

    The prefix confines plans to variables an operator exported for them: a plan cannot
    read ``PATH`` or ``AWS_SECRET_ACCESS_KEY`` of the server. opsexec's own settings are
    refused even where they match the prefix — ``env:KEY`` would otherwise name
    ``OPSEXEC_SECRET_KEY``, the master key. Environment variables belong to the process,
    not a tenant: every tenant served by this process can reference them, so use this
    backend for secrets that are deliberately shared, or leave it out of the router.
    """

    def __init__(
        self, prefix: str = "OPSEXEC_SECRET_", environ: Mapping[str, str] | None = None
    ) -> None:
        self._prefix = prefix
        self._environ = environ

    async def resolve(self, tenant_id: UUID, name: str) -> ResolvedSecret:
        bare = name.removeprefix(f"{ENV_SCHEME}:")
        reference = f"{ENV_SCHEME}:{bare}"
        if _ENV_NAME.fullmatch(bare) is None:
            raise _not_found(reference, ": not a valid environment variable name")
        variable = self._prefix + bare
        environ = os.environ if self._environ is None else self._environ
        if variable.upper() in _SETTINGS_VARIABLES:
            raise _not_found(reference, f": {variable} is an opsexec setting, not a secret")
        value = environ.get(variable)
        if value is None:
            raise _not_found(reference, f": environment variable {variable} is not set")
        return ResolvedSecret(name=reference, value=value, kind="generic")

    def __repr__(self) -> str:
        return f"EnvSecretBackend(prefix={self._prefix!r})"


class ChainedSecretBackend:
    """Routes each reference to a backend by its scheme; this is the engine's backend.

    ``scheme:rest`` goes to ``schemes[scheme]``, which receives ``rest``; a name with no
    colon, or whose prefix is not a registered scheme (``db:prod``), goes to ``default``.
    The registry is per instance (not module state) so tests and tenants of a future
    multi-backend setup can differ.
    """

    def __init__(
        self, default: SecretBackend, schemes: Mapping[str, SecretBackend] | None = None
    ) -> None:
        self._default = default
        self._schemes: dict[str, SecretBackend] = dict(schemes or {})

    @property
    def schemes(self) -> frozenset[str]:
        return frozenset(self._schemes)

    async def resolve(self, tenant_id: UUID, name: str) -> ResolvedSecret:
        scheme, colon, rest = name.partition(":")
        backend = self._schemes.get(scheme) if colon else None
        if backend is None:
            return await self._default.resolve(tenant_id, name)
        resolved = await backend.resolve(tenant_id, rest)
        if resolved.name != name:
            resolved = dataclasses.replace(resolved, name=name)
        return resolved

    def __repr__(self) -> str:
        return f"ChainedSecretBackend(default={self._default!r}, schemes={sorted(self._schemes)})"


def default_secret_backend(
    pool: asyncpg.Pool,
    master_key: MasterKey,
    *,
    env_prefix: str | None = "OPSEXEC_SECRET_",
    schemes: Mapping[str, SecretBackend] | None = None,
) -> ChainedSecretBackend:
    """The database for plain names, ``env:`` for environment variables, plus ``schemes``.

    ``env_prefix=None`` leaves the environment backend out (multi-tenant deployments that
    must not share process-wide secrets across tenants).
    """
    routes: dict[str, SecretBackend] = {}
    if env_prefix is not None:
        routes[ENV_SCHEME] = EnvSecretBackend(env_prefix)
    routes.update(schemes or {})
    return ChainedSecretBackend(DatabaseSecretBackend(pool, master_key), routes)


# --- references in step inputs ---------------------------------------------------------------


def _reference_name(node: Any, pointer: str) -> str | None:
    """The name ``node`` references, None if it is no reference, 422 if it is malformed."""
    if isinstance(node, SecretRef):
        return node.name
    if isinstance(node, Mapping) and SECRET_REF_KEY in node:
        name = node[SECRET_REF_KEY]
        if len(node) != 1 or not isinstance(name, str) or not name:
            raise ValidationError(
                'a secret reference is exactly {"$secret": "<name>"}', pointer=pointer
            )
        return name
    return None


def _walk_references(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[str, str]]:
    """Every ``(name, pointer)`` in a JSON-like structure, in document order."""
    name = _reference_name(value, json_pointer(*path))
    if name is not None:
        yield name, json_pointer(*path)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _walk_references(item, (*path, str(key)))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _walk_references(item, (*path, index))


def secret_reference_names(value: Any) -> list[str]:
    """The distinct secret names referenced anywhere in ``value``, first occurrence first."""
    return list(dict.fromkeys(name for name, _ in _walk_references(value)))


def _substitute(value: Any, values: Mapping[str, str]) -> Any:
    name = _reference_name(value, "")
    if name is not None:
        return values[name]
    if isinstance(value, Mapping):
        return {key: _substitute(item, values) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute(item, values) for item in value]
    if isinstance(value, tuple):
        return tuple(_substitute(item, values) for item in value)
    return value


async def resolve_references(
    value: Any, backend: SecretBackend, tenant_id: UUID
) -> tuple[Any, list[str]]:
    """``value`` with every ``{"$secret": name}`` replaced, and the distinct values used.

    ``value`` is JSON-like (dicts, lists, tuples, scalars; :class:`SecretRef` objects
    count as references) and is not modified. Each name is resolved once however often it
    appears. The caller must register the returned values for redaction for as long as
    the resolved structure lives — :func:`resolved_secrets` does both. A failed lookup
    raises with ``pointer`` set to where the reference sits; nothing is returned then.
    """
    first_pointer: dict[str, str] = {}
    for name, pointer in _walk_references(value):
        first_pointer.setdefault(name, pointer)
    values: dict[str, str] = {}
    for name, pointer in first_pointer.items():
        try:
            values[name] = (await backend.resolve(tenant_id, name)).value
        except OpsexecError as exc:
            if exc.pointer is None:
                exc.pointer = pointer
            raise
    if not values:
        return value, []
    return _substitute(value, values), list(dict.fromkeys(values.values()))


def redaction_forms(values: list[str]) -> list[str]:
    """What to register with the masker for ``values``: each value, and for multi-line
    values (SSH keys, certificates) each long line too, so output that re-wraps or echoes
    part of a key is still scrubbed."""
    forms: dict[str, None] = {}
    for value in values:
        forms[value] = None
        if "\n" in value:
            for line in value.splitlines():
                if len(line.strip()) >= 16:
                    forms[line.strip()] = None
    return list(forms)


@asynccontextmanager
async def resolved_secrets(
    value: Any, backend: SecretBackend, tenant_id: UUID
) -> AsyncIterator[Any]:
    """Resolve every reference in ``value`` and keep the values redacted while inside.

    ``async with resolved_secrets(inputs, backend, tenant_id) as resolved: ...`` yields
    the substituted structure; the values are registered with the process-wide masker
    before it is handed out and unregistered on the way out, also on error or cancel.
    """
    resolved, values = await resolve_references(value, backend, tenant_id)
    with masker.registered(*redaction_forms(values)):
        yield resolved


class SecretScope:
    """Just-in-time resolution for one step (what ``ActionContext.resolve_secret`` needs).

    Each name is fetched on first use, registered for redaction at once, and cached for
    the rest of the step; :meth:`close` unregisters everything and forgets the values.
    """

    def __init__(self, backend: SecretBackend, tenant_id: UUID) -> None:
        self._backend = backend
        self._tenant_id = tenant_id
        self._resolved: dict[str, ResolvedSecret] = {}
        self._registered: list[str] = []

    async def resolve(self, name: str) -> ResolvedSecret:
        resolved = self._resolved.get(name)
        if resolved is None:
            resolved = await self._backend.resolve(self._tenant_id, name)
            for form in redaction_forms([resolved.value]):
                if masker.register(form):
                    self._registered.append(form)
            self._resolved[name] = resolved
        return resolved

    async def value(self, name: str) -> str:
        return (await self.resolve(name)).value

    def close(self) -> None:
        registered, self._registered = self._registered, []
        self._resolved.clear()
        for form in registered:
            masker.unregister(form)


@asynccontextmanager
async def secret_scope(backend: SecretBackend, tenant_id: UUID) -> AsyncIterator[SecretScope]:
    """A :class:`SecretScope` closed on the way out, also on error or cancel."""
    scope = SecretScope(backend, tenant_id)
    try:
        yield scope
    finally:
        scope.close()


# --- writing and rotating ---------------------------------------------------------------------


async def save_credential(
    connection: Connection,
    master_key: MasterKey,
    tenant_id: UUID,
    *,
    name: str,
    kind: CredentialKind,
    value: str,
    username: str | None = None,
) -> tuple[asyncpg.Record, bool]:
    """Encrypt and store (create or replace); returns the metadata row and whether created."""
    encrypted = master_key.encrypt(value, tenant_id=tenant_id, name=name, kind=kind)
    return await store.upsert_credential(
        connection,
        tenant_id,
        name=name,
        kind=kind,
        username=username,
        nonce=encrypted.nonce,
        ciphertext=encrypted.ciphertext,
        key_id=encrypted.key_id,
    )


async def rotate_master_key(
    pool: asyncpg.Pool, old: MasterKey, new: MasterKey, *, batch_size: int = 100
) -> int:
    """Re-encrypt every credential of every tenant from ``old`` to ``new``; how many moved.

    Rows already under ``new`` are skipped, so an interrupted rotation is finished by
    running it again with the same two keys. Each batch commits on its own (locked rows,
    one transaction), so a failure loses at most one batch's work and never leaves a row
    half-written. Rows under a third key make it refuse before changing anything: they
    could never be decrypted again once ``old`` is discarded. Rows written under ``old``
    while this runs are picked up too, as it loops until none are left.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    if old.key_id == new.key_id:
        return 0
    async with pool.acquire() as connection:
        counts = await store.count_credentials_by_key(connection)
    foreign = {key_id: n for key_id, n in counts.items() if key_id not in {old.key_id, new.key_id}}
    if foreign:
        raise SecretKeyError(
            f"{sum(foreign.values())} credentials are encrypted under key(s) "
            f"{', '.join(sorted(foreign))}, which are neither the current key {old.key_id} "
            f"nor the new key {new.key_id}; nothing was re-encrypted",
            extra={"key_ids": sorted(foreign)},
        )
    rotated = 0
    while True:
        async with transaction(pool) as connection:
            rows = await store.lock_credentials_not_under_key(connection, new.key_id, batch_size)
            if not rows:
                break
            updates: list[store.ReEncryptedRow] = []
            for row in rows:
                tenant_id, name, kind = row["tenant_id"], row["name"], row["kind"]
                plaintext = old.decrypt(
                    EncryptedSecret(row["nonce"], row["ciphertext"], row["key_id"]),
                    tenant_id=tenant_id,
                    name=name,
                    kind=kind,
                )
                encrypted = new.encrypt(plaintext, tenant_id=tenant_id, name=name, kind=kind)
                updates.append((row["id"], encrypted.nonce, encrypted.ciphertext, new.key_id))
            await store.update_credential_encryption(connection, updates)
        rotated += len(updates)
        logger.info("re-encrypted %d credentials under key %s so far", rotated, new.key_id)
    return rotated
