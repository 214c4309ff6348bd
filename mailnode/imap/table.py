"""What declaring an IMAP command means, and what is derived from the declarations: dispatch by
session state, the CAPABILITY list for each state, and the bounded metric labels.

The declarations themselves are one table, mailnode.imap.commands.TABLE; the session dispatches
through it. Pure (no I/O): the session type is a parameter, so this module sits below it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Generic, TypeVar

from mailnode.imap import protocol, responses

S = TypeVar("S")

# A command's handler answers it (tagged response included); False ends the session (LOGOUT).
Handler = Callable[[S, protocol.Command], Awaitable[bool | None]]


class State(enum.Enum):
    """RFC 3501 §3: the session states in which commands are valid (LOGOUT is never one)."""

    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"


ANY_STATE = frozenset(State)
NOT_AUTHENTICATED = frozenset({State.NOT_AUTHENTICATED})
AUTHENTICATED = frozenset({State.AUTHENTICATED, State.SELECTED})  # RFC 3501 §6.3: also valid when selected
SELECTED = frozenset({State.SELECTED})


class When(enum.Enum):
    """When a capability is advertised."""

    ALWAYS = "always"
    STARTTLS_OFFERED = "a certificate is configured and TLS is not active yet"
    LOGIN_ALLOWED = "not authenticated, and TLS is active or plaintext login is allowed"
    LOGIN_DISABLED = "not authenticated, TLS is not active and plaintext login is refused"  # RFC 3501 §6.2.3


@dataclasses.dataclass(frozen=True)
class Command(Generic[S]):
    """One command: its name (`UID FETCH` for the UID form), the states it is valid in, the code
    that answers it, the capability it brings (None: part of IMAP4rev1) and where it is specified."""

    name: str
    states: frozenset[State]
    handler: Handler[S]
    rfc: str
    capability: str | None = None
    advertised: When = When.ALWAYS


@dataclasses.dataclass(frozen=True)
class Extension:
    """A capability no command of its own brings: syntax (LITERAL+), response data (CHILDREN),
    arguments of existing commands (CONDSTORE), or a state of the server (LOGINDISABLED).

    `includes`: the capabilities it takes in as its own (IMAP4rev2 those RFC 9051 folded into the base
    protocol); the table refuses to declare it unless each of them is declared and always advertised."""

    capability: str
    rfc: str
    advertised: When = When.ALWAYS
    includes: tuple[str, ...] = ()


OTHER = "other"  # the metric label of every command not in the table


@dataclasses.dataclass(frozen=True)
class Table(Generic[S]):
    """Every command and extension the server has, each declared once."""

    extensions: Sequence[Extension]
    commands: Sequence[Command[S]]

    def __post_init__(self) -> None:
        names = [command.name for command in self.commands]
        duplicates = {name for name in names if names.count(name) > 1}
        if duplicates:
            raise ValueError(f"IMAP commands declared twice: {sorted(duplicates)}")
        always = {capability for capability, when in self._declared() if when is When.ALWAYS}
        for extension in self.extensions:
            missing = [capability for capability in extension.includes if capability not in always]
            if missing:
                raise ValueError(f"{extension.capability} includes capabilities not always advertised: {missing}")

    def _declared(self) -> list[tuple[str, When]]:
        """Every capability declared, with when it is advertised: extensions first, then the commands'."""
        return [(e.capability, e.advertised) for e in self.extensions] + [
            (c.capability, c.advertised) for c in self.commands if c.capability is not None
        ]

    @functools.cached_property
    def by_name(self) -> Mapping[str, Command[S]]:
        return {command.name: command for command in self.commands}

    def dispatch(self, name: str, state: State) -> Command[S]:
        """The command to run, or a BAD saying why it cannot run in this state."""
        command = self.by_name.get(name)
        if command is None:
            raise responses.Refused(responses.BAD_UNKNOWN_COMMAND, command=name[:40])
        if state in command.states:
            return command
        if State.NOT_AUTHENTICATED in command.states:
            raise responses.Refused(responses.BAD_AUTHENTICATED, command=name)
        if State.AUTHENTICATED in command.states:
            raise responses.Refused(responses.BAD_NOT_AUTHENTICATED, command=name)
        raise responses.Refused(responses.BAD_NOT_SELECTED, command=name)

    def capabilities(
        self, *, authenticated: bool, tls_active: bool, tls_available: bool, plaintext_login: bool
    ) -> list[str]:
        """The CAPABILITY list (RFC 3501 §7.2.1) for a session in this state: extensions first
        (IMAP4rev1 and IMAP4rev2 lead), then what the commands bring, each once, in declaration order."""
        login_allowed = tls_active or plaintext_login
        holds = {
            When.ALWAYS: True,
            When.STARTTLS_OFFERED: tls_available and not tls_active,
            When.LOGIN_ALLOWED: not authenticated and login_allowed,
            When.LOGIN_DISABLED: not authenticated and not login_allowed,
        }
        return list(dict.fromkeys(capability for capability, when in self._declared() if holds[when]))

    @functools.cached_property
    def metric_labels(self) -> frozenset[str]:
        """Every value the `command` label of mailnode_imap_commands_total can take (bounded)."""
        return frozenset(self.by_name) | {OTHER}

    def metric_label(self, name: str) -> str:
        return name if name in self.by_name else OTHER
