"""A real IMAP4rev2 client against a live node: tools/imap-client, a small program on emersion's go-imap v2
client library, which speaks IMAP4rev2 (RFC 9051) once it has sent ENABLE IMAP4rev2. Built here with the
machine's Go (from the Go module proxy; cached by Go afterwards), run once per test.

It exercises the IMAP4rev2 forms and what IMAP4rev2 folds in: folder names in UTF-8 on the wire both ways,
one LIST ... RETURN (STATUS (MESSAGES UNSEEN DELETED SIZE)) for the folder list with counts (LIST-STATUS,
STATUS=SIZE, IMAP4rev2's DELETED), SELECT's LIST response, a SEARCH without RETURN answered as ESEARCH, a UTF-8
search string without CHARSET, SORT, THREAD=REFERENCES, FETCH BINARY[], flags without \\Recent, MOVE with its
COPYUID, UNSELECT and NAMESPACE. Each assertion is on what the library returned; the command lines it sent
show the forms it used."""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.node.conftest import PASSWORD, RunningNode
from tests.node.test_imap import USER, connect
from tests.node.test_imap_roundcube import ATTACHMENT, with_attachment

SOURCE = Path(__file__).parents[2] / "tools" / "imap-client"
FOLDER = "Été/Reçus"


def go_tool() -> str:
    """The machine's Go (on PATH, else where this kind of machine keeps it, as scripts/build-cluster looks)."""
    found = shutil.which("go") or next((p for p in ("/usr/local/go/bin/go",) if os.access(p, os.X_OK)), None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("go is not installed; CI must not skip")
        pytest.skip("go is not installed")
    return found


@pytest.fixture(scope="module")
def imap_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary = tmp_path_factory.mktemp("imap-client") / "imap-client"
    print("building tools/imap-client (go-imap v2)...", file=sys.stderr, flush=True)
    env = {**os.environ, "GOFLAGS": "-mod=readonly"}  # go.mod and go.sum are complete: never rewritten
    built = subprocess.run(
        [go_tool(), "build", "-trimpath", "-o", str(binary), "."],
        cwd=SOURCE,
        env=env,
        capture_output=True,
        timeout=1200,  # cold: three modules downloaded and compiled, on a loaded machine
        check=False,
    )
    assert built.returncode == 0, built.stderr.decode(errors="replace")
    return binary


def run(imap_client: Path, node: RunningNode, ca_file: Path) -> dict[str, Any]:
    attachment = with_attachment(9).decode()
    done = subprocess.run(
        [str(imap_client), f"-addr=127.0.0.1:{node.port('imap')}", f"-user={USER}", f"-password={PASSWORD}",
         f"-ca={ca_file}", f"-attachment={attachment}"],
        capture_output=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def sent(result: dict[str, Any], command: str) -> list[str]:
    """The command lines the client sent for `command` (without their tag)."""
    lines = (line.split(" ", 1)[1] for line in result["sent"])
    return [line for line in lines if line.split(" ", 1)[0] == command or line.startswith(command + " ")]


def test_go_imap_speaks_imap4rev2_with_the_node(
    imap_client: Path, node: RunningNode, ca_file: Path, client_tls: ssl.SSLContext
) -> None:
    result = run(imap_client, node, ca_file)
    assert {"IMAP4rev1", "IMAP4rev2"} <= set(result["capabilities"])
    assert result["enabled"] == ["IMAP4rev2"]
    sizes = [len(m) for m in (_note(1), _note(2), with_attachment(9))]

    # UTF-8 names on the wire, decoded by the library as sent.
    assert sent(result, "CREATE") == [f'CREATE "{FOLDER}"']
    assert {"INBOX", "Été", FOLDER} <= set(result["folders"])
    assert "\\HasChildren" in result["folders"]["Été"]["attrs"]
    # LIST-STATUS with SIZE and DELETED, in one LIST.
    (listed,) = sent(result, "LIST")
    prefix = 'LIST "" "*" RETURN (STATUS ('
    assert listed.startswith(prefix) and listed.endswith("))"), listed  # the items in the order of a Go map
    assert sorted(listed.removeprefix(prefix).removesuffix("))").split()) == ["DELETED", "MESSAGES", "SIZE", "UNSEEN"]
    counts = {key: result["folders"][FOLDER][key] for key in ("messages", "unseen", "deleted", "size")}
    assert counts == {"messages": 3, "unseen": 2, "deleted": 1, "size": sum(sizes)}
    assert result["folders"]["Sent"]["messages"] == 0 and "\\Sent" in result["folders"]["Sent"]["attrs"]
    assert result["status"] == {"attrs": None, "messages": 3, "unseen": None, "deleted": 1, "size": sum(sizes)}

    # SELECT's LIST response (RFC 9051 §6.3.2), which the library keeps as SelectData.List.
    assert result["selected"] == {"messages": 3, "list_mailbox": FOLDER, "list_attrs": ["\\HasNoChildren"]}
    # SEARCH without RETURN, answered as ESEARCH; a UTF-8 string without CHARSET.
    assert sent(result, "SEARCH") == ["SEARCH DELETED"]
    assert result["deleted_seqnums"] == [2]
    assert sent(result, "UID SEARCH") == ['UID SEARCH SUBJECT "été"']
    assert result["subject_uids"] == [1, 2]
    # SORT and THREAD=REFERENCES.
    assert result["sorted_by_size"] == [3, 2, 1]
    # Threads by their root's date: 3's Date header (2025) before 1's internal date (it has no Date header).
    assert result["threads"] == [{"chain": [3], "subthreads": []}, {"chain": [1, 2], "subthreads": []}]
    # FETCH: flags without \Recent (the folder was just selected, read-write), and BINARY[2] decoded.
    assert result["flags"] == {"1": [], "2": ["\\Deleted"], "3": ["\\Seen"]}
    assert base64.b64decode(result["attachment"]) == ATTACHMENT
    # MOVE (its COPYUID), UNSELECT, NAMESPACE.
    assert sent(result, "UID MOVE") == ["UID MOVE 1 INBOX"]
    assert len(result["moved_to_uids"]) == 1 and result["inbox_messages"] == 1
    assert sent(result, "UNSELECT") == ["UNSELECT"]
    assert result["namespace"] == '"" "/"'

    # The same folder to an IMAP4rev1 client: in modified UTF-7, holding what is left after the MOVE.
    client = connect(node, client_tls)
    try:
        _, listed_rev1 = client.list('""', '"&AMk-t&AOk-/*"')
        assert listed_rev1 == [b'(\\HasNoChildren) "/" &AMk-t&AOk-/Re&AOc-us']
        assert client.select('"&AMk-t&AOk-/Re&AOc-us"') == ("OK", [b"2"])
    finally:
        client.logout()


def _note(number: int) -> bytes:
    """The messages tools/imap-client appends before the attachment (its `note`)."""
    subject = "Été en vue" if number == 1 else "Re: Été en vue"
    refs = "References: <g1@example.org>\r\n" if number == 2 else ""
    return (
        f"From: a@example.org\r\nSubject: {subject}\r\nMessage-ID: <g{number}@example.org>\r\n{refs}\r\n"
        f"body {number} {'x' * 100 * number}\r\n"
    ).encode()
