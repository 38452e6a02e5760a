"""Secret masking (R-MASK). The masking helper expands this module; the key predicate is shared."""

from __future__ import annotations

import re

REDACTED = "***REDACTED***"

SECRET_KEY_PATTERN = re.compile(
    r"password|passwd|token|api[_-]?key|secret|credential|private[_-]?key|access[_-]?key"
    r"|auth(?:orization)?|bearer|session",
    re.IGNORECASE,
)


def is_secret_key(name: str) -> bool:
    """True when a mapping key names a secret (``db_password``, ``X-Api-Key``, ``token``…)."""
    return SECRET_KEY_PATTERN.search(name) is not None
