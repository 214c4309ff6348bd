"""MailDomain: observe -> check -> build -> apply -> status, for one domain and all of its Mailboxes.

One reconcile of a domain does everything the domain's objects depend on, so it is the one thing the
work queue coalesces: the directory Secret is written once per reconcile however many Mailboxes changed,
and each Mailbox's status is written only when it changes.

Order matters for "nothing half-built": everything that can refuse the domain (its spec, the Secrets it
names, a change Kubernetes would refuse) is checked before the first object is written. A Mailbox that
cannot be served (its Secret is missing, its address is taken) is left out of the directory and told so
in its own status; it does not hold back the others.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import time
from collections.abc import Mapping
from typing import Any, Final

import pydantic

from mailfleet import api, k8s, keys, specs
from mailfleet.reconcile import conditions
from mailfleet.reconcile.conditions import Condition
from mailfleet.reconcile.context import (
    MAILBACKUP,
    MAILBOX,
    MAILDOMAIN,
    PERSISTENTVOLUMECLAIM,
    SECRET,
    STATEFULSET,
    VOLUMESNAPSHOT,
    Context,
    DomainKey,
)
from mailfleet.reconcile.passwords import is_hash
from mailfleet.specs import backup as backup_specs

log = logging.getLogger(__name__)

# A Secret holds at most 1 MiB of data (the API server refuses more).
SECRET_LIMIT: Final = 1024 * 1024
# Above this many distinct password Secrets a reconcile lists the namespace's Secrets once instead of
# reading each one.
LIST_SECRETS_ABOVE: Final = 20
STATUS_WRITES: Final = 16  # concurrent Mailbox status writes
# Conditions of the MailDomain written by reconcile/schedule.py (as status.lastBackup is), not here.
SCHEDULE_CONDITIONS: Final = ("BackupsHealthy",)


class Refused(Exception):
    """The domain cannot be built as specified; `reason` and `message` go into its conditions."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


@dataclasses.dataclass
class MailboxVerdict:
    body: Mapping[str, Any]
    condition: Condition


@dataclasses.dataclass
class Mailboxes:
    accepted: list[api.Mailbox]
    passwords: dict[str, str]  # "secretName/key" -> argon2 hash
    verdicts: list[MailboxVerdict]


async def reconcile(ctx: Context, key: DomainKey) -> None:
    """Reconcile the MailDomain `key` (the work queue's job). Raises on API errors, so the queue retries."""
    namespace, name = key
    started = time.monotonic()
    result = "error"
    try:
        body = await ctx.client.get(MAILDOMAIN, namespace, name)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            await _gone(ctx, key)
            result = "ok"
            return
        try:
            await _reconcile(ctx, body)
            result = "ok"
        except Refused as refusal:
            result = "refused"
            await _refused(ctx, body, refusal)
    except asyncio.CancelledError:
        result = "cancelled"  # the operator is stopping
        raise
    finally:
        ctx.metrics.reconciles.labels("MailDomain", result).inc()
        ctx.metrics.duration.labels("MailDomain").observe(time.monotonic() - started)


def _parse(body: Mapping[str, Any]) -> api.MailDomain:
    try:
        return api.MailDomain.model_validate(body)
    except pydantic.ValidationError as error:
        raise Refused("InvalidSpec", api.validation_message(error)) from error


async def _secret(ctx: Context, namespace: str, name: str) -> dict[str, str] | None:
    obj = await ctx.client.get(SECRET, namespace, name)
    if obj is None:
        return None
    return {key: value.decode("utf-8", "replace") for key, value in k8s.secret_values(obj).items()}


