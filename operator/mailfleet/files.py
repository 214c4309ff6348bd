"""Resource files as `mailfleet render` and `mailfleet local up` read them: MailDomain, Mailbox and Secret
objects from multi-document YAML, validated with the API models, and each MailDomain resolved against the
Secrets it references (passwords hashed with argon2id, as the operator does). Every problem is a
`RenderError` whose message names the file and the field, for a one-line error on the command line."""

from __future__ import annotations

import base64
import binascii
import dataclasses
from pathlib import Path
from typing import Any, Final

import argon2
import pydantic
import yaml

from mailfleet import api, keys, specs

TLS_SECRET_TYPE: Final = "kubernetes.io/tls"


class RenderError(Exception):
    """A resource file that cannot be rendered; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class Secret:
    path: Path  # the file it came from, for messages
    type: str
    values: dict[str, str]  # key -> value, decoded


@dataclasses.dataclass
class Loaded:
    domains: list[tuple[Path, api.MailDomain]] = dataclasses.field(default_factory=list)
    mailboxes: list[tuple[Path, api.Mailbox]] = dataclasses.field(default_factory=list)
    secrets: dict[tuple[str, str], Secret] = dataclasses.field(default_factory=dict)  # (namespace, name) ->


@dataclasses.dataclass(frozen=True)
class ResolvedDomain:
    """A MailDomain with what the builders need from the other files: the Mailboxes of its namespace and
    their password hashes ("secretName/key" -> hash, see specs.directory), the relay Secret's values and the
    relay CA bundle (PEM)."""

    path: Path
    domain: api.MailDomain
    mailboxes: list[api.Mailbox]
    passwords: dict[str, str]
    relay: dict[str, str] | None
    relay_ca: str | None = None

    @property
    def relay_username(self) -> str | None:
        return None if self.relay is None else self.relay.get("username")


def namespace(meta: api.ObjectMeta) -> str:
    """A resource read from a file without a namespace lands in "default", as kubectl does."""
    return meta.namespace or "default"


def secret_values(path: Path, document: dict[str, Any], name: str) -> dict[str, str]:
    """A Secret's data (base64) and stringData, decoded; stringData wins, as the API server merges them."""
    values: dict[str, str] = {}
    for key, value in (document.get("data") or {}).items():
        try:
            values[str(key)] = base64.b64decode(str(value), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as error:
            raise RenderError(f"{path}: Secret {name}: data.{key}: not base64 of UTF-8 text ({error})") from error
    values.update({str(key): str(value) for key, value in (document.get("stringData") or {}).items()})
    return values


def load(paths: list[Path]) -> Loaded:
    loaded = Loaded()
    for path in paths:
        try:
            documents = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]
        except OSError as error:
            raise RenderError(f"{path}: cannot read: {error.strerror}") from error
        except yaml.YAMLError as error:
            raise RenderError(f"{path}: not valid YAML: {error}") from error
        for index, document in enumerate(documents, start=1):
            if not isinstance(document, dict):
                raise RenderError(f"{path}: document {index}: expected a Kubernetes object (a mapping)")
            kind, api_version = document.get("kind"), document.get("apiVersion")
            name = (document.get("metadata") or {}).get("name", f"(document {index})")
            try:
                if kind == "MailDomain" and api_version == api.API_VERSION:
                    loaded.domains.append((path, api.MailDomain.model_validate(document)))
                elif kind == "Mailbox" and api_version == api.API_VERSION:
                    loaded.mailboxes.append((path, api.Mailbox.model_validate(document)))
                elif kind == "Secret" and api_version == "v1":
                    meta = api.ObjectMeta.model_validate(document.get("metadata") or {})
                    loaded.secrets[(namespace(meta), meta.name)] = Secret(
                        path, str(document.get("type") or "Opaque"), secret_values(path, document, meta.name)
                    )
                else:
                    raise RenderError(
                        f"{path}: document {index} ({name}): unknown kind {api_version}/{kind}; "
                        f"expected {api.API_VERSION} MailDomain or Mailbox, or v1 Secret"
                    )
            except pydantic.ValidationError as error:
                raise RenderError(f"{path}: {kind} {name}: invalid: {api.validation_message(error)}") from error
    return loaded


def passwords(
    path: Path, mailbox: api.Mailbox, secrets: dict[tuple[str, str], Secret], hasher: argon2.PasswordHasher
) -> dict[str, str]:
    """The mailbox's password values, hashed (argon2id) where the Secret holds plaintext."""
    refs = [("spec.passwordSecretRef", mailbox.spec.password_secret_ref)] + [
        (f"spec.appPasswords[{app.name}].secretRef", app.secret_ref) for app in mailbox.spec.app_passwords
    ]
    found: dict[str, str] = {}
    for field, ref in refs:
        secret = secrets.get((namespace(mailbox.metadata), ref.name))
        if secret is None:
            raise RenderError(
                f"{path}: Mailbox {mailbox.metadata.name}: {field}: Secret {ref.name} is not in the files"
            )
        if ref.key not in secret.values:
            raise RenderError(
                f"{path}: Mailbox {mailbox.metadata.name}: {field}: Secret {ref.name} has no key {ref.key}"
            )
        value = secret.values[ref.key]
        found[specs.password_key(ref)] = value if value.startswith("$argon2") else hasher.hash(value)
    return found


