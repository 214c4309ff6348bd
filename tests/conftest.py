"""Fixtures for every tier: TLS certificates from a test CA (trustme), and `require_tool` for tests
that drive a command-line client. A missing tool skips the test locally, with the reason, and fails it
in CI (CI=true), where scripts/bootstrap must have installed it."""

from __future__ import annotations

import os
import shutil
import ssl
from pathlib import Path

import argon2
import pytest
import trustme

# Real argon2id hashes, with the cost turned down so that a test verifies in a millisecond; the node
# reads the parameters from each hash, as it does for hashes made by `mailnode hash-password`.
_cheap_hasher = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def cheap_hash(password: str) -> str:
    return _cheap_hasher.hash(password)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(cert_file, key_file) for localhost, 127.0.0.1 and mail.example.com, signed by `ca`."""
    # A common name as well as the SANs: mbsync (isync 1.4) insists on one.
    cert = ca.issue_cert("localhost", "127.0.0.1", "mail.example.com", common_name="localhost")
    directory = tmp_path_factory.mktemp("tls")
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return cert_file, key_file


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    """What a careful client uses: verifies the node's certificate against the test CA."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (scripts/bootstrap installs it)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must not skip")
        pytest.skip(message)
    return path


# Run last, in this order, the tiers whose programs `make test` builds in the background (scripts/build-image,
# scripts/build-cluster): on a fresh machine those builds are still running when pytest starts, and the tiers
# before them leave the build most of the cores while they wait on sockets and disks.
_BUILT_LAST = (Path(__file__).parent / "image", Path(__file__).parent / "cluster")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """tests/image, then tests/cluster, after every other test (a stable sort keeps every other order)."""

    def rank(item: pytest.Item) -> int:
        path = Path(item.path)
        return next((place for place, tier in enumerate(_BUILT_LAST, 1) if path.is_relative_to(tier)), 0)

    items.sort(key=rank)
