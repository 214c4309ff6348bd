"""`mailfleet local up` and a relay host with a private CA: the CA Secret's bundle is written next to
node.yaml (relay/ca.crt, beside relay/password) and node.yaml's smtp.relay_host.ca_file names it, so the
node it starts verifies the relay against it; a CA Secret that is not in the files is refused, naming the
file and the field, before anything is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from mailfleet import files, local
from mailnode.config import load_node_config
from tests.e2e.test_local_up import example_documents


def _files(tmp_path: Path, ca_pem: str | None) -> list[Path]:
    (domain,) = example_documents("maildomain.yaml")
    domain["spec"]["smtp"] = {
        "relayHost": "[relay.mail.svc]:587",
        "relaySecretRef": {"name": "relay"},
        "relayCASecretRef": {"name": "relay-ca"},
    }
    documents: list[dict[str, Any]] = [
        domain,
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "relay"}, "stringData": {"password": "pw"}},
    ]
    if ca_pem is not None:
        metadata = {"name": "relay-ca"}
        documents.append({"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "stringData": {"ca.crt": ca_pem}})
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump_all(documents))
    return [path, Path("examples/mailboxes.yaml")]


def test_the_relay_ca_is_written_next_to_node_yaml(tmp_path: Path, ca: trustme.CA) -> None:
    pem = ca.cert_pem.bytes().decode()
    state = tmp_path / "state"
    (node,) = local.prepare(_files(tmp_path, pem), base_port=21000, state_dir=state)
    config = load_node_config(node.root / "node.yaml")
    relay = config.smtp.relay_host
    assert relay is not None and relay.ca_file == (node.root / "relay" / "ca.crt").absolute()
    assert relay.ca_file.read_text() == pem
    assert relay.password_file is not None and relay.password_file.parent == relay.ca_file.parent


def test_a_relay_ca_secret_not_in_the_files_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    paths = _files(tmp_path, None)
    with pytest.raises(files.RenderError) as refused:
        local.prepare(paths, base_port=21000, state_dir=state)
    assert str(refused.value) == (
        f"{paths[0]}: MailDomain example-com: spec.smtp.relayCASecretRef: "
        "Secret relay-ca with the key ca.crt is not in the files"
    )
    assert not state.exists()
