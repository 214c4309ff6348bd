"""The `mailfleet` command: `crds` prints the CustomResourceDefinitions (`--write DIR` writes one file per
CRD, as `make crds` does for crds/); `render` prints the objects the operator would apply for MailDomain,
Mailbox and Secret files. `operator` and `local up` come with the operator issue."""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import sys
from pathlib import Path
from typing import Any

import argon2
import pydantic
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailfleet import api, crds, specs

DEFAULT_IMAGE = "ghcr.io/mailfleet/mailfleet:latest"


def _crds(write: Path | None) -> int:
    if write is None:
        sys.stdout.write(crds.render_stream())
        return 0
    for path in crds.write(write):
        print(f"wrote {path}", file=sys.stderr)
    return 0


class RenderError(Exception):
    """A resource file that cannot be rendered; the message names the file and the field."""


@dataclasses.dataclass
class _Loaded:
    domains: list[tuple[Path, api.MailDomain]] = dataclasses.field(default_factory=list)
    mailboxes: list[tuple[Path, api.Mailbox]] = dataclasses.field(default_factory=list)
    # (namespace, Secret name) -> key -> value (decoded)
    secrets: dict[tuple[str, str], dict[str, str]] = dataclasses.field(default_factory=dict)


def _namespace(meta: api.ObjectMeta) -> str:
    return meta.namespace or "default"


def _validation_message(error: pydantic.ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in problem['loc']) or '(top level)'}: {problem['msg']}"
        for problem in error.errors()
    )


