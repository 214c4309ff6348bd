"""MTA-STS (RFC 8461) for outbound mail: the policies of the domains the queue delivers to.

The Deliverer asks `Policies.get(domain)` before it connects to a domain's MX hosts. A policy is found
by its `_mta-sts.<domain>` TXT record and fetched from https://mta-sts.<domain>/.well-known/mta-sts.txt
(a verified certificate, no redirects, bounded size and time), then cached for its max_age: a new id in
the TXT record fetches it again; a record that vanishes or a fetch that fails keeps the cached policy
until it expires (§5.1), so an attacker who blocks DNS or HTTPS cannot switch a domain back to
plaintext. `parse` and `mx_matches` are pure.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
import ssl
import time
from collections.abc import Callable
from typing import Final, Literal

import aiohttp

from mailnode.queue import routing

log = logging.getLogger(__name__)

Mode = Literal["enforce", "testing", "none"]
MAX_POLICY_BYTES: Final = 64 * 1024  # RFC 8461 §3.3: senders may limit the policy's size (64 KiB suggested)
MAX_AGE_LIMIT: Final = 31557600  # §3.2: at most a year
FETCH_TIMEOUT: Final = 60.0  # §3.3: "a timeout of 60 seconds" is suggested
RECHECK_TXT: Final = 300.0  # seconds a cached policy's TXT record is trusted before it is looked up again
MAX_CACHED: Final = 10000
_MODES: Final[dict[str, Mode]] = {"enforce": "enforce", "testing": "testing", "none": "none"}
_ID: Final = re.compile(r"^[A-Za-z0-9]{1,32}$")
_QUOTED: Final = re.compile(r'"((?:[^"\\]|\\.)*)"')


class PolicyError(ValueError):
    """Not a valid policy file or record."""


@dataclasses.dataclass(frozen=True)
class Policy:
    mode: Mode
    mx: tuple[str, ...]  # patterns: "mail.example.com" or "*.example.com"
    max_age: int
    id: str = ""  # the TXT record's id it was fetched for


def parse(text: str, *, id: str = "") -> Policy:
    """RFC 8461 §3.2: "key: value" lines (CRLF or LF), version STSv1, a mode, max_age, and at least one
    mx unless the mode is none; unknown keys are ignored."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise PolicyError(f"not a key: value line: {line[:80]!r}")
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    mode = _MODES.get(fields.get("mode", ""))
    if mode is None:
        raise PolicyError(f"mode {fields.get('mode')!r} is not enforce, testing or none")
    max_age = fields.get("max_age", "")
    if not max_age.isdigit() or len(max_age) > 10:  # §3.2: max_age-value = 1*10DIGIT
        raise PolicyError(f"max_age {max_age!r} is not a number of seconds")
    if mode != "none" and not mx:
        raise PolicyError("no mx line")
    return Policy(mode=mode, mx=tuple(mx), max_age=min(int(max_age), MAX_AGE_LIMIT), id=id)


def record_id(values: list[str]) -> str | None:
    """The id of the one `v=STSv1` TXT record among `values` (§3.1: several, or none, is no policy)."""
    found = []
    for value in values:
        text = "".join(_QUOTED.findall(value)) if value.startswith('"') else value
        fields = dict(
            (part.partition("=")[0].strip(), part.partition("=")[2].strip()) for part in text.split(";") if part.strip()
        )
        if text.startswith("v=STSv1") and _ID.match(fields.get("id", "")):
            found.append(fields["id"])
    return found[0] if len(found) == 1 else None


def mx_matches(policy: Policy, host: str) -> bool:
    """§4.1: an MX host matches a pattern exactly, or a "*." pattern by its leftmost label only."""
    host = host.lower().rstrip(".")
    for pattern in policy.mx:
        if pattern.startswith("*."):
            if host.partition(".")[2] == pattern[2:] and host.partition(".")[0]:
                return True
        elif host == pattern:
            return True
    return False


@dataclasses.dataclass
class _Cached:
    policy: Policy
    expires: float
    checked: float  # when the TXT record last confirmed it


class Policies:
    """The MTA-STS policies of remote domains, looked up, fetched and cached. `connect_to` maps a policy
    host (mta-sts.example.com) to the host and port to connect to (tests; default: itself, 443);
    `tls` is the context the policy host's certificate is verified with (default: the system CAs)."""

    def __init__(
        self,
        *,
        resolver: routing.Resolver,
        tls: ssl.SSLContext | None = None,
        connect_to: Callable[[str], tuple[str, int]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        timeout: float = FETCH_TIMEOUT,
    ) -> None:
        self._resolver = resolver
        self._tls = tls or ssl.create_default_context()
        self._connect_to = connect_to or (lambda host: (host, 443))
        self._clock = clock
        self._timeout = timeout
        self._cache: collections.OrderedDict[str, _Cached] = collections.OrderedDict()

    async def get(self, domain: str) -> Policy | None:
        """The policy in force for `domain`, or None when it has none (deliver as before)."""
        domain = domain.lower().rstrip(".")
        now = self._clock()
        cached = self._cache.get(domain)
        if cached is not None and cached.expires <= now:
            del self._cache[domain]
            cached = None
        if cached is not None and now - cached.checked < RECHECK_TXT:
            return cached.policy
        try:
            id = record_id(await self._resolver.resolve(f"_mta-sts.{domain}", "TXT"))
        except routing.ResolverError:
            id = None
        if id is None:
            # §5.1: a cached policy stays in force until it expires, whatever DNS says meanwhile
            return None if cached is None else cached.policy
        if cached is not None and cached.policy.id == id:
            cached.checked = now
            return cached.policy
        try:
            policy = parse(await self._fetch(domain), id=id)
        except (PolicyError, aiohttp.ClientError, OSError, TimeoutError, UnicodeDecodeError) as error:
            log.info("MTA-STS policy not fetched", extra={"fields": {"domain": domain, "error": str(error)}})
            return None if cached is None else cached.policy
        self._cache[domain] = _Cached(policy, expires=now + policy.max_age, checked=now)
        self._cache.move_to_end(domain)
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)
        return policy

    async def _fetch(self, domain: str) -> str:
        """§3.3: HTTPS GET of the well-known path at mta-sts.<domain>, its certificate valid for that
        name, no redirects, 200 with text/plain."""
        name = f"mta-sts.{domain}"
        host, port = self._connect_to(name)
        url = f"https://{host}:{port}/.well-known/mta-sts.txt"
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(
                url, ssl=self._tls, server_hostname=name, headers={"Host": name}, allow_redirects=False
            ) as response,
        ):
            if response.status != 200:
                raise PolicyError(f"{name} answered {response.status}")
            if response.content_type != "text/plain":
                raise PolicyError(f"{name} answered {response.content_type}, not text/plain")
            body = await response.content.read(MAX_POLICY_BYTES + 1)
            if len(body) > MAX_POLICY_BYTES:
                raise PolicyError(f"{name}: the policy is larger than {MAX_POLICY_BYTES} bytes")
            return body.decode("utf-8")
