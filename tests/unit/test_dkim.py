"""DKIM: generated keys publish as a record that dkimpy verifies against, signatures verify, and a
message changed after signing does not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dkim as dkimpy
import pytest

from mailnode import dkim

MESSAGE = (
    b"From: Demo <demo@example.com>\r\nTo: friend@remote.test\r\nSubject: signed\r\n"
    b"Date: Mon, 2 Nov 2026 10:00:00 +0000\r\nMessage-ID: <s1@example.com>\r\n\r\nHello, signed world.\r\n"
)


@pytest.fixture(scope="module")
def key() -> bytes:
    return dkim.generate_key(1024)  # the smallest RFC 8301 allows: quick to make


def _dns(record: dkim.Record):
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return record.value.encode() if name.decode().rstrip(".") == record.name else None

    return lookup


def test_signature_verifies_with_the_published_record(key: bytes) -> None:
    record = dkim.record(key, domain="example.com", selector="mail")
    assert record.name == "mail._domainkey.example.com"
    assert record.value.startswith("v=DKIM1; k=rsa; p=")
    signature = dkim.sign(MESSAGE, domain="example.com", selector="mail", private_key=key)
    assert signature.startswith(b"DKIM-Signature: ") and signature.endswith(b"\r\n")
    assert b"a=rsa-sha256" in signature and b"c=relaxed/relaxed" in signature
    assert dkimpy.verify(signature + MESSAGE, dnsfunc=_dns(record))


def test_a_changed_message_fails(key: bytes) -> None:
    record = dkim.record(key, domain="example.com", selector="mail")
    signature = dkim.sign(MESSAGE, domain="example.com", selector="mail", private_key=key)
    assert not dkimpy.verify(signature + MESSAGE.replace(b"Hello", b"Goodbye"), dnsfunc=_dns(record))
    other = dkim.record(dkim.generate_key(1024), domain="example.com", selector="mail")
    assert not dkimpy.verify(signature + MESSAGE, dnsfunc=_dns(other))


def test_keygen_command_writes_a_private_key_and_prints_the_record(tmp_path: Path) -> None:
    out = tmp_path / "example.com.pem"
    result = subprocess.run(
        [sys.executable, "-m", "mailnode", "dkim-keygen", "--domain", "example.com", "--bits", "1024",
         "--out", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    record = dkim.record(out.read_bytes(), domain="example.com", selector="mail")
    assert f'{record.name}. IN TXT "{record.value}"' in result.stdout
    again = subprocess.run(
        [sys.executable, "-m", "mailnode", "dkim-keygen", "--domain", "example.com", "--out", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert again.returncode == 1
    assert "not overwriting" in again.stderr
    shown = subprocess.run(
        [sys.executable, "-m", "mailnode", "dkim-record", "--domain", "example.com", "--key", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0
    assert record.value in shown.stdout
