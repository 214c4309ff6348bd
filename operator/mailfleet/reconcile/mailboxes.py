"""A domain's Mailboxes: which go into its directory (with their hashed passwords), and each one's verdict,
the Ready condition written to its status (with an Event when its reason changes).

`served` is the reconcile of a domain's Mailboxes (reconcile/domain.py); `write_verdicts` writes what it
found. A Mailbox that cannot be served (its Secret is missing, its address is taken) is left out of the
directory and told so in its own status; it does not hold back the others. `domain_not_ready`,
`domain_gone` and `domain_not_found` say why no directory holds a Mailbox (reconcile/domain.py,
reconcile/routing.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from typing import Any, Final, TypeVar

import pydantic

from mailfleet import api, k8s, kube_types, specs
from mailfleet.reconcile import conditions
from mailfleet.reconcile.conditions import Condition
from mailfleet.reconcile.context import SECRET, Context, DomainKey, object_key
from mailfleet.reconcile.statuswrites import Node, Verdict
from mailwire.directory import is_password_hash

# Above this many password Secrets the watch has not shown (k8s.secrets.Seen), a reconcile lists the
# namespace's Secrets once instead of reading each one.
LIST_SECRETS_ABOVE: Final = 20
_NO_STATUS: Final = api.MailboxStatus()  # the status of every remembered Mailbox model (see _parse)


@dataclasses.dataclass
class _Found:
    accepted: list[api.Mailbox]
    passwords: dict[str, str]
    verdicts: list[Verdict]


@dataclasses.dataclass
class Served:
    accepted: list[api.Mailbox]
    passwords: dict[str, str]  # "secretName/key" -> argon2 hash
    verdicts: list[Verdict]
    homes: dict[str, int]  # lower-case address -> home ordinal, of the accepted


async def served(ctx: Context, domain: api.MailDomain, *, serving: int = 0) -> Served:
    """The domain's Mailboxes: which go into the directory (with their hashed passwords and homes) and
    what each one's Ready condition and node say. `serving`: the nodes running now, when a scale-down
    still runs more than spec.replicas (reconcile/moves.py)."""
    directory = _DirectoryNow(ctx, domain)
    found = await _served(ctx, domain, directory)
    # DESIGN.md "Clustering": the directory, not the hash, is the truth. A mailbox keeps the home the
    # current directory records for it (read back: an operator restart rewrites nothing); a new one is
    # placed by rendezvous hashing. One node: every home is 0, nothing to read.
    recorded: Mapping[str, int] = {}
    if specs.common.clustered(domain) or serving > 1:
        key = (specs.common.namespace(domain), domain.metadata.name)
        # The homes this operator last wrote into the directory, else (its first reconcile of the domain)
        # read back from the directory: not ten thousand entries parsed again at every reconcile.
        written = ctx.placement.get(key)
        recorded = written[1] if written is not None else await _recorded_homes(directory)
    homes = specs.homes(domain, found.accepted, recorded=recorded)
    # A scale-down keeps the homes on the nodes that go until their mailboxes moved off (reconcile/moves.py).
    for address, home in recorded.items():
        if address in homes and domain.spec.replicas <= home < serving:
            homes[address] = home
    for verdict in found.verdicts:
        if verdict.condition.status == "True":
            address = str(verdict.body["spec"]["address"]).lower()
            verdict.node = specs.common.pod_name(domain, homes[address])
    return Served(found.accepted, found.passwords, found.verdicts, homes)


async def _served(ctx: Context, domain: api.MailDomain, directory: _DirectoryNow) -> _Found:
    namespace = specs.common.namespace(domain)
    mail_domains = specs.node.domains_of(domain)
    bodies = [body for mail_domain in sorted(mail_domains) for body in ctx.view.mailboxes(namespace, mail_domain)]
    # Who keeps an address claimed twice: the Mailbox already served with it, else the first created.
    bodies.sort(
        key=lambda b: (
            (conditions.find((b.get("status") or {}).get("conditions"), "Ready") or {}).get("status") != "True",
            str(b["metadata"].get("creationTimestamp") or ""),
            str(b["metadata"]["name"]),
        )
    )

    parsed = [(body, *_parse(ctx, body)) for body in bodies]
    refs = {ref.name for _, m, _ in parsed if m is not None for ref in _refs(m)}
    secrets = await _password_secrets(ctx, namespace, refs)

    accepted: list[api.Mailbox] = []
    passwords: dict[str, str] = {}
    verdicts: list[Verdict] = []
    taken: dict[str, str] = {}  # address or alias -> Mailbox name
    hashing: dict[str, asyncio.Task[str]] = {}
    # the verdict of every Mailbox served: one Condition for ten thousand of them, not one each
    served = Condition("Ready", "True", "Served", f"in the directory of MailDomain {domain.metadata.name}")
    previous: dict[tuple[str, str], str] | None = None  # the directory's hashes now, read when needed
    for body, mailbox, invalid in parsed:
        if mailbox is None:
            verdicts.append(Verdict(body, Condition("Ready", "False", "InvalidSpec", invalid)))
            continue
        problem = _problem(mailbox, domain, mail_domains, taken, secrets)
        if problem is not None:
            verdicts.append(Verdict(body, Condition("Ready", "False", *problem)))
            continue
        for address in (mailbox.spec.address, *mailbox.spec.aliases):
            taken[address.lower()] = mailbox.metadata.name
        for ref in _refs(mailbox):
            source = specs.password_key(ref)
            if source in passwords or source in hashing:
                continue
            value = secrets[ref.name][ref.key]  # type: ignore[index]  # checked by _problem
            if is_password_hash(value):
                passwords[source] = value
                continue
            if previous is None:
                previous = await _previous_hashes(directory)
            candidate = previous.get((mailbox.spec.address.lower(), _app_name(mailbox, ref)))
            known = ctx.hasher.known(value, source=f"{namespace}/{source}")
            if known is not None and candidate in (None, known):
                passwords[source] = known
                continue
            hashing[source] = asyncio.ensure_future(
                ctx.hasher.hash(value, source=f"{namespace}/{source}", candidate=candidate)
            )
        accepted.append(mailbox)
        verdicts.append(Verdict(body, served))
    if hashing:
        await asyncio.gather(*hashing.values())
    passwords.update({source: task.result() for source, task in hashing.items()})
    return _Found(accepted, passwords, verdicts)


def _app_name(mailbox: api.Mailbox, ref: api.SecretKeySelector) -> str:
    """ "" for the password, else the app password's name."""
    if ref is mailbox.spec.password_secret_ref:
        return ""
    return next(app.name for app in mailbox.spec.app_passwords if app.secret_ref is ref)


