"""Node config and directory: validation messages name the field, sizes parse, addresses resolve
(exact, alias, alias domain, user+tag), conflicting directories are refused."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailnode import passwords
from mailnode.config import ConfigError, Directory, MailboxEntry, load_node_config, parse_directory, parse_size

HASH = passwords.hash_password("pw")
DOMAINS = {"example.com": "example.com", "example.net": "example.com", "other.org": "other.org"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (1024, 1024),
        ("1024", 1024),
        ("25MiB", 25 * 2**20),
        ("1Gi", 2**30),
        ("500M", 500_000_000),
        ("2 KB", 2000),
    ],
)
def test_sizes_parse(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1", "1XB", "", True, -5, 1.5])
def test_bad_sizes_say_what_is_expected(text: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


@given(st.integers(min_value=0, max_value=2**50), st.sampled_from(["", "Ki", "Mi", "Gi", "k", "M", "G"]))
def test_size_units_multiply(number: int, unit: str) -> None:
    factor = {"": 1, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "k": 1000, "M": 1000**2, "G": 1000**3}[unit]
    assert parse_size(f"{number}{unit}") == number * factor


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return path


def test_node_config_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    config = load_node_config(
        _write(
            tmp_path,
            "hostname: mail.example.com\ndomains: [{domain: example.com}]\ndata_dir: data\ndirectory_file: d.yaml\n",
        )
    )
    assert config.data_dir == tmp_path / "data"
    assert config.directory_file == tmp_path / "d.yaml"
    assert config.listen.smtp == 2525
    assert config.smtp.max_message_size == 25 * 2**20


_RELAY_BASE = "hostname: mail.example.com\ndomains: [{domain: example.com}]\ndata_dir: d\ndirectory_file: f\n"


def test_relay_host_tls_defaults_and_relative_files(tmp_path: Path) -> None:
    relay = load_node_config(
        _write(tmp_path, _RELAY_BASE + "smtp: {relay_host: {host: r.test, password_file: p, ca_file: ca.pem}}\n")
    ).smtp.relay_host
    assert relay is not None
    assert (relay.tls, relay.port, relay.allow_plaintext) == ("starttls", 587, False)
    assert (relay.password_file, relay.ca_file) == (tmp_path / "p", tmp_path / "ca.pem")
    implicit = load_node_config(_write(tmp_path, _RELAY_BASE + "smtp: {relay_host: {host: r.test, tls: implicit}}\n"))
    assert implicit.smtp.relay_host is not None and implicit.smtp.relay_host.port == 465  # RFC 8314 §3.3


@pytest.mark.parametrize(
    ("relay", "reason"),
    [
        ("{host: r.test, tls: none}", "allow_plaintext: true"),
        ("{host: r.test, tls: tls}", "'starttls', 'implicit', 'starttls-unverified' or 'none'"),
        ("{host: r.test, tls: starttls-unverified, ca_file: ca.pem}", "ca_file is used only by"),
    ],
)
def test_invalid_relay_tls_names_the_field(tmp_path: Path, relay: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_node_config(_write(tmp_path, _RELAY_BASE + f"smtp: {{relay_host: {relay}}}\n"))
    assert "smtp.relay_host" in str(caught.value)
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        ("domains: [{domain: example.com}]\ndata_dir: d\ndirectory_file: f\n", "hostname", "Field required"),
        ("hostname: h\ndomains: []\ndata_dir: d\ndirectory_file: f\n", "domains", "at least 1"),
        (
            "hostname: h\ndomains: [{domain: 'bad domain'}]\ndata_dir: d\ndirectory_file: f\n",
            "domains.0.domain",
            "not a domain",
        ),
        (
            "hostname: h\ndomains: [{domain: a.test}]\ndata_dir: d\ndirectory_file: f\nlisten: {smtp: abc}\n",
            "listen.smtp",
            "valid integer",
        ),
        (
            "hostname: h\ndomains: [{domain: a.test}]\ndata_dir: d\ndirectory_file: f\n"
            "smtp: {max_message_size: huge}\n",
            "smtp.max_message_size",
            "not a size",
        ),
        (
            "hostname: h\ndomains: [{domain: a.test}]\ndata_dir: d\ndirectory_file: f\nbogus: 1\n",
            "bogus",
            "Extra inputs",
        ),
        (
            "hostname: h\ndomains: [{domain: a.test}, {domain: a.test}]\ndata_dir: d\ndirectory_file: f\n",
            "",
            "listed twice",
        ),
        ("- just\n- a list\n", "(top level)", "mapping"),
        ("hostname: [unclosed\n", "", "not valid YAML"),
    ],
)
def test_invalid_node_config_names_field_and_reason(tmp_path: Path, text: str, field: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_node_config(_write(tmp_path, text))
    assert field in str(caught.value)
    assert reason in str(caught.value)


def _directory(*entries: dict[str, object]) -> Directory:
    return Directory([MailboxEntry.model_validate({"password_hash": HASH, **e}) for e in entries], domains=DOMAINS)


def test_resolution_order() -> None:
    directory = _directory(
        {"address": "User@Example.com", "aliases": ["sales@example.com"]},
        {"address": "boss@other.org"},
    )
    assert directory.resolve("user@example.com").mailbox.address == "user@example.com"  # type: ignore[union-attr]
    assert directory.resolve("USER@EXAMPLE.COM").kind == "local"
    assert directory.resolve("sales@example.com").mailbox.address == "user@example.com"  # type: ignore[union-attr]
    assert directory.resolve("user@example.net").mailbox.address == "user@example.com"  # type: ignore[union-attr]
    assert directory.resolve("sales@example.net").mailbox.address == "user@example.com"  # type: ignore[union-attr]
    assert directory.resolve("user+lists@example.com").mailbox.address == "user@example.com"  # type: ignore[union-attr]
    assert directory.resolve("nobody@example.com").kind == "unknown"
    assert directory.resolve("user@example.org").kind == "foreign"
    assert directory.resolve("not-an-address").kind == "foreign"
    assert directory.addresses_of(directory.get("user@example.com")) == {  # type: ignore[arg-type]
        "user@example.com",
        "user@example.net",
        "sales@example.com",
        "sales@example.net",
    }


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ([{"address": "a@example.com"}, {"address": "A@example.com"}], "defined twice"),
        (
            [{"address": "a@example.com"}, {"address": "b@example.com", "aliases": ["a@example.com"]}],
            "already an address",
        ),
        ([{"address": "a@elsewhere.test"}], "not served by this node"),
        ([{"address": "a@example.com", "aliases": ["x@elsewhere.test"]}], "not served by this node"),
    ],
)
def test_conflicting_directory_refused(entries: list[dict[str, object]], reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        _directory(*entries)


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        (b"mailboxes: [{address: nope, password_hash: x}]", "mailboxes.0.address", "not a mail address"),
        (b"mailboxes: [{address: a@example.com, password_hash: plain}]", "mailboxes.0.password_hash", "argon2"),
        (
            f"mailboxes: [{{address: a@example.com, password_hash: '{HASH}', quota: lots}}]".encode(),
            "mailboxes.0.quota",
            "not a size",
        ),
        (b"mailboxes: [unclosed", "", "not valid YAML"),
        (gzip.compress(b"mailboxes: [unclosed")[:-6], "", "gzip-compressed but cannot be decompressed"),
        (gzip.compress(b"mailboxes: [{address: a@example.com}]"), "mailboxes.0.password_hash", "Field required"),
    ],
)
def test_invalid_directory_names_field(text: bytes, field: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_directory(text, domains=DOMAINS)
    assert field in str(caught.value)
    assert reason in str(caught.value)


def test_a_gzip_compressed_directory_is_read() -> None:
    text = f"mailboxes: [{{address: a@example.com, password_hash: '{HASH}'}}]".encode()
    directory = parse_directory(gzip.compress(text), domains=DOMAINS)
    assert [m.address for m in directory.mailboxes] == ["a@example.com"]
