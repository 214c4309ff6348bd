"""The `mailnode` command as an operator runs it.

Aspects: `serve` refuses an invalid config or an invalid directory at start-up with a non-zero exit
and a message on stderr that names the field and the reason (no traceback); `hash-password` reads a
password on stdin and prints an argon2id hash that verifies it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import argon2
import pytest
import yaml

from tests.node.conftest import DOMAIN, NodeFiles, mailbox, write_node_files

PLAINTEXT_PASSWORD = {"address": f"user@{DOMAIN}", "password_hash": "hunter2"}


def mailnode(*args: str, stdin: str = "", timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailnode", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def node_files(root: Path, tls_files: tuple[Path, Path]) -> NodeFiles:
    """Valid files with every port 0: should a broken file be accepted, the node would start and the
    run would time out rather than collide with another test's ports."""
    return write_node_files(root, mailboxes=[mailbox(f"user@{DOMAIN}")], tls=tls_files)


def edit_config(files: NodeFiles, change: Callable[[dict[str, Any]], None]) -> None:
    config = yaml.safe_load(files.config_file.read_text())
    change(config)
    files.config_file.write_text(yaml.safe_dump(config))


def assert_refused(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode != 0, result
    for words in expected:
        assert words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(
            lambda c: c.update(colour="blue"),
            ["colour", "Extra inputs are not permitted"],
            id="unknown-field",
        ),
        pytest.param(
            lambda c: c["listen"].update(smtp="abc"), ["listen.smtp", "valid integer"], id="port-not-a-number"
        ),
        pytest.param(lambda c: c.pop("domains"), ["domains", "Field required"], id="domains-missing"),
        pytest.param(
            lambda c: c["domains"][0].update(domain="exa mple.com"),
            ["domains.0.domain", "not a domain name"],
            id="bad-domain",
        ),
    ],
)
def test_serve_refuses_an_invalid_config(
    tmp_path: Path,
    tls_files: tuple[Path, Path],
    change: Callable[[dict[str, Any]], None],
    expected: list[str],
) -> None:
    files = node_files(tmp_path, tls_files)
    edit_config(files, change)

    result = mailnode("serve", "--config", str(files.config_file))

    assert_refused(result, str(files.config_file), *expected)


def test_serve_refuses_a_config_that_is_not_yaml(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    files = node_files(tmp_path, tls_files)
    files.config_file.write_text("node_name: [unclosed\n")

    assert_refused(mailnode("serve", "--config", str(files.config_file)), "not valid YAML")


def test_serve_refuses_a_missing_config(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"

    assert_refused(mailnode("serve", "--config", str(missing)), str(missing), "cannot read")


@pytest.mark.parametrize(
    ("directory", "expected"),
    [
        pytest.param(
            lambda: yaml.safe_dump({"mailboxes": [mailbox("user.example.com")]}),
            ["directory.yaml", "mailboxes.0.address", "not a mail address"],
            id="address-without-at",
        ),
        pytest.param(
            lambda: yaml.safe_dump({"mailboxes": [PLAINTEXT_PASSWORD]}),
            ["directory.yaml", "mailboxes.0.password_hash", "argon2"],
            id="plaintext-password",
        ),
        pytest.param(
            lambda: yaml.safe_dump({"mailboxes": [mailbox("user@elsewhere.org")]}),
            ["mailbox user@elsewhere.org", "domain elsewhere.org is not served by this node"],
            id="foreign-domain",
        ),
        pytest.param(lambda: "mailboxes: [\n", ["directory.yaml", "not valid YAML"], id="not-yaml"),
    ],
)
def test_serve_refuses_an_invalid_directory_at_start(
    tmp_path: Path, tls_files: tuple[Path, Path], directory: Callable[[], str], expected: list[str]
) -> None:
    files = node_files(tmp_path, tls_files)
    files.write_directory(directory())

    result = mailnode("serve", "--config", str(files.config_file))

    assert_refused(result, *expected)


def test_serve_refuses_a_missing_directory(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    files = node_files(tmp_path, tls_files)
    files.directory_file.unlink()

    result = mailnode("serve", "--config", str(files.config_file))

    assert_refused(result, str(files.directory_file), "cannot read")


def test_hash_password_prints_a_verifiable_argon2id_hash() -> None:
    result = mailnode("hash-password", stdin="s3cret with spaces\n")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("$argon2id$")
    assert argon2.PasswordHasher().verify(lines[0], "s3cret with spaces")
    with pytest.raises(argon2.exceptions.VerifyMismatchError):
        argon2.PasswordHasher().verify(lines[0], "s3cret")


def test_hash_password_refuses_an_empty_password() -> None:
    result = mailnode("hash-password", stdin="\n")

    assert result.returncode != 0
    assert "empty password" in result.stderr
    assert result.stdout == ""


def test_serve_refuses_an_unreadable_dkim_key(tmp_path: Path) -> None:
    """A DKIM key that cannot be read stops the node at start, naming the domain."""
    files = write_node_files(
        tmp_path / "n", mailboxes=[mailbox("user@example.com")], tls=None,
        domains=[{"domain": "example.com", "dkim": {"key_file": str(tmp_path / "missing.pem")}}],
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "mailnode", "serve", "--config", str(files.config_file)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "DKIM key of example.com" in result.stderr
    assert "Traceback" not in result.stderr