async def _reconcile(ctx: Context, body: Mapping[str, Any]) -> None:
    domain = _parse(body)
    namespace, name = specs.common.namespace(domain), domain.metadata.name
    ctx.served[(namespace, name)] = specs.node.domains_of(domain)
    if (problem := specs.common.unsupported(domain)) is not None:
        raise Refused("Unsupported", problem)

    # Everything the domain names must exist before anything is built.
    if domain.spec.tls is not None:
        tls = await _secret(ctx, namespace, domain.spec.tls.secret_name)
        if tls is None:
            raise Refused(
                "TLSSecretNotFound",
                f"Secret {domain.spec.tls.secret_name} (spec.tls.secretName) does not exist in namespace {namespace}",
            )
        if missing := [k for k in ("tls.crt", "tls.key") if not tls.get(k)]:
            raise Refused(
                "TLSSecretInvalid",
                f"Secret {domain.spec.tls.secret_name} (spec.tls.secretName) has no {' or '.join(missing)}",
            )
    relay_username = None
    relay_ref = domain.spec.smtp.relay_secret_ref
    if domain.spec.smtp.relay_host is not None and relay_ref is not None:
        relay = await _secret(ctx, namespace, relay_ref.name)
        if relay is None:
            raise Refused(
                "RelaySecretNotFound",
                f"Secret {relay_ref.name} (spec.smtp.relaySecretRef) does not exist in namespace {namespace}",
            )
        if not relay.get("password"):
            raise Refused("RelaySecretInvalid", f"Secret {relay_ref.name} (spec.smtp.relaySecretRef) has no password")
        relay_username = relay.get("username") or None
    statefulset_before = await ctx.client.get(STATEFULSET, namespace, specs.common.statefulset_name(domain))
    restore_claims: list[dict[str, Any]] = []
    if statefulset_before is None and domain.spec.restore is not None:
        restore_claims = await _restore_claims(ctx, domain)

    mailboxes = await _mailboxes(ctx, domain)
    objects = specs.render(
        domain, mailboxes.accepted, mailboxes.passwords, image=ctx.image, relay_username=relay_username
    )
    objects = [specs.with_owner(obj, domain) for obj in objects]
    directory = next(o for o in objects if o["metadata"]["name"] == specs.common.directory_name(domain))
    size = sum(len(value) for value in k8s.secret_values(directory).values())
    if size > SECRET_LIMIT:
        raise Refused(
            "DirectoryTooLarge",
            f"the directory of {len(mailboxes.accepted)} mailboxes is {size} bytes; a Secret holds at most "
            f"{SECRET_LIMIT} (split the mailboxes across MailDomains)",
        )
    statefulset = objects[-1]
    if statefulset_before is not None and (why := k8s.immutable_change(statefulset_before, statefulset)):
        raise Refused("ImmutableFieldChanged", why)

    # Build: the DKIM key first (made once, kept in its Secret), then the objects in apply order.
    dkim_record = None
    if domain.spec.dkim is not None:
        dkim_record = await _dkim(ctx, domain, body)
    at = conditions.now()
    spec_unchanged = (body.get("status") or {}).get("observedGeneration") == domain.metadata.generation
    for claim in restore_claims:  # before the StatefulSet, which then finds its claims made
        await _create_restore_claim(ctx, body, claim)
    for obj in objects:
        applied, result = await k8s.apply(ctx.client, obj)
        if obj is statefulset:
            statefulset = result
        if applied is k8s.Applied.UNCHANGED:
            continue
        ctx.metrics.applied.labels(obj["kind"], applied.value).inc()
        what = f"{obj['kind']} {obj['metadata']['name']}"
        if obj is directory:
            message = f"{what}: {len(mailboxes.accepted)} mailboxes"
            await ctx.recorder.event(body, "DirectoryUpdated", message, at=at)
        elif applied is k8s.Applied.CREATED and not spec_unchanged:
            await ctx.recorder.event(body, "Created", f"created {what}", at=at)
        elif spec_unchanged:  # the spec did not change, yet the object had to: it was deleted or edited
            await ctx.recorder.event(body, "Repaired", f"{what} was changed outside the operator; put back", at=at)
        else:
            await ctx.recorder.event(body, "Updated", f"updated {what}", at=at)
    ctx.owned[(namespace, name)] = collections.Counter(
        [obj["kind"] for obj in objects] + (["Secret"] if dkim_record is not None else [])
    )

    await _write_domain_status(ctx, body, domain, statefulset, len(mailboxes.accepted), dkim_record)
    await _write_mailbox_statuses(ctx, mailboxes.verdicts)


