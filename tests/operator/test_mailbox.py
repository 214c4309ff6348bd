"""Mailboxes: added to and removed from their domain's directory, passwords hashed or taken as hashes,
changes of many Mailboxes written to the directory Secret in few writes."""

from __future__ import annotations

import base64
from typing import Any

import argon2

from mailfleet import options
from tests.conftest import cheap_hash
from tests.operator.conftest import (
    MAILBOX,
    MAILDOMAIN,
    NAMESPACE,
    SECRET,
    directory,
    eventually,
    mailbox,
    maildomain,
    run_operator,
    secret,
    settled,
    status_of,
)
from tests.operator.emulator import ApiServer


async def test_mailboxes_come_and_go_from_the_directory(operator, client):
    await client.create(maildomain(aliasDomains=["example.net"]))
    await client.create(secret("alice-password", password="alice-pw"))
    await client.create(secret("bob-password", password="bob-pw", phone="bob-phone-pw"))
    await client.create(mailbox("alice", "alice@example.com"))
    await client.create(
        mailbox(
            "bob",
            "bob@example.net",
            displayName="Bob",
            forwardTo=["bob@elsewhere.test"],
            appPasswords=[{"name": "phone", "secretRef": {"name": "bob-password", "key": "phone"}}],
        )
    )

    both = await eventually(lambda: _addresses(client, {"alice@example.com", "bob@example.net"}))
    bob = both["bob@example.net"]
    assert bob["display_name"] == "Bob" and bob["forward_to"] == ["bob@elsewhere.test"]
    hasher = argon2.PasswordHasher()
    assert hasher.verify(bob["password_hash"], "bob-pw")
    assert [app["name"] for app in bob["app_passwords"]] == ["phone"]
    assert hasher.verify(bob["app_passwords"][0]["password_hash"], "bob-phone-pw")
    await eventually(lambda: status_of(client, MAILDOMAIN, "example-com", "Degraded", status="False"))
    assert (await client.get(MAILDOMAIN, NAMESPACE, "example-com"))["status"]["mailboxes"] == 2

    await client.delete(MAILBOX, NAMESPACE, "alice")
    await eventually(lambda: _addresses(client, {"bob@example.net"}), what="alice removed")

    async def counted() -> bool:
        obj = await client.get(MAILDOMAIN, NAMESPACE, "example-com")
        return bool(obj["status"]["mailboxes"] == 1)

    await eventually(counted, what="status.mailboxes 1")


async def test_a_mailbox_change_and_a_new_password_reach_the_directory(operator, client):
    await client.create(maildomain())
    await client.create(secret("alice-password", password="first"))
    await client.create(mailbox("alice", "alice@example.com", quota="1Gi"))
    first = (await eventually(lambda: _addresses(client, {"alice@example.com"})))["alice@example.com"]

    await client.patch(MAILBOX, NAMESPACE, "alice", {"spec": {"quota": "2Gi", "suspended": True}})

    async def changed() -> dict[str, Any] | None:
        entry = (await directory(client)).get("alice@example.com") or {}
        return entry if entry.get("quota") == 2 * 1024**3 and entry.get("suspended") else None

    second = await eventually(changed, what="quota 2Gi and suspended")
    assert second["password_hash"] == first["password_hash"]  # an unchanged password is not hashed again
    await eventually(lambda: status_of(client, MAILBOX, "alice", status="True", observedGeneration=2))

    await client.patch(SECRET, NAMESPACE, "alice-password", {"stringData": None, "data": {"password": "c2Vjb25k"}})

    async def rotated() -> bool:
        entry = (await directory(client)).get("alice@example.com") or {}
        try:
            return argon2.PasswordHasher().verify(entry.get("password_hash", ""), "second")
        except argon2.exceptions.VerificationError:
            return False

    await eventually(rotated, what="the new password in the directory")


async def test_a_hash_in_the_secret_is_used_as_is(operator, client):
    hashed = cheap_hash("already-hashed")
    await client.create(maildomain())
    await client.create(secret("carol-password", password=hashed))
    await client.create(mailbox("carol", "carol@example.com", passwordSecretRef={"name": "carol-password"}))
    entry = (await eventually(lambda: _addresses(client, {"carol@example.com"})))["carol@example.com"]
    assert entry["password_hash"] == hashed


async def test_many_mailbox_changes_make_few_directory_writes(api: ApiServer, client):
    count = 150
    hashed = cheap_hash("shared")
    # The operator's own delay before a changed domain is reconciled (0.2 s), not the tests' short one.
    async with run_operator(delay=options.OperatorOptions().delay) as operator:
        await client.create(maildomain())
        await client.create(secret("shared-password", password=hashed))
        await eventually(lambda: client.get(SECRET, NAMESPACE, "example-com-directory"))
        for i in range(count):
            await client.create(
                mailbox(f"user{i}", f"user{i}@example.com", passwordSecretRef={"name": "shared-password"})
            )
        await eventually(lambda: _count(client, count), within=60, what=f"{count} mailboxes in the directory")
        await eventually(lambda: status_of(client, MAILBOX, f"user{count - 1}", status="True"))

        # Each Mailbox's status is written once, when it becomes Served (not again from a stale index).
        await settled(operator)
        writes = [w for w in api.writes if w[1:] == ("secrets", "example-com-directory", None)]
        reconciles = operator.running().ctx.metrics.reconciles.labels("MailDomain", "ok")._value.get()
        # The 150 Mailbox events became a few reconciles of their domain (about ten here; one each
        # without coalescing), and each reconcile wrote the directory at most once.
        assert 1 < len(writes) <= reconciles < count // 3, (len(writes), reconciles)
        status_writes = [w for w in api.writes if w[1] == "mailboxes" and w[3] == "status"]
        assert len(status_writes) == count, len(status_writes)


async def test_password_secrets_are_read_from_the_watch_not_listed_at_each_reconcile(api: ApiServer, client):
    """Thirty Mailboxes, each with its own Secret (more than a reconcile would read one by one): the
    operator takes their values from its watch of Secrets, and still sees a password change."""
    count = 30
    async with run_operator() as operator:
        await client.create(maildomain())
        for i in range(count):
            await client.create(secret(f"pw{i}", password=cheap_hash(f"secret{i}")))
        await settled(operator)
        api.reads.clear()
        for i in range(count):
            await client.create(mailbox(f"user{i}", f"user{i}@example.com", passwordSecretRef={"name": f"pw{i}"}))
        await eventually(lambda: _count(client, count), within=60, what=f"{count} mailboxes in the directory")
        await settled(operator)
        # no list of the namespace's Secrets, and no read of a password Secret
        assert [name for plural, name in api.reads if plural == "secrets" and (name or "pw").startswith("pw")] == []

        new_hash = cheap_hash("changed")
        encoded = base64.b64encode(new_hash.encode()).decode()
        await client.patch(SECRET, NAMESPACE, "pw7", {"data": {"password": encoded}})
        await eventually(lambda: _hash_is(client, "user7@example.com", new_hash), what="the new hash in the directory")


async def _hash_is(client, address: str, expected: str) -> bool:
    return bool((await directory(client)).get(address, {}).get("password_hash") == expected)


async def _addresses(client, expected: set[str]) -> dict[str, Any] | None:
    found = await directory(client)
    return found if set(found) == expected else None


async def _count(client, count: int) -> bool:
    return len(await directory(client)) == count
