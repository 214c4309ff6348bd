"""DKIM keys: the private key the nodes sign with (kept in the domain's `<name>-dkim` Secret) and the TXT
record that publishes its public half (RFC 6376 §3.6.1); and the domain's internal token (kept in its
`<name>-internal` Secret)."""

from __future__ import annotations

import base64
import secrets

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def new_dkim_key() -> str:
    """A new 2048-bit RSA key, PEM (slow: run it off the event loop)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    ).decode()


def new_internal_token() -> str:
    """32 random bytes, as URL-safe base64 text (an HTTP header carries it: RFC 6750 §2.1's b64token)."""
    return secrets.token_urlsafe(32)


def dkim_record(private_key_pem: str) -> str:
    """The TXT value for `<selector>._domainkey.<domain>`. Raises ValueError for a key that is not RSA PEM."""
    key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("a DKIM key must be an RSA key")
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"
