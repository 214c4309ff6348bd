"""IMAP SORT and THREAD (RFC 5256): the sort criteria parsed, base subjects extracted, messages sorted, and
threads built (ORDEREDSUBJECT and REFERENCES) and rendered.

Pure: mailnode.imap.commands.sort finds the messages (through SEARCH's evaluation), builds one `Fields`
per message with `fields` from its header values, and calls `sort`, `thread_orderedsubject` or
`thread_references`, then `format_threads`.
"""

from __future__ import annotations

import dataclasses
import email.utils
import re
from collections.abc import Callable, Iterable, Sequence

from mailnode.imap import mime, protocol
from mailnode.imap.protocol import Arg, ProtocolError

SORT_KEYS = frozenset({"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO"})
THREAD_ALGORITHMS = ("ORDEREDSUBJECT", "REFERENCES")
# The header fields `fields` reads (mailnode.imap.commands.sort reads them from the messages' header blocks).
HEADER_FIELDS = ("Subject", "Date", "From", "To", "Cc", "Message-ID", "In-Reply-To", "References")


@dataclasses.dataclass(frozen=True)
class Fields:
    """What SORT and THREAD know of one message."""

    seq: int
    uid: int
    size: int
    arrival: float  # the internal date, as a timestamp
    sent: float  # RFC 5256 §2.2: the Date header in UTC; the internal date when it is missing or unreadable
    subject: str  # the base subject (RFC 5256 §2.1), upper-cased (i;ascii-casemap)
    reply: bool  # the subject had a reply or forward marker (THREAD=REFERENCES step 5)
    from_: str  # the addr-mailbox of the first address, upper-cased; "" when there is none
    to: str
    cc: str
    message_id: str | None  # the msg-id, without its angle brackets; None when missing or unreadable
    references: tuple[str, ...]  # References' msg-ids, else the first of In-Reply-To's (RFC 5256 §3 step 1)


# -- base subject (RFC 5256 §2.1) ---------------------------------------------------------------------------

_BLOB = r"\[[^\[\]]*\][ \t]*"  # subj-blob = "[" *BLOBCHAR "]" *WSP
_LEADER = re.compile(rf"(?:(?:{_BLOB})*(?:re|fwd?)[ \t]*(?:{_BLOB})?:|[ \t]+)", re.IGNORECASE)
_LEADING_BLOB = re.compile(_BLOB)
_TRAILER = re.compile(r"(?:\(fwd\)|[ \t])\Z", re.IGNORECASE)
_SPACES = re.compile(r"[ \t\r\n]+")


def base_subject(subject: str) -> tuple[str, bool]:
    """The base subject (encoded words already decoded) upper-cased for i;ascii-casemap comparison, and
    whether reply or forward markers were removed (RFC 5256 §2.1 steps 1 to 6)."""
    text = _SPACES.sub(" ", subject)  # (1) whitespace and folding to one space
    reply = False
    while True:
        while (trailer := _TRAILER.search(text)) is not None:  # (2) trailing "(fwd)" and spaces
            reply |= trailer.group() != " " and trailer.group() != "\t"
            text = text[: trailer.start()]
        while True:  # (5) repeat (3) and (4) until neither removes anything
            before = text
            while (leader := _LEADER.match(text)) is not None and leader.end():  # (3) Re:, Fwd:, [blob] Re:
                reply |= leader.group().strip() != ""
                text = text[leader.end() :]
            blob = _LEADING_BLOB.match(text)  # (4) a leading [blob] unless nothing would remain
            if blob is not None and text[blob.end() :]:
                text = text[blob.end() :]
            if text == before:
                break
        upper = text.upper()
        if upper.startswith("[FWD:") and upper.endswith("]"):  # (6) [fwd: subject] and back to (2)
            text = text[5:-1]
            reply = True
            continue
        return _ascii_upper(text), reply


def _ascii_upper(text: str) -> str:
    """i;ascii-casemap (RFC 4790 §9.2): only a-z change case."""
    return text.translate(_UPPER)


_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")

# -- a message's fields -------------------------------------------------------------------------------------

_MSG_ID = re.compile(r"<([^<>\s]+)>")


def _first_mailbox(value: str | None) -> str:
    """The addr-mailbox of the first address in a list, upper-cased; "" when there is none. As Dovecot
    reads it: a group's first address is the group (its name), an address without a domain is its local
    part (MAILER-DAEMON)."""
    if not value:
        return ""
    text, separator = next(mime.split_address_list(value))
    if separator == ":":
        return _ascii_upper(text.strip().strip('"'))
    try:
        pairs = email.utils.getaddresses([text])
    except Exception:  # the email package on hostile input: no address, sorted first
        return ""
    address = next((address for _, address in pairs if address), "")
    return _ascii_upper(address.rpartition("@")[0] if "@" in address else address)


def _sent(value: str | None, arrival: float) -> float:
    if value:
        try:
            return email.utils.parsedate_to_datetime(value.split("\n")[0]).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            pass
    return arrival


def _message_ids(value: str | None) -> list[str]:
    return _MSG_ID.findall(value) if value else []


