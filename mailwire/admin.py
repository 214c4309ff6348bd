"""The JSON of the node's admin HTTP endpoints (port 8080; mailnode.admin.http serves them), one model per
request and answer, every key snake_case. The operator's mailfleet.nodes and `mailnode queue|backup|restore`
parse the answers with these models, and tests/operator/fakenode.py answers with them.

    GET    /status              Status
    GET    /usage               Usage
    GET    /queue               [QueuedMessage]       (QUEUE reads the list)
    POST   /queue/{id}/retry    QueuedMessage
    DELETE /queue/{id}          QueuedMessage
    POST   /snapshot?hold=S     Checkpoint
    DELETE /snapshot            Resumed
    POST   /backups             BackupRequest -> Archive
    GET    /backups/{name}      Archive
    DELETE /backups/{name}      DeletedArchive
    GET    /backup              a tar stream; its headers are the *_HEADER names
    POST   /restore             RestoreRequest -> Restored
    mailbox moves (clustering; docs/architecture.md "Moving a mailbox"), each with the internal token:
    POST   /moves/{address}              MoveCopy -> MoveCopied     (the target pulls from the source)
    GET    /mailboxes/{address}/export   a tar stream of the mailbox (the source; node to node)
    POST   /mailboxes/{address}/freeze   Freeze -> Frozen           (the source)
    DELETE /mailboxes/{address}/freeze   Thawed                     (the source)
    PUT    /mailboxes/{address}/home     HomeOverride -> HomeSet    (every node)
    DELETE /mailboxes/{address}          Dropped  (a copy not homed here; 409 when the node is its home)
    any refusal (4xx, 5xx)      Error

Answers ignore keys they do not know, so a node may add a field before every reader knows it. The archive
file's own JSON (mailfleet-backup.json, MANIFEST.json) is a file format, mailnode.backup.archive's.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import pydantic

from mailwire.config import DomainConfig
from mailwire.fields import Timestamp


class Message(pydantic.BaseModel):
    """A request or an answer of the admin port."""

    model_config = pydantic.ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    def to_json(self) -> dict[str, Any]:
        """The JSON object sent over HTTP (aliases, such as RestoreRequest's `as`, by their wire name)."""
        return self.model_dump(mode="json", by_alias=True)


class Error(Message):
    """Every refusal: a 4xx or 5xx status with what is wrong."""

    error: str


def problem(error: pydantic.ValidationError) -> str:
    """A request or an answer that does not fit its model, in one line: "field: reason; ..."."""
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        reason = item["msg"].removeprefix("Value error, ")  # the model's own words, from a ValueError
        problems.append(f"{where}: {reason}" if where else reason)
    return "; ".join(problems)


# -- GET /status ------------------------------------------------------------------------------------------


class DirectoryStatus(Message):
    version: str
    mailboxes: int
    last_error: str | None  # why the last reload failed (the node keeps the last good directory)


class StoreStatus(Message):
    bytes: int
    messages: int


class QueueStatus(Message):
    messages: int
    oldest_age_seconds: float


class DNSRecord(Message):
    """A record to publish for a domain (its DKIM key)."""

    type: str
    name: str
    value: str


class BackupResult(Message):
    """The last archive a node finished, either way; name None: streamed by GET /backup."""

    name: str | None
    state: Literal["Completed", "Failed"]
    completed_at: Timestamp
    point_in_time: Timestamp | None
    bytes: int | None
    error: str | None


class BackupStatus(Message):
    paused: bool  # writes are paused (a checkpoint holds them, or an archive is being staged)
    hold_until: Timestamp | None  # when a POST /snapshot's hold runs out
    last: BackupResult | None


class TLSStatus(Message):
    """The certificate a node shows new connections (mailnode.tls reloads it when the files change)."""

    subject: str  # RFC 4514
    not_after: Timestamp
    last_error: str | None  # why the last changed pair was refused (the node keeps the last good one)


class Status(Message):
    node: str
    hostname: str
    ready: bool
    uptime_seconds: float
    domains: list[DomainConfig]
    listeners: dict[str, int]  # listener name -> bound port
    directory: DirectoryStatus
    store: StoreStatus
    dns_records: list[DNSRecord]
    queue: QueueStatus
    backup: BackupStatus
    tls: TLSStatus | None = None  # None: no certificate configured


# -- GET /usage -------------------------------------------------------------------------------------------


class MailboxUsage(Message):
    bytes: int
    messages: int


class Usage(Message):
    """Each mailbox of the node's directory (by address) with what it keeps; the operator copies them into
    Mailbox status.usedBytes and status.messages."""

    mailboxes: dict[str, MailboxUsage]


# -- /queue -----------------------------------------------------------------------------------------------


class QueuedRecipient(Message):
    address: str
    state: Literal["pending", "delivered", "failed"]
    attempts: int
    last_error: str
    next_attempt: Timestamp | None  # None once the recipient is no longer pending
    home: int | None = None  # a hand-off to the mailbox's home node (clustering): its ordinal


class QueuedMessage(Message):
    id: str
    sender: str  # "" for the null sender (bounces)
    created: Timestamp
    age_seconds: float
    size: int
    recipients: list[QueuedRecipient]


QUEUE: Final = pydantic.TypeAdapter(list[QueuedMessage])  # GET /queue: the messages, oldest first


def _was(camel: str, snake: str) -> Any:
    """A key that nodes built before mailwire wrote in camelCase: read either spelling, so an operator
    upgraded before its nodes (the StatefulSet rolls them one by one) still understands the old ones.
    Written snake_case only."""
    return pydantic.Field(validation_alias=pydantic.AliasChoices(snake, camel))


# -- /snapshot --------------------------------------------------------------------------------------------


class Checkpoint(Message):
    """POST /snapshot: writes are paused and every index checkpointed; the volume holds `point_in_time`
    until DELETE /snapshot or `hold_until`."""

    point_in_time: Timestamp = _was("pointInTime", "point_in_time")
    hold_until: Timestamp = _was("holdUntil", "hold_until")
    mailboxes: int
    messages: int
    queued: int


class Resumed(Message):
    """DELETE /snapshot: writes resumed after `paused_seconds`."""

    paused_seconds: float = _was("pausedSeconds", "paused_seconds")


# -- /backups ---------------------------------------------------------------------------------------------


class BackupRequest(Message):
    """POST /backups: write <backup dir>/<name>.tar. The name is a lower-case RFC 1123 subdomain of at most
    253 characters (the operator uses the MailBackup's name); the node refuses any other with 400."""

    name: str


class Archive(Message):
    """A node's record of an archive (POST /backups, GET /backups/{name})."""

    name: str
    state: Literal["Running", "Completed", "Failed"]
    path: str
    point_in_time: Timestamp | None = pydantic.Field(
        None,
        validation_alias=pydantic.AliasChoices("point_in_time", "pointInTime"),  # as _was
    )
    mailboxes: int | None = None
    messages: int | None = None
    bytes: int | None = None  # the archive file's size, once written
    error: str | None = None


class DeletedArchive(Archive):
    """DELETE /backups/{name}: the record of the archive just removed."""

    deleted: bool = True


# -- GET /backup, POST /restore ---------------------------------------------------------------------------

NODE_HEADER: Final = "X-Mailfleet-Node"
POINT_IN_TIME_HEADER: Final = "X-Mailfleet-Point-In-Time"
MESSAGES_HEADER: Final = "X-Mailfleet-Messages"
BYTES_HEADER: Final = "X-Mailfleet-Bytes"  # of the staged files, before tar headers


class RestoreRequest(Message):
    """POST /restore: mailbox `mailbox` of the archive file `archive` (a path in the node's file system)
    into mailbox `as` of the node (default: the same address)."""

    archive: str
    mailbox: str
    # `as` is a Python keyword: the field is as_, its key in the JSON "as".
    as_: str | None = pydantic.Field(None, alias="as")

    @pydantic.model_validator(mode="before")
    @classmethod
    def _strings(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("archive", "mailbox"):
                if not isinstance(data.get(key), str) or not data[key]:
                    raise ValueError(f"{key!r} must be a non-empty string")
            target = data.get("as", data.get("as_"))
            if target is not None and not isinstance(target, str):
                raise ValueError("'as' must be a string")
        return data

    @property
    def target(self) -> str:
        return self.as_ or self.mailbox


class Restored(Message):
    mailbox: str
    restored: int  # messages written
    skipped: int  # messages the mailbox held already
    dav_restored: int = 0  # calendar and contact files written (mailnode.store.davfiles.merge)
    dav_kept: int = 0  # those the mailbox held already, kept as they were


# -- mailbox moves ----------------------------------------------------------------------------------------
# A move of one mailbox from node `source` to node `target` (ordinals of one MailDomain), driven by the
# operator step by step; every step can be asked again (after an operator or node restart) and answers
# the same:
#   1. POST /moves/{address} on the target, final=False: the target pulls the mailbox from the source
#      (GET /mailboxes/{address}/export) as it is: folders, UIDVALIDITY, UIDs, UIDNEXT, flags, keywords,
#      modseqs, internal dates, subscriptions, special-use; what it holds already is not fetched again.
#      The copy is kept aside, not served, until the target is the mailbox's home.
#   2. POST /mailboxes/{address}/freeze on the source: new mail for the mailbox waits in the queues (4xx
#      to hand-offs and to its own delivery, which queues it), its IMAP sessions end with
#      `BYE [UNAVAILABLE]`, new logins get `NO [UNAVAILABLE]`; the freeze ends by itself at `hold_until`.
#   3. POST /moves/{address} on the target, final=True: the catch-up under the freeze (the index as it
#      is now, and the messages the first copy did not have); the copy is then complete.
#   4. PUT /mailboxes/{address}/home on every node, after the operator wrote the directory with the new
#      home: each node takes the new home at once (kept on its volume until its directory file says
#      the same), without waiting for the directory file to reach it.
#   5. DELETE /mailboxes/{address}/freeze on the source: what waited is handed to the new home.
#   6. DELETE /mailboxes/{address} on the source once every node answered step 4: the old copy goes.
# A move given up before step 4 thaws the source and deletes the target's copy (DELETE on the target).


class MoveCopy(Message):
    """POST /moves/{address} on the target: copy the mailbox from node `source`."""

    source: int = pydantic.Field(ge=0)
    final: bool = False  # the catch-up under the source's freeze: afterwards the copy is complete


class MoveCopied(Message):
    mailbox: str
    messages: int  # what the target's copy holds now
    bytes: int
    fetched_messages: int  # what this request fetched from the source
    fetched_bytes: int
    seconds: float


class Freeze(Message):
    """POST /mailboxes/{address}/freeze on the source: hold the mailbox still for `hold_seconds`."""

    hold_seconds: float = pydantic.Field(60.0, gt=0, le=600)


class Frozen(Message):
    mailbox: str
    hold_until: Timestamp
    sessions_closed: int  # IMAP sessions ended with BYE [UNAVAILABLE]


class Thawed(Message):
    mailbox: str
    frozen_seconds: float


class HomeOverride(Message):
    """PUT /mailboxes/{address}/home: the mailbox's home is now node `home`."""

    home: int = pydantic.Field(ge=0)


class HomeSet(Message):
    mailbox: str
    home: int


class Dropped(Message):
    """DELETE /mailboxes/{address}: the copy this node kept of a mailbox homed elsewhere is gone."""

    mailbox: str
    messages: int
    bytes: int
