"""How a test reacts to a missing real service: skip with the reason, or fail in CI.

`.ci/run` sets ``OPSEXEC_REQUIRE_SERVICES=1`` so that a service CI forgot to start fails the
build instead of silently skipping the tests that needed it.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def services_required() -> bool:
    return os.environ.get("OPSEXEC_REQUIRE_SERVICES") == "1"


def missing_service(reason: str) -> NoReturn:
    """Skip (developer machine) or fail (CI) because a real service is unavailable."""
    if services_required():
        pytest.fail(f"required service unavailable: {reason}", pytrace=False)
    pytest.skip(reason)
