"""API key generation and verification.

Keys are 256 random bits, shown once and stored only as a SHA-256 digest. A slow hash
(bcrypt, argon2) exists to stretch guessable passwords; a uniformly random 256-bit key
cannot be guessed, so a fast digest is both safe and lets every request authenticate
with one indexed lookup.
"""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "opx_"


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def display_prefix(api_key: str) -> str:
    """The part of a key safe to show in listings, so an operator can tell keys apart."""
    return api_key[: len(KEY_PREFIX) + 6]
