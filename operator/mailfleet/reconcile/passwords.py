"""Password values from Secrets, as the directory needs them: argon2id hashes.

A value that is already an argon2 hash (`mailnode hash-password`) is used as is. Plaintext is hashed
here, off the event loop, and the hash is remembered for as long as the plaintext stays the same, so
an unchanged password is not hashed again at every reconcile (and the directory does not change).
The memory is the operator's only; after a restart the hash the directory already holds is kept when it
verifies the plaintext.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from collections.abc import Callable

import argon2

from mailwire.directory import is_password_hash


class PasswordHasher:
    def __init__(
        self,
        hasher: argon2.PasswordHasher | None = None,
        *,
        concurrency: int = 2,
        on_hash: Callable[[], None] | None = None,
    ) -> None:
        self._hasher = hasher or argon2.PasswordHasher()
        self._on_hash = on_hash
        self._key = os.urandom(32)  # the cache is keyed by a keyed digest, never by the plaintext
        self._hashes: dict[bytes, str] = {}
        self._limit = asyncio.Semaphore(concurrency)

    def _digest(self, source: str, plaintext: str) -> bytes:
        return hmac.new(self._key, f"{source}\0{plaintext}".encode(), hashlib.sha256).digest()

    def known(self, value: str, *, source: str) -> str | None:
        """The hash of `value` when there is nothing to compute (it is a hash, or was hashed before)."""
        if is_password_hash(value):
            return value
        return self._hashes.get(self._digest(source, value))

    async def hash(self, value: str, *, source: str, candidate: str | None = None) -> str:
        """`candidate`: the hash the directory holds now for this password. When it verifies `value` it
        is kept, even over a remembered one (one verification costs what a hash does): the directory
        does not change after a restart, and two operators running for a moment (an upgrade) agree on
        the hash the first one wrote instead of overwriting each other's."""
        known = self.known(value, source=source)
        if candidate is not None and candidate != known and not is_password_hash(value):
            async with self._limit:
                if await asyncio.to_thread(self._verifies, candidate, value):
                    self._hashes[self._digest(source, value)] = candidate
                    return candidate
        if known is not None:
            return known
        return await self._hash(value, source=source)

    def _verifies(self, candidate: str, value: str) -> bool:
        try:
            return bool(self._hasher.verify(candidate, value))
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False

    async def _hash(self, value: str, *, source: str) -> str:
        """The hash of `value`, a password from `source` ("namespace/secret/key"): two Secrets holding the
        same plaintext get different salts, so the directory does not show that they are equal."""
        if is_password_hash(value):
            return value
        digest = self._digest(source, value)
        if (known := self._hashes.get(digest)) is not None:
            return known
        async with self._limit:
            hashed = await asyncio.to_thread(self._hasher.hash, value)
        if self._on_hash is not None:
            self._on_hash()
        self._hashes[digest] = hashed
        return hashed