def _secret_values(path: Path, document: dict[str, Any], name: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for key, value in (document.get("data") or {}).items():
        try:
            values[str(key)] = base64.b64decode(str(value), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as error:
            raise RenderError(f"{path}: Secret {name}: data.{key}: not base64 of UTF-8 text ({error})") from error
    values.update({str(key): str(value) for key, value in (document.get("stringData") or {}).items()})
    return values


def _load(paths: list[Path]) -> _Loaded:
    loaded = _Loaded()
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
                    loaded.secrets[(_namespace(meta), meta.name)] = _secret_values(path, document, meta.name)
                else:
                    raise RenderError(
                        f"{path}: document {index} ({name}): unknown kind {api_version}/{kind}; "
                        f"expected {api.API_VERSION} MailDomain or Mailbox, or v1 Secret"
                    )
            except pydantic.ValidationError as error:
                raise RenderError(f"{path}: {kind} {name}: invalid: {_validation_message(error)}") from error
    return loaded


def _passwords(
    path: Path, mailbox: api.Mailbox, secrets: dict[tuple[str, str], dict[str, str]], hasher: argon2.PasswordHasher
) -> dict[str, str]:
    """The mailbox's password values, hashed (argon2id) where the Secret holds plaintext."""
    refs = [("spec.passwordSecretRef", mailbox.spec.password_secret_ref)] + [
        (f"spec.appPasswords[{app.name}].secretRef", app.secret_ref) for app in mailbox.spec.app_passwords
    ]
    found: dict[str, str] = {}
    for field, ref in refs:
        secret = secrets.get((_namespace(mailbox.metadata), ref.name))
        if secret is None:
            raise RenderError(
                f"{path}: Mailbox {mailbox.metadata.name}: {field}: Secret {ref.name} is not in the files"
            )
        if ref.key not in secret:
            raise RenderError(
                f"{path}: Mailbox {mailbox.metadata.name}: {field}: Secret {ref.name} has no key {ref.key}"
            )
        value = secret[ref.key]
        found[specs.password_key(ref)] = value if value.startswith("$argon2") else hasher.hash(value)
    return found


def _dkim_key(path: Path | None) -> str:
    if path is not None:
        try:
            return path.read_text(encoding="utf-8")
        except OSError as error:
            raise RenderError(f"{path}: cannot read: {error.strerror}") from error
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    ).decode()


def _dkim_record(private_key_pem: str, source: str) -> str:
    """The TXT value publishing the public half of the key (RFC 6376 §3.6.1)."""
    try:
        key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
    except ValueError as error:
        raise RenderError(f"{source}: not a PEM private key: {error}") from error
    if not isinstance(key, rsa.RSAPrivateKey):
        raise RenderError(f"{source}: a DKIM key must be an RSA key")
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"


def render_files(paths: list[Path], *, image: str, dkim_key: Path | None = None) -> str:
    """The multi-document YAML `mailfleet render` prints; the DNS records to publish follow as comments."""
    loaded = _load(paths)
    if not loaded.domains:
        raise RenderError(f"no MailDomain in {', '.join(str(p) for p in paths)}")
    hasher = argon2.PasswordHasher()
    hashed: dict[tuple[str, str], dict[str, str]] = {}  # a Secret key used twice is hashed once
    parts: list[str] = []
    comments: list[str] = []
    for path, domain in loaded.domains:
        namespace = _namespace(domain.metadata)
        mailboxes, passwords = [], {}
        for mailbox_path, mailbox in loaded.mailboxes:
            if _namespace(mailbox.metadata) != namespace:
                continue
            mailboxes.append(mailbox)
            key = (namespace, mailbox.metadata.name)
            if key not in hashed:
                hashed[key] = _passwords(mailbox_path, mailbox, loaded.secrets, hasher)
            passwords.update(hashed[key])
        relay_username = None
        relay_ref = domain.spec.smtp.relay_secret_ref
        if domain.spec.smtp.relay_host is not None and relay_ref is not None:
            relay = loaded.secrets.get((namespace, relay_ref.name))
            if relay is None or "password" not in relay:
                raise RenderError(
                    f"{path}: MailDomain {domain.metadata.name}: spec.smtp.relaySecretRef: "
                    f"Secret {relay_ref.name} with the key password is not in the files"
                )
            relay_username = relay.get("username")
        private_key = _dkim_key(dkim_key)
        try:
            objects = specs.render(
                domain, mailboxes, passwords, image=image, dkim_private_key=private_key, relay_username=relay_username
            )
        except ValueError as error:
            raise RenderError(f"{path}: MailDomain {domain.metadata.name}: {error}") from error
        parts += [specs.dump(obj) for obj in objects]
        record = _dkim_record(private_key, str(dkim_key or "generated DKIM key"))
        comments.append(f"# DNS records to publish for MailDomain {domain.metadata.name}:")
        comments += [
            f"#   {r['name']}. {r['type']} {r['value']}" for r in specs.dns_records(domain, dkim_record=record)
        ]
    return "---\n" + "---\n".join(parts) + "\n".join(comments) + "\n"


def _render(args: argparse.Namespace) -> int:
    try:
        sys.stdout.write(render_files(args.file, image=args.image, dkim_key=args.dkim_key))
    except RenderError as error:
        print(f"mailfleet render: error: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailfleet", description="The Mailfleet operator and its tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    crds_command = commands.add_parser("crds", help="print the CustomResourceDefinitions (YAML)")
    crds_command.add_argument(
        "--write", metavar="DIR", type=Path, help="write DIR/<plural>.mailfleet.io.yaml instead of printing"
    )
    render_command = commands.add_parser(
        "render",
        help="print the objects the operator would apply for MailDomain, Mailbox and Secret files",
        description=(
            "Read MailDomain, Mailbox and Secret objects (multi-document YAML) and print, as one YAML stream, "
            "the objects the operator would apply for every MailDomain with the Mailboxes of its namespace. "
            "Passwords come from the Secrets' stringData or data; plaintext values are hashed here with "
            "argon2id (as the operator does), so they never appear in the output. The DNS records to "
            "publish follow as comments."
        ),
    )
    render_command.add_argument(
        "-f", "--file", metavar="PATH", type=Path, action="append", required=True, help="a YAML file (repeatable)"
    )
    render_command.add_argument("--image", default=DEFAULT_IMAGE, help=f"mail node image (default {DEFAULT_IMAGE})")
    render_command.add_argument(
        "--dkim-key",
        metavar="PEM",
        type=Path,
        help="the domains' DKIM private key (RSA, PEM); a new key is made for each run when omitted",
    )
    args = parser.parse_args(argv)
    if args.command == "crds":
        return _crds(args.write)
    if args.command == "render":
        return _render(args)
    parser.error(f"unknown command {args.command}")  # argparse has refused it already; this is for mypy


if __name__ == "__main__":
    sys.exit(main())
