"""The IMAP command table (mailnode.imap.commands.TABLE, rules in mailnode.imap.table): every handler
written in a command module is declared in the table, every declared command dispatches in its states
and is refused with the right BAD in the others, the CAPABILITY list before and after TLS and login is
derived from the table (each token advertised has an entry, each entry is advertised somewhere), and
the `command` metric labels are the declared names plus "other". The node tests check that the
session really dispatches every declared command (test_imap.py)."""

from __future__ import annotations

import inspect
import itertools
import types

import pytest

from mailnode.imap import commands, responses, table
from mailnode.imap.commands import auth, fetch, folders, idle, search, sort, store

AREAS = (auth, fetch, folders, idle, search, sort, store)
TABLE = commands.TABLE

STATES = [
    {"authenticated": authenticated, "tls_active": active, "tls_available": available, "plaintext_login": plain}
    for authenticated, active, available, plain in itertools.product((False, True), repeat=4)
    if available or not active  # TLS is active only where a certificate is configured
]


def handlers(module: types.ModuleType) -> list[str]:
    """The module's public coroutine functions: what it offers as command handlers."""
    return [
        name
        for name, value in vars(module).items()
        if inspect.iscoroutinefunction(value) and value.__module__ == module.__name__ and not name.startswith("_")
    ]


@pytest.mark.parametrize("module", AREAS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_handler_is_declared(module: types.ModuleType) -> None:
    declared = {command.handler for command in TABLE.commands}
    undeclared = [name for name in handlers(module) if getattr(module, name) not in declared]
    assert not undeclared, f"handlers missing from commands.TABLE: {undeclared}"


def test_every_area_module_is_checked() -> None:
    """A new command module must be added to AREAS above, so that its handlers are checked too."""
    assert {command.handler.__module__ for command in TABLE.commands} == {m.__name__ for m in AREAS}


def test_each_command_is_declared_once_with_its_rfc() -> None:
    names = [command.name for command in TABLE.commands]
    assert len(names) == len(set(names))
    assert all(command.rfc.startswith("RFC ") for command in TABLE.commands)
    assert all(extension.rfc.startswith("RFC ") for extension in TABLE.extensions)
    with pytest.raises(ValueError, match="NOOP"):
        table.Table(extensions=(), commands=(TABLE.by_name["NOOP"], TABLE.by_name["NOOP"]))


@pytest.mark.parametrize("command", TABLE.commands, ids=lambda c: c.name)
def test_every_command_dispatches_in_its_states_only(command: table.Command[object]) -> None:
    for state in table.State:
        if state in command.states:
            assert TABLE.dispatch(command.name, state) is command
            continue
        with pytest.raises(responses.Refused) as refused:
            TABLE.dispatch(command.name, state)
        line = refused.value.line("a1")
        assert line.startswith(f"a1 BAD {command.name} ")
        if state is table.State.NOT_AUTHENTICATED:
            assert "needs authentication first" in line or "needs a selected mailbox" in line
        elif table.State.NOT_AUTHENTICATED in command.states:
            assert "is not valid once authenticated" in line
        else:
            assert "needs a selected mailbox" in line


def test_unknown_commands_are_refused() -> None:
    for name in ("XYZZY", "UID NOOP", "LOGIN2"):
        with pytest.raises(responses.Refused) as refused:
            TABLE.dispatch(name, table.State.SELECTED)
        assert refused.value.line("a1") == f"a1 BAD Unknown command {name}"


def test_rfc3501_states() -> None:
    """RFC 3501 §6: which commands each state allows."""
    by_name = TABLE.by_name
    assert {n for n, c in by_name.items() if c.states == table.ANY_STATE} == {"CAPABILITY", "NOOP", "LOGOUT", "ID"}
    assert {n for n, c in by_name.items() if c.states == table.NOT_AUTHENTICATED} == {
        "STARTTLS", "LOGIN", "AUTHENTICATE"
    }  # fmt: skip
    for name in ("SELECT", "EXAMINE", "LIST", "STATUS", "APPEND", "IDLE"):
        assert by_name[name].states == table.AUTHENTICATED
    for name in ("FETCH", "UID FETCH", "STORE", "COPY", "MOVE", "EXPUNGE", "UID EXPUNGE", "CLOSE", "CHECK"):
        assert by_name[name].states == table.SELECTED


@pytest.mark.parametrize("state", STATES, ids=lambda s: "-".join(k for k, v in s.items() if v) or "plain")
def test_every_advertised_capability_has_an_entry(state: dict[str, bool]) -> None:
    advertised = TABLE.capabilities(**state)
    declared = {e.capability for e in TABLE.extensions} | {c.capability for c in TABLE.commands if c.capability}
    assert advertised[0] == "IMAP4rev1"
    assert len(advertised) == len(set(advertised))
    assert set(advertised) <= declared


def test_every_declared_capability_is_advertised_somewhere() -> None:
    declared = {e.capability for e in TABLE.extensions} | {c.capability for c in TABLE.commands if c.capability}
    advertised = {capability for state in STATES for capability in TABLE.capabilities(**state)}
    assert advertised == declared


def test_capabilities_before_and_after_tls_and_login() -> None:
    """RFC 3501 §6.2: STARTTLS until TLS is on; LOGINDISABLED until login is allowed; AUTH= until login."""
    plain = set(TABLE.capabilities(authenticated=False, tls_active=False, tls_available=True, plaintext_login=False))
    assert {"STARTTLS", "LOGINDISABLED"} <= plain
    assert "AUTH=PLAIN" not in plain
    no_certificate = TABLE.capabilities(
        authenticated=False, tls_active=False, tls_available=False, plaintext_login=False
    )
    assert "STARTTLS" not in no_certificate
    tls = set(TABLE.capabilities(authenticated=False, tls_active=True, tls_available=True, plaintext_login=False))
    assert "AUTH=PLAIN" in tls
    assert not {"STARTTLS", "LOGINDISABLED"} & tls
    allowed = set(TABLE.capabilities(authenticated=False, tls_active=False, tls_available=True, plaintext_login=True))
    assert {"STARTTLS", "AUTH=PLAIN"} <= allowed
    assert "LOGINDISABLED" not in allowed
    logged_in = set(TABLE.capabilities(authenticated=True, tls_active=True, tls_available=True, plaintext_login=False))
    assert not {"AUTH=PLAIN", "LOGINDISABLED", "STARTTLS"} & logged_in
    for capability in ("IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE", "UIDPLUS", "MOVE",
                       "UNSELECT", "CHILDREN", "SPECIAL-USE", "LIST-EXTENDED", "QUOTA", "CONDSTORE"):  # fmt: skip
        assert capability in logged_in


def test_metric_labels_are_the_declared_names_and_other() -> None:
    assert TABLE.metric_labels == {c.name for c in TABLE.commands} | {"other"}
    assert TABLE.metric_label("UID FETCH") == "UID FETCH"
    assert TABLE.metric_label("X-ANYTHING-THE-CLIENT-SENDS") == "other"