async def _restore_claims(ctx: Context, domain: api.MailDomain) -> list[dict[str, Any]]:
    """The node claims to make from spec.restore.backupName's VolumeSnapshots before the StatefulSet
    exists (docs/backups.md, Restore), or Refused when they cannot be. None when they were made already
    (the StatefulSet was deleted since): the backup may be gone by now, and is not needed."""
    assert domain.spec.restore is not None
    namespace, name = specs.common.namespace(domain), domain.spec.restore.backup_name
    missing = []
    for ordinal in range(domain.spec.replicas):
        claim = backup_specs.restore_claim(domain, name, ordinal)
        source, claim_name = claim["spec"]["dataSource"], claim["metadata"]["name"]
        existing = await ctx.client.get(PERSISTENTVOLUMECLAIM, namespace, claim_name)
        if existing is None:
            missing.append(claim)
        elif not _same_source((existing.get("spec") or {}).get("dataSource"), source):
            raise Refused(
                "RestoreClaimExists",
                f"PersistentVolumeClaim {claim_name} already exists and was not made from VolumeSnapshot "
                f"{source['name']}: its data would be used instead of the backup's (delete it to restore)",
            )
    if not missing:
        return []

    what = f"MailBackup {name} (spec.restore.backupName)"
    backup = await ctx.client.get(MAILBACKUP, namespace, name)
    if backup is None:
        raise Refused("RestoreBackupNotFound", f"{what} does not exist in namespace {namespace}")
    method = (backup.get("spec") or {}).get("method") or "VolumeSnapshot"
    if method != "VolumeSnapshot":
        raise Refused(
            "RestoreBackupNotVolumeSnapshot",
            f"{what} is an {method} backup; a restore starts the volumes from VolumeSnapshots "
            "(restore an archive with mailnode restore)",
        )
    status = backup.get("status") or {}
    if (phase := status.get("phase")) != "Completed":
        raise Refused("RestoreBackupNotCompleted", f"{what} is {phase or 'not started'}, not Completed")
    if not await ctx.client.serves(VOLUMESNAPSHOT):
        raise Refused(
            "VolumeSnapshotAPIMissing",
            f"cannot restore {what}: the VolumeSnapshot API (snapshot.storage.k8s.io/v1) is not served by this "
            "cluster; install the CSI snapshot CRDs and snapshot controller",
        )
    taken = list(status.get("snapshots") or [])
    for claim in missing:
        snapshot = claim["spec"]["dataSource"]["name"]
        if snapshot not in taken or await ctx.client.get(VOLUMESNAPSHOT, namespace, snapshot) is None:
            raise Refused(
                "RestoreSnapshotNotFound",
                f"{what} has no VolumeSnapshot {snapshot} for PersistentVolumeClaim {claim['metadata']['name']} "
                f"(it lists {', '.join(taken) or 'none'})",
            )
    return missing


def _same_source(found: object, wanted: Mapping[str, Any]) -> bool:
    return isinstance(found, Mapping) and all(found.get(key) == value for key, value in wanted.items())


async def _create_restore_claim(ctx: Context, body: Mapping[str, Any], claim: dict[str, Any]) -> None:
    try:
        await ctx.client.create(claim)
    except k8s.ApiError as error:
        if error.conflict:  # made meanwhile (by an earlier reconcile that failed after it)
            return
        raise
    ctx.metrics.applied.labels("PersistentVolumeClaim", "created").inc()
    source = claim["spec"]["dataSource"]["name"]
    message = f"created PersistentVolumeClaim {claim['metadata']['name']} from VolumeSnapshot {source}"
    await ctx.recorder.event(body, "Restored", message, at=conditions.now())