def fields(*, seq: int, uid: int, size: int, arrival: float, header: Callable[[str], str | None]) -> Fields:
    """A message's Fields, from `header` (a field's value, encoded words decoded, several occurrences joined
    with newlines; None when absent) for each of HEADER_FIELDS."""
    subject, reply = base_subject((header("Subject") or "").split("\n")[0])
    ids = _message_ids(header("Message-ID"))
    references = _message_ids(header("References")) or _message_ids(header("In-Reply-To"))[:1]
    return Fields(
        seq=seq,
        uid=uid,
        size=size,
        arrival=arrival,
        sent=_sent(header("Date"), arrival),
        subject=subject,
        reply=reply,
        from_=_first_mailbox(header("From")),
        to=_first_mailbox(header("To")),
        cc=_first_mailbox(header("Cc")),
        message_id=ids[0] if ids else None,
        references=tuple(references),
    )


# -- SORT -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SortRequest:
    criteria: tuple[tuple[str, bool], ...]  # (key, reversed), in order
    search: list[Arg]  # `CHARSET name key...`, as SEARCH takes it


def parse_sort(args: list[Arg]) -> SortRequest:
    """SORT (criteria) charset search-criteria (RFC 5256 §3)."""
    if len(args) < 3 or not isinstance(args[0], protocol.ParenList):
        raise ProtocolError("SORT needs (criteria), a charset and search criteria")
    words = [protocol.arg_atom(item).upper() for item in args[0].items]
    criteria: list[tuple[str, bool]] = []
    reverse = False
    for word in words:
        if word == "REVERSE" and not reverse:
            reverse = True
            continue
        if word not in SORT_KEYS:
            raise ProtocolError(f"unknown sort criterion {word[:32]}")
        criteria.append((word, reverse))
        reverse = False
    if reverse or not criteria:
        raise ProtocolError("REVERSE must precede a sort criterion")
    return SortRequest(tuple(criteria), [protocol.Atom("CHARSET"), *args[1:]])


def parse_thread(args: list[Arg]) -> tuple[str, list[Arg]]:
    """THREAD algorithm charset search-criteria (RFC 5256 §3): the algorithm and SEARCH's arguments."""
    if len(args) < 3:
        raise ProtocolError("THREAD needs an algorithm, a charset and search criteria")
    algorithm = protocol.arg_atom(args[0]).upper()
    if algorithm not in THREAD_ALGORITHMS:
        raise ProtocolError(f"unknown threading algorithm {algorithm[:32]}")
    return algorithm, [protocol.Atom("CHARSET"), *args[1:]]


def _key(message: Fields, criterion: str) -> float | str:
    match criterion:
        case "ARRIVAL":
            return message.arrival
        case "DATE":
            return message.sent
        case "SIZE":
            return message.size
        case "SUBJECT":
            return message.subject
        case "FROM":
            return message.from_
        case "TO":
            return message.to
        case _:
            return message.cc


def sort(messages: Iterable[Fields], criteria: Sequence[tuple[str, bool]]) -> list[Fields]:
    """The messages in the order the criteria give, ties in sequence number order (RFC 5256 §3); each
    criterion reversed on its own. Sorted by the last criterion first: Python's sort is stable."""
    ordered = sorted(messages, key=lambda m: m.seq)
    for criterion, reverse in reversed(criteria):
        ordered.sort(key=lambda m, c=criterion: _key(m, c), reverse=reverse)  # type: ignore[misc]
    return ordered


# -- THREAD -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Thread:
    """A node of a thread tree: a message, or a dummy (None) standing for one not in the result."""

    message: Fields | None
    children: list[Thread] = dataclasses.field(default_factory=list)
    parent: Thread | None = dataclasses.field(default=None, repr=False)

    def first(self) -> Fields | None:
        """The message of this node, or of its first child for a dummy."""
        node: Thread | None = self
        while node is not None and node.message is None:
            node = node.children[0] if node.children else None
        return node.message if node is not None else None

    def adopt(self, child: Thread) -> None:
        if child.parent is not None:
            child.parent.children.remove(child)
        child.parent = self
        self.children.append(child)

    def is_ancestor_of(self, other: Thread) -> bool:
        if not self.children:  # the common case, a new message: no walk up a long chain
            return other is self
        node: Thread | None = other
        while node is not None:
            if node is self:
                return True
            node = node.parent
        return False


def _sent_order(node: Thread) -> tuple[float, int]:
    message = node.first()
    return (message.sent, message.seq) if message is not None else (0.0, 0)


def _descendants(roots: Iterable[Thread]) -> list[Thread]:
    """Every node under the roots (roots included), each before its children: iterative, as a chain of
    replies is as deep as the mailbox is long."""
    out: list[Thread] = []
    stack = list(roots)
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children)
    return out


def _sort_tree(roots: list[Thread]) -> None:
    """RFC 5256 step 6: siblings by sent date (a dummy by its first child's, once those are sorted)."""
    for node in reversed(_descendants(roots)):
        node.children.sort(key=_sent_order)
    roots.sort(key=_sent_order)


