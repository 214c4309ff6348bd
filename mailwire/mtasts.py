"""MTA-STS (RFC 8461) as published: the policy file a node serves at
https://mta-sts.<domain>/.well-known/mta-sts.txt and the id of the `_mta-sts` TXT record the operator
lists in status.dnsRecords. One function for both, so the record's id changes exactly when the file does."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def policy(*, mode: str, mx: Sequence[str], max_age: int) -> str:
    """The policy file (RFC 8461 §3.2: "key: value" lines ending in CRLF, one `mx` line per host)."""
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {host}" for host in mx), f"max_age: {max_age}"]
    return "".join(line + "\r\n" for line in lines)


def policy_id(text: str) -> str:
    """RFC 8461 §3.1: `id` is 1 to 32 letters and digits that change whenever the policy does."""
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def txt_record(text: str) -> str:
    """The value of the `_mta-sts.<domain>` TXT record (RFC 8461 §3.1)."""
    return f"v=STSv1; id={policy_id(text)}"
