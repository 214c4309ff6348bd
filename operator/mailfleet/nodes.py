"""What the operator asks the mail nodes over their HTTP port (8080; the nodes' NetworkPolicy admits the
operator's pods, labelled app.kubernetes.io/name: mailfleet-operator, from the operator's namespace): each
mailbox's usage, for the Mailbox status (reconcile/usage.py); the checkpoint and the archives a MailBackup
takes (reconcile/backup.py) and retention deletes (reconcile/schedule.py; the endpoints are
docs/backups.md's); the steps of a mailbox move (moving.py). Requests and answers are the models of
mailwire.admin, the ones the node answers with. Every request carries the domain's internal token (`token`:
its `<maildomain>-internal` Secret, read by the caller), which the node requires of every change."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from typing import Any, Final, TypeVar

import aiohttp
import pydantic

from mailwire import admin

# Where node <ordinal> of a MailDomain answers, inside the cluster: the pod's name in its headless Service.
IN_CLUSTER: Final = "http://{pod}.{service}.{namespace}.svc:8080"

TIMEOUT: Final = aiohttp.ClientTimeout(total=10)
# POST /snapshot waits for the writes in flight (at most 30 s on the node) before it answers.
SNAPSHOT_TIMEOUT: Final = aiohttp.ClientTimeout(total=45)
# POST .../freeze answers once the mailbox's IMAP sessions ended (a few seconds at most on the node).
FREEZE_TIMEOUT: Final = aiohttp.ClientTimeout(total=45)
# POST /moves answers once the target holds the copy: a mailbox of a few GiB streams for minutes.
COPY_TIMEOUT: Final = aiohttp.ClientTimeout(total=3600, sock_read=600)


# What the reconcilers read, by their names here.
Usage = admin.MailboxUsage
Checkpoint = admin.Checkpoint  # writes are paused, the node's volume holds `point_in_time`
Archive = admin.Archive

Answer = TypeVar("Answer", bound=admin.Message)


class NodeError(Exception):
    """A node that could not be asked (not running yet, unreachable, or an answer that makes no sense).
    `status` is the HTTP status of a refusal, None when there was no answer."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def lasting(self) -> bool:
        """A refusal that asking again will not change (4xx other than 409, which a checkpoint in
        progress answers and which ends with its hold)."""
        return self.status is not None and 400 <= self.status < 500 and self.status != 409


def url(template: str, *, namespace: str, name: str, ordinal: int = 0) -> str:
    """Node `ordinal` of MailDomain `name`: {pod} is <name>-<ordinal>, {ordinal} the number alone."""
    return template.format(
        pod=f"{name}-{ordinal}", ordinal=ordinal, service=f"{name}-headless", namespace=namespace, name=name
    )


async def _ask(
    session: aiohttp.ClientSession,
    method: str,
    endpoint: str,
    *,
    token: str,
    params: Mapping[str, str] | None = None,
    body: admin.Message | None = None,
    ok: tuple[int, ...] = (200,),
    time_limit: aiohttp.ClientTimeout = TIMEOUT,
) -> tuple[int, Any]:
    """(status, JSON answer) of one request; NodeError with the node's {"error"} for any other status."""
    what = f"{method} {endpoint}"
    try:
        json_body = None if body is None else body.to_json()
        headers = {"Authorization": f"Bearer {token}"}  # RFC 6750 §2.1
        async with session.request(
            method, endpoint, params=params, json=json_body, headers=headers, timeout=time_limit
        ) as response:
            text = await response.text()
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as error:
        raise NodeError(f"{what}: {error or type(error).__name__}") from error
    try:
        data: Any = json.loads(text) if text else {}
    except ValueError:
        data = {}
    if status not in ok:
        detail = data.get("error") if isinstance(data, dict) else None
        raise NodeError(f"{what}: HTTP {status}: {detail or text.strip()[:200]}", status=status)
    if not isinstance(data, dict):
        raise NodeError(f"{what}: unexpected answer {text[:200]!r}")
    return status, data


def _read(model: type[Answer], what: str, data: Mapping[str, Any]) -> Answer:
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as error:
        raise NodeError(f"{what}: unexpected answer ({admin.problem(error)})") from error


async def usage(session: aiohttp.ClientSession, base: str, *, token: str) -> dict[str, Usage]:
    """GET <base>/usage: address -> usage, for every mailbox in the node's directory."""
    endpoint = f"{base.rstrip('/')}/usage"
    _, data = await _ask(session, "GET", endpoint, token=token)
    return _read(admin.Usage, f"GET {endpoint}", data).mailboxes


async def checkpoint(session: aiohttp.ClientSession, base: str, *, token: str, hold: int) -> Checkpoint:
    """POST <base>/snapshot?hold=<hold>: the node pauses writes (until `resume` or the hold runs out)."""
    endpoint = f"{base.rstrip('/')}/snapshot"
    _, data = await _ask(
        session, "POST", endpoint, token=token, params={"hold": str(hold)}, time_limit=SNAPSHOT_TIMEOUT
    )
    return _read(admin.Checkpoint, f"POST {endpoint}", data)


