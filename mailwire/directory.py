"""The directory (directory.yaml, README "Directory"): the mailboxes of a node's domains with their
password hashes, aliases and app passwords.

The operator's mailfleet.specs.node builds it from Mailbox resources and writes it into a Secret (one
entry a line, fields at their defaults left out); mailnode.config parses it, resolves addresses and
reloads it when the file changes.
"""

from __future__ import annotations

from typing import Annotated

import pydantic

from mailwire.fields import Address, ByteSize, FileModel


def is_password_hash(value: str) -> bool:
    """An argon2 hash in the PHC string format (`$argon2id$v=19$...`), as `mailnode hash-password` prints.
    The directory never holds a plaintext password."""
    return value.startswith("$argon2")


def _password_hash(value: str) -> str:
    if not is_password_hash(value):
        raise ValueError("expected an argon2 hash such as `mailnode hash-password` prints ($argon2id$...)")
    return value


PasswordHash = Annotated[str, pydantic.AfterValidator(_password_hash)]


class AppPasswordEntry(FileModel):
    name: str
    password_hash: PasswordHash


class MailboxEntry(FileModel):
    # Field order is the order of the keys in the operator's Secret, one entry a line.
    address: Address
    password_hash: PasswordHash
    display_name: str = ""
    quota: ByteSize = pydantic.Field(0, description="bytes; 0 means no limit")
    aliases: list[Address] = []
    forward_to: list[Address] = []
    suspended: bool = False
    app_passwords: list[AppPasswordEntry] = []
    # The ordinal of the node that stores this mailbox (DESIGN.md "Clustering"), chosen by the operator
    # by rendezvous hashing; every other node hands its mail over LMTP and proxies its IMAP sessions there.
    home: int = pydantic.Field(0, ge=0)


class DirectoryFile(FileModel):
    mailboxes: list[MailboxEntry] = []
