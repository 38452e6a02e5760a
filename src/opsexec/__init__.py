"""opsexec — the safe execution layer between automation plans and infrastructure."""

__version__ = "0.1.0"