async def resume(session: aiohttp.ClientSession, base: str, *, token: str) -> float | None:
    """DELETE <base>/snapshot: writes resume. The seconds they were paused, or None when the node held
    no checkpoint (409: the hold ran out, or the node restarted)."""
    endpoint = f"{base.rstrip('/')}/snapshot"
    status, data = await _ask(session, "DELETE", endpoint, token=token, ok=(200, 409))
    if status == 409:
        return None
    return _read(admin.Resumed, f"DELETE {endpoint}", data).paused_seconds


async def start_archive(session: aiohttp.ClientSession, base: str, name: str, *, token: str) -> Archive:
    """POST <base>/backups {"name"}: the node writes the archive in the background. Posting a name again
    returns its record, so this is safe to repeat."""
    endpoint = f"{base.rstrip('/')}/backups"
    _, data = await _ask(
        session, "POST", endpoint, token=token, body=admin.BackupRequest(name=name), ok=(200, 201, 202)
    )
    return _read(admin.Archive, f"POST {endpoint}", data)


async def delete_archive(session: aiohttp.ClientSession, base: str, name: str, *, token: str) -> bool:
    """DELETE <base>/backups/<name>: the node removes the archive file. False when the node knows no such
    archive (deleted already); NodeError when it cannot (409 while it is being written)."""
    status, _ = await _ask(session, "DELETE", f"{base.rstrip('/')}/backups/{name}", token=token, ok=(200, 404))
    return status == 200


async def archive(session: aiohttp.ClientSession, base: str, name: str, *, token: str) -> Archive | None:
    """GET <base>/backups/<name>: the archive's record, or None when the node knows no such name."""
    endpoint = f"{base.rstrip('/')}/backups/{name}"
    status, data = await _ask(session, "GET", endpoint, token=token, ok=(200, 404))
    if status == 404:
        return None
    return _read(admin.Archive, f"GET {endpoint}", data)


def _mailbox(base: str, address: str, *rest: str) -> str:
    """<base>/mailboxes/<address>[/rest]: the address percent-encoded as one path segment."""
    return "/".join([base.rstrip("/"), "mailboxes", urllib.parse.quote(address, safe="@"), *rest])


async def copy_mailbox(
    session: aiohttp.ClientSession, base: str, address: str, *, token: str, source: int, final: bool
) -> admin.MoveCopied:
    """POST <base>/moves/<address> on a move's target: it pulls the mailbox from node `source` (final: the
    catch-up under the source's freeze). Repeating it fetches only what the target does not hold."""
    endpoint = f"{base.rstrip('/')}/moves/{urllib.parse.quote(address, safe='@')}"
    body = admin.MoveCopy(source=source, final=final)
    _, data = await _ask(session, "POST", endpoint, token=token, body=body, time_limit=COPY_TIMEOUT)
    return _read(admin.MoveCopied, f"POST {endpoint}", data)


async def freeze(
    session: aiohttp.ClientSession, base: str, address: str, *, token: str, hold_seconds: float
) -> admin.Frozen:
    """POST <base>/mailboxes/<address>/freeze on a move's source: the mailbox holds still until the thaw or
    `hold_seconds` from now (asking again extends the hold)."""
    endpoint = _mailbox(base, address, "freeze")
    body = admin.Freeze(hold_seconds=hold_seconds)
    _, data = await _ask(session, "POST", endpoint, token=token, body=body, time_limit=FREEZE_TIMEOUT)
    return _read(admin.Frozen, f"POST {endpoint}", data)


async def thaw(session: aiohttp.ClientSession, base: str, address: str, *, token: str) -> admin.Thawed | None:
    """DELETE <base>/mailboxes/<address>/freeze: the mailbox takes mail again. None when it was not frozen
    (409: thawed already, its hold ran out, or the node restarted)."""
    endpoint = _mailbox(base, address, "freeze")
    status, data = await _ask(session, "DELETE", endpoint, token=token, ok=(200, 409))
    if status == 409:
        return None
    return _read(admin.Thawed, f"DELETE {endpoint}", data)


async def set_home(session: aiohttp.ClientSession, base: str, address: str, *, token: str, home: int) -> admin.HomeSet:
    """PUT <base>/mailboxes/<address>/home: the node takes `home` as the mailbox's home at once (before its
    directory file says so)."""
    endpoint = _mailbox(base, address, "home")
    _, data = await _ask(session, "PUT", endpoint, token=token, body=admin.HomeOverride(home=home))
    return _read(admin.HomeSet, f"PUT {endpoint}", data)


async def drop_mailbox(session: aiohttp.ClientSession, base: str, address: str, *, token: str) -> admin.Dropped | None:
    """DELETE <base>/mailboxes/<address>: the node deletes its copy of a mailbox homed elsewhere. None when
    it held none (404: dropped already); NodeError 409 when the node is the mailbox's home."""
    endpoint = _mailbox(base, address)
    status, data = await _ask(session, "DELETE", endpoint, token=token, ok=(200, 404))
    if status == 404:
        return None
    return _read(admin.Dropped, f"DELETE {endpoint}", data)