def resolve(loaded: Loaded, sources: list[Path]) -> list[ResolvedDomain]:
    """Every MailDomain of the files, in file order, with its Mailboxes and Secrets looked up. Hashing is
    slow on purpose (argon2id), so a Secret key that several domains of a namespace share is hashed once."""
    if not loaded.domains:
        raise RenderError(f"no MailDomain in {', '.join(str(p) for p in sources)}")
    hasher = argon2.PasswordHasher()
    hashed: dict[tuple[str, str], dict[str, str]] = {}
    resolved: list[ResolvedDomain] = []
    for path, domain in loaded.domains:
        domain_namespace = namespace(domain.metadata)
        mailboxes: list[api.Mailbox] = []
        hashes: dict[str, str] = {}
        for mailbox_path, mailbox in loaded.mailboxes:
            if namespace(mailbox.metadata) != domain_namespace:
                continue
            mailboxes.append(mailbox)
            key = (domain_namespace, mailbox.metadata.name)
            if key not in hashed:
                hashed[key] = passwords(mailbox_path, mailbox, loaded.secrets, hasher)
            hashes.update(hashed[key])
        relay = None
        relay_ref = domain.spec.smtp.relay_secret_ref
        if domain.spec.smtp.relay_host is not None and relay_ref is not None:
            secret = loaded.secrets.get((domain_namespace, relay_ref.name))
            if secret is None or "password" not in secret.values:
                raise RenderError(
                    f"{path}: MailDomain {domain.metadata.name}: spec.smtp.relaySecretRef: "
                    f"Secret {relay_ref.name} with the key password is not in the files"
                )
            relay = secret.values
        relay_ca = None
        ca_ref = domain.spec.smtp.relay_ca_secret_ref
        if domain.spec.smtp.relay_host is not None and ca_ref is not None:
            secret = loaded.secrets.get((domain_namespace, ca_ref.name))
            if secret is None or ca_ref.key not in secret.values:
                raise RenderError(
                    f"{path}: MailDomain {domain.metadata.name}: spec.smtp.relayCASecretRef: "
                    f"Secret {ca_ref.name} with the key {ca_ref.key} is not in the files"
                )
            relay_ca = secret.values[ca_ref.key]
        resolved.append(ResolvedDomain(path, domain, mailboxes, hashes, relay, relay_ca))
    return resolved


def tls_secret(loaded: Loaded, resolved: ResolvedDomain) -> tuple[str, str] | None:
    """(certificate chain, private key) as PEM from the domain's spec.tls.secretName, when that Secret is in
    the files; None when the domain names none or the Secret is elsewhere (cert-manager makes it in a
    cluster). A Secret that is there but is not a TLS Secret is an error rather than silently replaced."""
    domain = resolved.domain
    if domain.spec.tls is None:
        return None
    name = domain.spec.tls.secret_name
    secret = loaded.secrets.get((namespace(domain.metadata), name))
    if secret is None:
        return None
    where = f"{resolved.path}: MailDomain {domain.metadata.name}: spec.tls.secretName: Secret {name} ({secret.path})"
    if secret.type != TLS_SECRET_TYPE:
        raise RenderError(f"{where} is of type {secret.type}, not {TLS_SECRET_TYPE}")
    for key in ("tls.crt", "tls.key"):
        if key not in secret.values:
            raise RenderError(f"{where} has no key {key}")
    return secret.values["tls.crt"], secret.values["tls.key"]


def dkim_key(path: Path | None) -> str:
    """The DKIM private key (PEM) read from `path`, or a new key (mailfleet.keys) when there is none."""
    if path is None:
        return keys.new_dkim_key()
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise RenderError(f"{path}: cannot read: {error.strerror}") from error


def dkim_record(private_key_pem: str, source: str) -> str:
    """The TXT value publishing the public half of the key; `source` names the key in the error."""
    try:
        return keys.dkim_record(private_key_pem)
    except ValueError as error:
        raise RenderError(f"{source}: not a DKIM key (RSA, PEM): {error}") from error


def dns_lines(domain: api.MailDomain, *, dkim_record: str | None) -> list[str]:
    """The records to publish, one zone-file-like line each ("name. TYPE value")."""
    return [f"{r['name']}. {r['type']} {r['value']}" for r in specs.dns_records(domain, dkim_record=dkim_record)]