async def _dkim(ctx: Context, domain: api.MailDomain, body: Mapping[str, Any]) -> str:
    namespace, secret_name = specs.common.namespace(domain), specs.common.dkim_name(domain)
    secret = await _secret(ctx, namespace, secret_name)
    pem = (secret or {}).get(specs.common.DKIM_KEY)
    if pem is None:
        pem = await asyncio.to_thread(keys.new_dkim_key)
        await k8s.apply(ctx.client, specs.with_owner(specs.dkim_secret(domain, pem), domain))
        ctx.metrics.applied.labels("Secret", "created").inc()
        await ctx.recorder.event(
            body,
            "DKIMKeyCreated",
            f"made a DKIM key in Secret {secret_name}; publish status.dnsRecords",
            at=conditions.now(),
        )
    try:
        return _dkim_record(pem)
    except ValueError as error:
        raise Refused("DKIMKeyInvalid", f"Secret {secret_name} key {specs.common.DKIM_KEY}: {error}") from error


@functools.lru_cache(maxsize=256)
def _dkim_record(pem: str) -> str:
    return keys.dkim_record(pem)  # parsing the key takes tens of milliseconds: once per key


async def _mailboxes(ctx: Context, domain: api.MailDomain) -> Mailboxes:
    """The domain's Mailboxes: which go into the directory (with their hashed passwords) and what each
    one's Ready condition says."""
    namespace = specs.common.namespace(domain)
    served = specs.node.domains_of(domain)
    bodies = [body for mail_domain in sorted(served) for body in ctx.view.mailboxes(namespace, mail_domain)]
    # Who keeps an address claimed twice: the Mailbox already served with it, else the first created.
    bodies.sort(
        key=lambda b: (
            (conditions.find((b.get("status") or {}).get("conditions"), "Ready") or {}).get("status") != "True",
            str(b["metadata"].get("creationTimestamp") or ""),
            str(b["metadata"]["name"]),
        )
    )

    parsed = [(body, *_parse_mailbox(ctx, body)) for body in bodies]
    refs = {ref.name for _, m, _ in parsed if m is not None for ref in _refs(m)}
    secrets = await _password_secrets(ctx, namespace, refs)

    accepted: list[api.Mailbox] = []
    passwords: dict[str, str] = {}
    verdicts: list[MailboxVerdict] = []
    taken: dict[str, str] = {}  # address or alias -> Mailbox name
    hashing: dict[str, asyncio.Task[str]] = {}
    previous: dict[tuple[str, str], str] | None = None  # the directory's hashes now, read when needed
    for body, mailbox, invalid in parsed:
        if mailbox is None:
            verdicts.append(MailboxVerdict(body, Condition("Ready", "False", "InvalidSpec", invalid)))
            continue
        problem = _problem(mailbox, domain, served, taken, secrets)
        if problem is not None:
            verdicts.append(MailboxVerdict(body, Condition("Ready", "False", *problem)))
            continue
        for address in (mailbox.spec.address, *mailbox.spec.aliases):
            taken[address.lower()] = mailbox.metadata.name
        for ref in _refs(mailbox):
            source = specs.password_key(ref)
            if source in passwords or source in hashing:
                continue
            value = secrets[ref.name][ref.key]  # type: ignore[index]  # checked by _problem
            if is_hash(value):
                passwords[source] = value
                continue
            if previous is None:
                previous = await _previous_hashes(ctx, domain)
            candidate = previous.get((mailbox.spec.address.lower(), _app_name(mailbox, ref)))
            known = ctx.hasher.known(value, source=f"{namespace}/{source}")
            if known is not None and candidate in (None, known):
                passwords[source] = known
                continue
            hashing[source] = asyncio.ensure_future(
                ctx.hasher.hash(value, source=f"{namespace}/{source}", candidate=candidate)
            )
        accepted.append(mailbox)
        verdicts.append(
            MailboxVerdict(
                body, Condition("Ready", "True", "Served", f"in the directory of MailDomain {domain.metadata.name}")
            )
        )
    if hashing:
        await asyncio.gather(*hashing.values())
    passwords.update({source: task.result() for source, task in hashing.items()})
    return Mailboxes(accepted, passwords, verdicts)


