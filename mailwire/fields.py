"""Field types shared by the wire models: sizes ("25MiB"), mail addresses, domain names and timestamps,
with the validation both sides of the contract rely on. Used by mailwire.config, .directory and .admin.
"""

from __future__ import annotations

import datetime
import decimal
import re
from typing import Annotated

import pydantic

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> int:
    """Bytes from an int or a size such as "25MiB", "1Gi" (Kubernetes quantity) or "500M"."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string such as '25MiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            return int(decimal.Decimal(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    raise ValueError(f"{value!r} is not a size (examples: 1048576, '25MiB', '1Gi', '500M')")


ByteSize = Annotated[int, pydantic.BeforeValidator(parse_size)]

_ADDRESS_RE = re.compile(r"^[^@\s<>]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
_DOMAIN_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$")


def normalize_address(address: str) -> str:
    """Addresses compare case-insensitively, as Postfix and Dovecot do by default."""
    return address.strip().lower()


def _address(value: str) -> str:
    value = normalize_address(value)
    if not _ADDRESS_RE.match(value):
        raise ValueError(f"{value!r} is not a mail address (local@domain)")
    return value


def _domain(value: str) -> str:
    value = value.strip().lower().rstrip(".")
    if not _DOMAIN_RE.match(value):
        raise ValueError(f"{value!r} is not a domain name")
    return value


Address = Annotated[str, pydantic.AfterValidator(_address)]
Domain = Annotated[str, pydantic.AfterValidator(_domain)]


def _timestamp(value: str) -> str:
    try:
        datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 time") from None
    return value


# A time as the node wrote it (`datetime.isoformat()`, RFC 3339), kept as text: the operator copies it
# verbatim into Kubernetes status (MailBackup status.pointInTime) and VolumeSnapshot annotations.
Timestamp = Annotated[str, pydantic.AfterValidator(_timestamp)]


class FileModel(pydantic.BaseModel):
    """A model of a file a person may write (node.yaml, directory.yaml): an unknown key is a mistake."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
