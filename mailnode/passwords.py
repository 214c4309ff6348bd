"""Password hashes: argon2id, as `mailnode hash-password` prints them and the directory stores them.

Hashing and verifying are CPU-bound and slow on purpose; callers on the event loop go through the
Gateway (mailnode.auth does).
"""

from __future__ import annotations

import functools

import argon2

_hasher = argon2.PasswordHasher()  # argon2id with the library's RFC 9106 "low memory" defaults


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the user does not exist, so unknown users cost as much as known ones."""
    return _hasher.hash("mailfleet-dummy-password")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify(password_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(password_hash or _dummy_hash(), password) and password_hash is not None
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False