def _app_name(mailbox: api.Mailbox, ref: api.SecretKeySelector) -> str:
    """ "" for the password, else the app password's name."""
    if ref is mailbox.spec.password_secret_ref:
        return ""
    return next(app.name for app in mailbox.spec.app_passwords if app.secret_ref is ref)


async def _previous_hashes(ctx: Context, domain: api.MailDomain) -> dict[tuple[str, str], str]:
    """The hashes the domain's directory Secret holds now: (address, "" or app password name) -> hash."""
    secret = await ctx.client.get(SECRET, specs.common.namespace(domain), specs.common.directory_name(domain))
    content = k8s.secret_values(secret or {}).get(specs.common.DIRECTORY_KEY, b"")
    try:
        found: dict[tuple[str, str], str] = {}
        for entry in specs.node.read_directory(content):
            address = str(entry["address"]).lower()
            found[(address, "")] = str(entry["password_hash"])
            for app in entry.get("app_passwords") or []:
                found[(address, str(app["name"]))] = str(app["password_hash"])
        return found
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}  # unreadable (edited by hand?): every plaintext is hashed anew, and the Secret rewritten


def _parse_mailbox(ctx: Context, body: Mapping[str, Any]) -> tuple[api.Mailbox | None, str]:
    """The Mailbox model, or None and why it is invalid; remembered per uid and generation (a reconcile
    of a large domain would otherwise validate every Mailbox again)."""
    key = (object_key(body), body["metadata"].get("generation"))
    if (known := ctx.parsed_mailboxes.get(key[0])) is not None and known[0] == key[1]:
        return known[1], known[2]
    try:
        result: tuple[api.Mailbox | None, str] = (api.Mailbox.model_validate(body), "")
    except pydantic.ValidationError as error:
        result = (None, api.validation_message(error))
    ctx.parsed_mailboxes[key[0]] = (key[1], *result)
    return result


def _refs(mailbox: api.Mailbox) -> list[api.SecretKeySelector]:
    return [mailbox.spec.password_secret_ref, *(app.secret_ref for app in mailbox.spec.app_passwords)]


def _problem(
    mailbox: api.Mailbox,
    domain: api.MailDomain,
    served: set[str],
    taken: Mapping[str, str],
    secrets: Mapping[str, Mapping[str, str] | None],
) -> tuple[str, str] | None:
    """(reason, message) when the Mailbox cannot be served, else None."""
    spec = mailbox.spec
    for address in (spec.address, *spec.aliases):
        if (owner := taken.get(address.lower())) is not None:
            return "AddressConflict", f"{address} is already an address or alias of Mailbox {owner}"
    for alias in spec.aliases:
        alias_domain = specs.node.domain_of(alias)
        if alias_domain not in served:
            return (
                "AliasNotServed",
                f"alias {alias}: MailDomain {domain.metadata.name} does not serve {alias_domain} "
                "(add it to its spec.aliasDomains)",
            )
    fields = [("spec.passwordSecretRef", spec.password_secret_ref)] + [
        (f"spec.appPasswords[{app.name}].secretRef", app.secret_ref) for app in spec.app_passwords
    ]
    for field, ref in fields:
        values = secrets.get(ref.name)
        if values is None:
            return "SecretNotFound", f"Secret {ref.name} ({field}) does not exist"
        if not values.get(ref.key):
            return "SecretKeyNotFound", f"Secret {ref.name} ({field}) has no key {ref.key}"
    return None


async def _password_secrets(ctx: Context, namespace: str, names: set[str]) -> dict[str, dict[str, str] | None]:
    if len(names) > LIST_SECRETS_ABOVE:
        found: dict[str, dict[str, str] | None] = dict.fromkeys(names)
        for obj in await ctx.client.list(SECRET, namespace):
            if (name := obj["metadata"]["name"]) in names:
                found[name] = {k: v.decode("utf-8", "replace") for k, v in k8s.secret_values(obj).items()}
        return found
    ordered = sorted(names)
    values = await asyncio.gather(*(_secret(ctx, namespace, name) for name in ordered))
    return dict(zip(ordered, values, strict=True))