class _DirectoryNow:
    """The entries of the domain's directory Secret as it is now, read once per reconcile when first
    needed (the homes and the hashes of plaintext passwords both come from it: one GET, one parse of ten
    thousand entries, not two)."""

    def __init__(self, ctx: Context, domain: api.MailDomain) -> None:
        self._ctx, self._domain = ctx, domain
        self._read: list[dict[str, Any]] | ValueError | None = None

    async def entries(self) -> list[dict[str, Any]]:
        """ValueError when it is unreadable."""
        if self._read is None:
            domain = self._domain
            namespace, name = specs.common.namespace(domain), specs.common.directory_name(domain)
            secret = await self._ctx.client.get(SECRET, namespace, name)
            content = k8s.secret_values(secret or {}).get(specs.common.DIRECTORY_KEY, b"")
            try:
                self._read = specs.node.read_directory(content)
            except ValueError as error:
                self._read = error
        if isinstance(self._read, ValueError):
            raise self._read
        return self._read


async def _recorded_homes(directory: _DirectoryNow) -> dict[str, int]:
    try:
        return specs.node.recorded_homes(await directory.entries())
    except ValueError:
        return {}  # unreadable (edited by hand?): placed by rendezvous again, as when it was first written


async def _previous_hashes(directory: _DirectoryNow) -> dict[tuple[str, str], str]:
    """The hashes the domain's directory Secret holds now: (address, "" or app password name) -> hash."""
    try:
        found: dict[tuple[str, str], str] = {}
        for entry in await directory.entries():
            address = str(entry["address"]).lower()
            found[(address, "")] = str(entry["password_hash"])
            for app in entry.get("app_passwords") or []:
                found[(address, str(app["name"]))] = str(app["password_hash"])
        return found
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}  # unreadable (edited by hand?): every plaintext is hashed anew, and the Secret rewritten


def _parse(ctx: Context, body: kube_types.Mailbox) -> tuple[api.Mailbox | None, str]:
    """The Mailbox model, or None and why it is invalid; remembered per uid and generation (a reconcile
    of a large domain would otherwise validate every Mailbox again). Without its status: a status change
    keeps the generation, so a remembered model's status would be stale anyway (the reconcile reads the
    status from the body), and it would be a third of the memory ten thousand models hold."""
    key = (object_key(body), body["metadata"].get("generation"))
    if (known := ctx.parsed_mailboxes.get(key[0])) is not None and known[0] == key[1]:
        return known[1], known[2]
    # Its name and namespace are all of the metadata the reconcile reads (a sixth of a model's memory).
    meta = body["metadata"]
    kept = {field: value for field, value in body.items() if field not in ("status", "metadata")}
    kept["metadata"] = {"name": meta.get("name"), "namespace": meta.get("namespace")}
    try:
        model = api.Mailbox.model_validate(kept)
        # one empty status (frozen) shared by all the remembered models, not one each: nothing reads it
        result: tuple[api.Mailbox | None, str] = (
            _share_fields_sets(model.model_copy(update={"status": _NO_STATUS})),
            "",
        )
    except pydantic.ValidationError as error:
        result = (None, api.validation_message(error))
    ctx.parsed_mailboxes[key[0]] = (key[1], *result)
    return result


