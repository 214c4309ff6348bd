"""DKIM (RFC 6376) for the node's domains: key generation, the DNS record to publish, and signing.

`mailnode dkim-keygen` makes a domain's key and prints its record; the node config names each
domain's key (`domains[].dkim`), `/status` shows the records, and outbound delivery (the queue) signs
with `sign`. dkimpy does the canonicalisation and signing; `cryptography` makes the keys.
"""

from __future__ import annotations

import base64
import dataclasses

import dkim as dkimpy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

# RFC 6376 §5.4.1 and RFC 8301: sign these (and From, which dkimpy always includes) when present.
SIGNED_HEADERS = (
    b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to", b"in-reply-to", b"references",
    b"mime-version", b"content-type", b"content-transfer-encoding",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Record:
    """A DNS TXT record to publish: `name` (e.g. mail._domainkey.example.com) and its `value`."""

    name: str
    value: str


def generate_key(bits: int = 2048) -> bytes:
    """A new RSA private key, PKCS#1 PEM (RFC 8301: at least 1024 bits; 2048 is today's advice)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def record(private_key: bytes, *, domain: str, selector: str) -> Record:
    """The TXT record that publishes the public half of `private_key` (RFC 6376 §3.6.1)."""
    key = serialization.load_pem_private_key(private_key, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("a DKIM key must be an RSA key")
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return Record(f"{selector}._domainkey.{domain}", f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}")


def sign(message: bytes, *, domain: str, selector: str, private_key: bytes) -> bytes:
    """The DKIM-Signature header (CRLF-terminated) to put in front of `message`: relaxed/relaxed,
    rsa-sha256, over the SIGNED_HEADERS the message has."""
    present = {line.split(b":", 1)[0].strip().lower() for line in message.split(b"\r\n\r\n", 1)[0].splitlines()}
    headers = [name for name in SIGNED_HEADERS if name in present] or [b"from"]
    signature: bytes = dkimpy.sign(
        message,
        selector.encode(),
        domain.encode(),
        private_key,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=headers,
    )
    return signature