async def _write_domain_status(
    ctx: Context,
    body: Mapping[str, Any],
    domain: api.MailDomain,
    statefulset: Mapping[str, Any],
    mailbox_count: int,
    dkim_record: str | None,
) -> None:
    replicas = domain.spec.replicas
    observed = statefulset.get("status") or {}
    ready = int(observed.get("readyReplicas") or 0)
    updated = int(observed.get("updatedReplicas") or 0)
    rolling = observed.get("currentRevision") != observed.get("updateRevision") or updated < replicas
    if ready >= replicas:
        ready_condition = Condition("Ready", "True", "NodesReady", f"{ready}/{replicas} mail nodes ready")
    else:
        ready_condition = Condition("Ready", "False", "NodesNotReady", f"{ready}/{replicas} mail nodes ready")
    if rolling or ready < replicas:
        progressing = Condition("Progressing", "True", "RollingOut", f"{updated}/{replicas} mail nodes up to date")
    else:
        progressing = Condition("Progressing", "False", "UpToDate", "every mail node runs the current spec")
    degraded = Condition("Degraded", "False", "Reconciled", "every object is as specified")
    records = specs.dns_records(domain, dkim_record=dkim_record)
    await _patch_domain_status(
        ctx,
        body,
        [ready_condition, progressing, degraded],
        {"readyReplicas": ready, "mailboxes": mailbox_count, "dnsRecords": records},
    )


async def _refused(ctx: Context, body: Mapping[str, Any], refusal: Refused) -> None:
    """Say in the status and in an Event (once per new reason or message) why the domain is not built."""
    previous = conditions.find((body.get("status") or {}).get("conditions"), "Degraded")
    changed = previous is None or (previous.get("reason"), previous.get("message")) != (
        refusal.reason,
        refusal.message,
    )
    wanted = [
        Condition("Ready", "False", refusal.reason, refusal.message),
        Condition("Progressing", "False", refusal.reason, "waiting for the problem to be fixed"),
        Condition("Degraded", "True", refusal.reason, refusal.message),
    ]
    await _patch_domain_status(ctx, body, wanted, {})
    if changed:
        await ctx.recorder.event(body, refusal.reason, refusal.message, type="Warning", at=conditions.now())
    # Its Mailboxes are in no directory the operator writes now.
    meta, spec = body["metadata"], body.get("spec") or {}
    served = {str(d).lower() for d in [spec.get("domain"), *(spec.get("aliasDomains") or [])] if d}
    not_ready = Condition(
        "Ready", "False", "DomainNotReady", f"MailDomain {meta['name']} cannot be reconciled: {refusal.message}"
    )
    verdicts = [
        MailboxVerdict(mailbox, not_ready)
        for mail_domain in sorted(served)
        for mailbox in ctx.view.mailboxes(str(meta["namespace"]), mail_domain)
    ]
    await _write_mailbox_statuses(ctx, verdicts)


async def _patch_domain_status(
    ctx: Context, body: Mapping[str, Any], wanted: list[Condition], fields: dict[str, Any]
) -> None:
    meta = body["metadata"]
    status = body.get("status") or {}
    generation = meta.get("generation")
    merged = conditions.merge(status.get("conditions"), wanted, generation=generation, at=conditions.now())
    # The status patch replaces the whole list: the conditions the backup schedule writes go back as read.
    merged += [dict(c) for c in status.get("conditions") or () if c.get("type") in SCHEDULE_CONDITIONS]
    patch: dict[str, Any] = {"observedGeneration": generation, **fields}
    if conditions.same(status.get("conditions"), merged) and all(status.get(k) == v for k, v in patch.items()):
        return
    patch["conditions"] = merged
    try:
        await ctx.client.patch(MAILDOMAIN, meta["namespace"], meta["name"], {"status": patch}, subresource="status")
    except k8s.ApiError as error:
        if not error.not_found:  # deleted meanwhile: nothing to report on
            raise


