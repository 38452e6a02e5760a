"""``opsexec admin rotate-secret-key``: re-encrypt every stored credential under a new key.

Kept out of ``cli.py`` so the secrets work can land on its own; ``cli.py`` calls
:func:`register` with its ``admin`` sub-app.

The order of operations is what makes the command safe to interrupt: the new key is
written to disk (``secret.key.next``, mode 0600) *before* any row is re-encrypted, and
the current key is replaced only after every row moved. A crash at any point leaves each
row under a key that still exists on disk, and running the command again resumes with
the staged key (rows already under it are skipped).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from opsexec.config import Settings, get_settings
from opsexec.errors import OpsexecError
from opsexec.observability.logging import configure_logging
from opsexec.safety.secrets import (
    MasterKey,
    key_file_path,
    load_master_key,
    load_or_create_key_file,
    read_key_file,
    rotate_master_key,
    write_key_file,
)

__all__ = ["STAGED_KEY_FILE_NAME", "register", "rotate_secret_key"]

STAGED_KEY_FILE_NAME = "secret.key.next"
"""Where a generated new key waits, in the data dir, until every row is under it."""


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


def _new_key(
    settings: Settings, current: MasterKey, new_key_file: Path | None
) -> tuple[MasterKey, Path]:
    """The key to rotate to and the file holding it (given, or generated and staged)."""
    if new_key_file is not None:
        return read_key_file(new_key_file), new_key_file
    staged = settings.data_dir / STAGED_KEY_FILE_NAME
    resuming = staged.exists()
    key = load_or_create_key_file(staged)
    if resuming and key.key_id == current.key_id:
        # Left over from a finished rotation whose operator copied it into
        # OPSEXEC_SECRET_KEY but kept the file: it is the current key, not a new one.
        staged.unlink()
        resuming = False
        key = load_or_create_key_file(staged)
    if resuming:
        typer.echo(f"resuming with the new key staged in {staged} (key id {key.key_id})")
    else:
        typer.echo(f"generated a new key in {staged} (key id {key.key_id})")
    return key, staged


async def _rotate(settings: Settings, old: MasterKey, new: MasterKey, batch_size: int) -> int:
    from opsexec.store.database import open_database

    database = await open_database(settings)
    try:
        return await rotate_master_key(database.pool, old, new, batch_size=batch_size)
    finally:
        await database.close()


def rotate_secret_key(
    new_key_file: Annotated[
        Path | None,
        typer.Option(
            "--new-key-file",
            exists=True,
            dir_okay=False,
            readable=True,
            help="Rotate to the base64 key in this file instead of generating one.",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, max=10_000, help="Rows re-encrypted per transaction.")
    ] = 100,
) -> None:
    """Re-encrypt every stored credential under a new master key (resumable).

    Then restart every opsexec server and worker: they keep the old key in memory, and
    credentials they resolve before restarting fail with secret_undecryptable.
    """
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    try:
        old = load_master_key(settings)
        new, new_key_path = _new_key(settings, old, new_key_file)
    except OpsexecError as exc:
        _fail(exc.detail)
    if new.key_id == old.key_id:
        typer.echo(f"key {old.key_id} is already the current key; nothing to re-encrypt")
        return
    typer.echo(f"re-encrypting credentials from key {old.key_id} to key {new.key_id}")
    try:
        rotated = asyncio.run(_rotate(settings, old, new, batch_size))
    except OpsexecError as exc:
        _fail(exc.detail)
    typer.echo(f"re-encrypted {rotated} credentials; every credential is under key {new.key_id}")

    if settings.secret_key is None:
        key_path = key_file_path(settings)
        if new_key_file is None:
            os.replace(new_key_path, key_path)  # atomic; the staged file is already 0600
        else:
            write_key_file(key_path, new, replace=True)
        typer.echo(
            f"{key_path} now holds key {new.key_id}. Restart every opsexec server and worker "
            "that uses this data directory, and replace copies of the key file elsewhere."
        )
    else:
        typer.echo(
            f"OPSEXEC_SECRET_KEY still holds the old key {old.key_id}. Set it to the "
            f"contents of {new_key_path} on every server and worker, e.g.\n"
            f'  OPSEXEC_SECRET_KEY="$(cat {new_key_path})"\n'
            f"restart them, then delete {new_key_path}."
        )


def register(admin_app: typer.Typer) -> None:
    """Add ``rotate-secret-key`` to the ``opsexec admin`` command group."""
    admin_app.command("rotate-secret-key")(rotate_secret_key)