# The sets of field names pydantic keeps in each model (`model_fields_set`), one of each content for all the
# remembered models: ten thousand Mailboxes, each with four sub-models, held 40,000 sets of the same few
# names (1.4 KiB a model, half of its memory). Sharing is safe: the models are frozen, and pydantic
# changes a fields set only through attribute assignment (refused) or on a copy (model_copy).
_FIELDS_SETS: Final[dict[frozenset[str], set[str]]] = {}
_M = TypeVar("_M", bound=pydantic.BaseModel)


def _share_fields_sets(model: _M) -> _M:
    """`model`, its sub-models' fields sets replaced by the shared ones of the same content."""
    names = frozenset(model.__pydantic_fields_set__)
    object.__setattr__(model, "__pydantic_fields_set__", _FIELDS_SETS.setdefault(names, set(names)))
    for value in model.__dict__.values():
        for item in value if isinstance(value, list) else (value,):
            if isinstance(item, pydantic.BaseModel) and item is not _NO_STATUS:
                _share_fields_sets(item)
    return model


def _refs(mailbox: api.Mailbox) -> list[api.SecretKeySelector]:
    return [mailbox.spec.password_secret_ref, *(app.secret_ref for app in mailbox.spec.app_passwords)]


def _problem(
    mailbox: api.Mailbox,
    domain: api.MailDomain,
    mail_domains: set[str],
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
        if alias_domain not in mail_domains:
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
    """The values of the Secrets `names` (None: no such Secret): as the watch showed them, else from the
    API (one list for many, a read each for a few)."""
    found: dict[str, dict[str, str] | None] = {}
    missing: set[str] = set()
    for name in names:
        seen = ctx.seen_secrets.get(namespace, name)
        if seen is None:
            missing.add(name)
        else:
            found[name] = seen
    if len(missing) > LIST_SECRETS_ABOVE:
        found |= dict.fromkeys(missing)
        for obj in await ctx.client.list(SECRET, namespace):
            if (name := obj["metadata"]["name"]) in missing:
                found[name] = k8s.secrets.strings(obj)
        return found
    ordered = sorted(missing)
    values = await asyncio.gather(*(k8s.secrets.read(ctx.client, namespace, name) for name in ordered))
    found.update(zip(ordered, values, strict=True))
    return found


# -- verdicts into statuses ---------------------------------------------------------------------------


def write_verdicts(ctx: Context, verdicts: list[Verdict]) -> None:
    """Each Mailbox's Ready condition and node, written behind the reconcile (reconcile/statuswrites.py)
    when they changed."""
    ctx.statuses.submit(verdicts)


def write_status(ctx: Context, body: kube_types.Mailbox, condition: Condition) -> None:
    """A Mailbox's Ready condition, when it changed, with an Event when its reason did; the Mailbox is in
    no directory (status.node removed)."""
    ctx.statuses.submit([Verdict(body, condition, None)])


# -- Mailboxes no directory holds ---------------------------------------------------------------------


def domain_not_ready(ctx: Context, body: kube_types.MailDomain, message: str) -> None:
    """The MailDomain `body` was refused: its Mailboxes are in no directory the operator writes now."""
    meta, spec = body["metadata"], body.get("spec") or {}
    mail_domains = {str(d).lower() for d in [spec.get("domain"), *(spec.get("aliasDomains") or [])] if d}
    not_ready = Condition(
        "Ready", "False", "DomainNotReady", f"MailDomain {meta['name']} cannot be reconciled: {message}"
    )
    verdicts = [
        Verdict(mailbox, not_ready, Node.KEEP)
        for mail_domain in sorted(mail_domains)
        for mailbox in ctx.view.mailboxes(str(meta["namespace"]), mail_domain)
    ]
    write_verdicts(ctx, verdicts)


def domain_gone(ctx: Context, key: DomainKey) -> None:
    """The MailDomain was deleted (Kubernetes removes what it owned): its Mailboxes have no domain now,
    unless another MailDomain serves theirs."""
    namespace, name = key
    for mail_domain in sorted(ctx.served.pop(key, set())):
        # The index may not have seen the deletion yet (this reconcile can run on another event, after
        # the API server forgot the MailDomain but before its watch event came): it does not count.
        if [other for other in ctx.view.serving(namespace, mail_domain) if other != name]:
            continue
        for body in ctx.view.mailboxes(namespace, mail_domain):
            write_status(ctx, body, domain_not_found(namespace, mail_domain))


def domain_not_found(namespace: str, mail_domain: str) -> Condition:
    return Condition(
        "Ready",
        "False",
        "DomainNotFound",
        f"no MailDomain in namespace {namespace} serves {mail_domain} (as spec.domain or spec.aliasDomains)",
    )