async def _write_mailbox_statuses(ctx: Context, verdicts: list[MailboxVerdict]) -> None:
    limit = asyncio.Semaphore(STATUS_WRITES)
    at = conditions.now()

    async def one(verdict: MailboxVerdict, change: _StatusChange) -> None:
        async with limit:
            await _write_mailbox_status(ctx, verdict.body, verdict.condition, change)

    changed = [(v, change) for v in verdicts if (change := _mailbox_status(ctx, v.body, v.condition, at)) is not None]
    await asyncio.gather(*(one(v, change) for v, change in changed))


@dataclasses.dataclass(frozen=True)
class _StatusChange:
    conditions: list[dict[str, Any]]  # to write
    announce: bool  # the Ready status or reason changed: post an Event


def _mailbox_status(ctx: Context, body: Mapping[str, Any], condition: Condition, at: str) -> _StatusChange | None:
    """What to write to the Mailbox's status, or None when it says this already. What was last written is
    remembered: the indexes lag behind the operator's own writes, and comparing with a stale copy would
    write the same status (and post the same Event) twice."""
    status = ctx.mailbox_statuses.get(object_key(body)) or body.get("status") or {}
    generation = body["metadata"].get("generation")
    merged = conditions.merge(status.get("conditions"), [condition], generation=generation, at=at)
    if conditions.same(status.get("conditions"), merged) and status.get("observedGeneration") == generation:
        return None
    previous = conditions.find(status.get("conditions"), "Ready")
    announce = previous is None or (previous.get("status"), previous.get("reason")) != (
        condition.status,
        condition.reason,
    )
    return _StatusChange(merged, announce)


async def write_mailbox_status(ctx: Context, body: Mapping[str, Any], condition: Condition) -> None:
    """Write a Mailbox's Ready condition when it changed, with an Event when its reason did."""
    change = _mailbox_status(ctx, body, condition, conditions.now())
    if change is not None:
        await _write_mailbox_status(ctx, body, condition, change)


async def _write_mailbox_status(
    ctx: Context, body: Mapping[str, Any], condition: Condition, change: _StatusChange
) -> None:
    meta = body["metadata"]
    generation = meta.get("generation")
    written = {"conditions": change.conditions, "observedGeneration": generation}
    try:
        await ctx.client.patch(MAILBOX, meta["namespace"], meta["name"], {"status": written}, subresource="status")
    except k8s.ApiError as error:
        if error.not_found:
            return
        raise
    ctx.mailbox_statuses[object_key(body)] = written
    if change.announce:
        full = {"apiVersion": api.API_VERSION, "kind": "Mailbox", **dict(body)}
        await ctx.recorder.event(
            full,
            condition.reason,
            condition.message,
            type="Normal" if condition.status == "True" else "Warning",
            at=conditions.now(),
        )


def object_key(body: Mapping[str, Any]) -> str:
    """What the operator's memories of an object are keyed by: its uid (namespace/name if it has none)."""
    meta = body.get("metadata") or {}
    return str(meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}")


async def _gone(ctx: Context, key: DomainKey) -> None:
    """The MailDomain was deleted (Kubernetes removes what it owned): its Mailboxes have no domain now,
    unless another MailDomain serves theirs."""
    namespace, name = key
    ctx.owned.pop(key, None)
    for mail_domain in sorted(ctx.served.pop(key, set())):
        # The index may not have seen the deletion yet (this reconcile can run on another event, after
        # the API server forgot the MailDomain but before its watch event came): it does not count.
        if [other for other in ctx.view.serving(namespace, mail_domain) if other != name]:
            continue
        for body in ctx.view.mailboxes(namespace, mail_domain):
            await write_mailbox_status(ctx, body, domain_not_found(namespace, mail_domain))


def domain_not_found(namespace: str, mail_domain: str) -> Condition:
    return Condition(
        "Ready",
        "False",
        "DomainNotFound",
        f"no MailDomain in namespace {namespace} serves {mail_domain} (as spec.domain or spec.aliasDomains)",
    )