def thread_orderedsubject(messages: Iterable[Fields]) -> list[Thread]:
    """ORDEREDSUBJECT (RFC 5256 §3): by base subject, then sent date; the first message of each subject is
    the parent of the others; threads in the order of their first message's sent date."""
    ordered = sorted(messages, key=lambda m: (m.subject, m.sent, m.seq))
    roots: list[Thread] = []
    for message in ordered:
        if roots and roots[-1].message is not None and roots[-1].message.subject == message.subject:
            roots[-1].adopt(Thread(message))
        else:
            roots.append(Thread(message))
    roots.sort(key=_sent_order)
    return roots


def thread_references(messages: Iterable[Fields]) -> list[Thread]:
    """REFERENCES (RFC 5256 §3, after Jamie Zawinski's algorithm): threads from Message-ID, References and
    In-Reply-To, dummies pruned, roots merged by base subject, siblings sorted by sent date."""
    by_id: dict[str, Thread] = {}
    every: list[Thread] = []
    for message in sorted(messages, key=lambda m: m.seq):
        # (1A) the message's container: a duplicate or missing Message-ID makes a container of its own.
        container = by_id.get(message.message_id) if message.message_id is not None else None
        if container is None or container.message is not None:
            container = Thread(message)
            every.append(container)
            if message.message_id is not None and message.message_id not in by_id:
                by_id[message.message_id] = container
        else:  # a dummy made for an earlier message's reference (already in `every`)
            container.message = message
        # (1B) link the references in order, never breaking a link nor making a loop.
        previous: Thread | None = None
        for reference in message.references:
            node = by_id.get(reference)
            if node is None:
                node = by_id[reference] = Thread(None)
                every.append(node)
            if previous is not None and node.parent is None and not node.is_ancestor_of(previous):
                previous.adopt(node)
            previous = node
        # (1C) the last reference is the parent: a parent found before is replaced (a truncated References).
        if previous is not None and previous is not container and not container.is_ancestor_of(previous):
            previous.adopt(container)
        elif previous is None and container.parent is not None:
            container.parent.children.remove(container)
            container.parent = None
    # (2) the root set; (4) dummies pruned.
    roots = _prune([node for node in every if node.parent is None])
    # (5) roots merged by base subject, in sent date order (as Dovecot does: which of two originals is
    # kept first is then the older): the table holds the root each subject gathers under.
    _sort_tree(roots)
    table: dict[str, Thread] = {}
    for root in roots:
        first = root.first()
        if first is None or not first.subject:
            continue
        current = table.get(first.subject)
        if current is None or _replaces(root, current):
            table[first.subject] = root
    dummies: list[Thread] = []
    for root in roots:
        first = root.first()
        if root.parent is not None or first is None or not first.subject:
            continue
        kept = table[first.subject]
        if kept is root:
            continue
        if kept.message is None and root.message is None:  # two dummies: one takes the other's children
            for child in list(root.children):
                kept.adopt(child)
        elif kept.message is None:  # a dummy takes the message
            kept.adopt(root)
        elif not kept.message.reply and root.message is not None and root.message.reply:
            kept.adopt(root)  # a reply goes under the original
        else:  # neither is the other's reply: siblings under a new dummy, which takes the table's place
            dummy = Thread(None)
            dummy.adopt(kept)
            dummy.adopt(root)
            table[first.subject] = dummy
            dummies.append(dummy)
    merged = [node for node in roots + dummies if node.parent is None and (node.message or node.children)]
    # (6) siblings by sent date.
    _sort_tree(merged)
    return merged


def _replaces(root: Thread, current: Thread) -> bool:
    """RFC 5256 step 5C: a dummy takes the subject from a message, and an original from a reply."""
    if current.message is None:
        return False
    return root.message is None or (current.message.reply and not root.message.reply)


def _prune(roots: list[Thread]) -> list[Thread]:
    """RFC 5256 step 4: a dummy without children goes; a dummy with children gives them its place, except
    at the root where it stays when it has several. Children before parents, so a promoted dummy's
    children are pruned already."""
    for node in reversed(_descendants(roots)):
        children: list[Thread] = []
        for child in node.children:
            children.extend([child] if child.message is not None else child.children)
        node.children = children
        for child in children:
            child.parent = node
    kept: list[Thread] = []
    for root in roots:
        if root.message is None and len(root.children) == 1:
            root.children[0].parent = None
            kept.append(root.children[0])
        elif root.message is not None or root.children:
            kept.append(root)
    return kept


def format_threads(roots: Sequence[Thread], *, uid: bool) -> str:
    """The THREAD response's data (RFC 5256 §4): `(3 6 (4 23)(44 7 96))`, UIDs for UID THREAD. A chain of
    single replies is one list; a message with several replies has each in a list of its own."""
    out: list[str] = []
    stack: list[str | Thread] = []
    for root in reversed(roots):
        stack += [")", root, "("]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
            continue
        numbers: list[str] = []
        node = item
        while True:
            if node.message is not None:
                numbers.append(str(node.message.uid if uid else node.message.seq))
            if len(node.children) != 1:
                break
            node = node.children[0]
        out.append(" ".join(numbers) + (" " if numbers and node.children else ""))
        for child in reversed(node.children):
            stack += [")", child, "("]
    return "".join(out)
