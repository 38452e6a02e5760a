"""Settings, read once from ``OPSEXEC_*`` environment variables.

One place for every knob so the README's configuration table can be checked against it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("opsexec", appauthor=False))


class Settings(BaseSettings):
    """Runtime configuration. Unset ``database_url`` means: run the embedded PostgreSQL."""

    model_config = SettingsConfigDict(env_prefix="OPSEXEC_", extra="ignore")

    database_url: str | None = Field(
        default=None, description="PostgreSQL DSN; unset runs an embedded server in the data dir."
    )
    redis_url: str | None = Field(
        default=None, description="Optional Redis for event fan-out and cancel signals."
    )
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Embedded database, secret key file and admin key file live here.",
    )
    secret_key: SecretStr | None = Field(
        default=None, description="Base64 AES-256 key for credentials; else a 0600 key file."
    )
    log_format: Literal["json", "console"] = Field(default="json", description="Log line format.")
    log_level: str = Field(default="INFO", description="Root log level.")
    db_pool_min: int = Field(default=2, ge=1, description="Minimum pooled connections.")
    db_pool_max: int = Field(default=20, ge=1, description="Maximum pooled connections.")
    kill_switch: bool = Field(
        default=False, description="Refuse every new execution with 503 (R-ROLL)."
    )
    record_only: bool = Field(
        default=False, description="Record everything, run no action (all tenants)."
    )
    operator_tenant: str = Field(
        default="default",
        description="Admins of this tenant hold the service-wide controls: the runtime "
        "kill switch and worker drain.",
    )
    worker_heartbeat_s: float = Field(
        default=10.0,
        gt=0,
        description="Workers refresh their heartbeat row this often; /readyz calls a worker "
        "stale after three intervals without one.",
    )
    reaper_interval_s: float = Field(default=60.0, gt=0, description="Reaper period.")
    queue_backoff_unit_s: float = Field(
        default=1.0, gt=0, description="Queue retry backoff is 2^attempt times this."
    )
    shutdown_grace_s: float = Field(
        default=30.0, ge=0, description="How long running steps may finish on SIGTERM."
    )
    event_poll_interval_s: float = Field(
        default=2.0,
        gt=0,
        description="Live streams re-check watched executions this often: a lost "
        "announcement delays an event by at most this long.",
    )
    stream_heartbeat_s: float = Field(
        default=15.0,
        gt=0,
        description="Idle SSE and WebSocket streams send a heartbeat this often.",
    )

    @property
    def uses_embedded_database(self) -> bool:
        return self.database_url is None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests call ``get_settings.cache_clear()`` after changing env."""
    return Settings()
