"""Checks of mail arriving from outside: SPF (RFC 7208, with pyspf) and DKIM (RFC 6376, with dkimpy),
reported to the recipient in an Authentication-Results header (RFC 8601). Nothing is refused for a
failed check by default; `smtp.check_inbound: false` turns the checks off.

The checks do DNS lookups, so the MX listener runs `InboundChecker.header` through the Gateway. Their
results are remembered for `cache_ttl` seconds (an SPF verdict per client address, sender and HELO; a
DKIM key record per name): a burst of mail from one sender costs one set of lookups, not one per
message. Lookups are injectable (`spf_records`, `dkim_dns`) so tests answer them without a network.
"""

from __future__ import annotations

import collections
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import dkim as dkimpy
import spf

DNSFunc = Callable[..., bytes | None]
_T = TypeVar("_T")
_CACHE_SIZE = 10_000

_SIGNATURE_DOMAIN = re.compile(rb"\bd=([^;\s]+)", re.I)
_VALUE_UNSAFE = re.compile(r"[^\x21-\x7e]|[;()\"\\]")


def _value(text: str) -> str:
    """A header value token: RFC 8601 values are tokens or quoted strings; we keep to plain tokens."""
    return _VALUE_UNSAFE.sub("", text)[:255] or "unknown"


class InboundChecker:
    def __init__(
        self,
        *,
        authserv_id: str,
        timeout: float = 10.0,
        spf_records: Mapping[tuple[str, str], Sequence[object]] | None = None,
        dkim_dns: DNSFunc | None = None,
        cache_ttl: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`spf_records` pre-answers pyspf's DNS ((name, type) -> answers, as its cache holds them);
        `dkim_dns(name) -> TXT bytes` answers dkimpy's key lookups."""
        self._authserv_id = authserv_id
        self._timeout = timeout
        self._spf_records = dict(spf_records or {})
        self._dkim_dns = dkim_dns or self._cached_dkim_dns
        self._cache_ttl = cache_ttl
        self._clock = clock
        self._cache: collections.OrderedDict[tuple[str, ...], tuple[float, object]] = collections.OrderedDict()
        self._lock = threading.Lock()  # the Gateway runs checks on several threads

    def _remembered(self, key: tuple[str, ...], compute: Callable[[], _T]) -> _T:
        now = self._clock()
        with self._lock:
            found = self._cache.get(key)
            if found is not None and found[0] > now:
                return found[1]  # type: ignore[return-value]
        value = compute()
        with self._lock:
            self._cache[key] = (now + self._cache_ttl, value)
            self._cache.move_to_end(key)
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return value

    def _cached_dkim_dns(self, name: bytes, timeout: int = 5) -> bytes | None:
        result = self._remembered(("dkim", name.decode("ascii", "replace")), lambda: dkimpy.dnsplug.get_txt(name))
        return result if isinstance(result, bytes) else None

    def spf(self, *, ip: str, sender: str, helo: str) -> str:
        """The SPF result for the envelope sender (or, for the null sender, the HELO name)."""
        identity = sender or f"postmaster@{helo}"

        def check() -> str:
            try:
                query = spf.query(i=ip, s=identity, h=helo, timeout=self._timeout, querytime=self._timeout)
                query.cache.update(self._spf_records)
                result, _code, _explanation = query.check()
            except Exception:  # pyspf raises on malformed input; treat as its own verdict
                return "permerror"
            return str(result).lower()

        return self._remembered(("spf", ip, identity.lower(), helo.lower()), check)

    def dkim(self, message: bytes) -> list[tuple[str, str]]:
        """(result, signing domain) for each DKIM-Signature of the message."""
        header_block = message.split(b"\r\n\r\n", 1)[0]
        signatures = re.findall(rb"(?im)^DKIM-Signature:(.*(?:\r\n[ \t].*)*)", header_block)
        results: list[tuple[str, str]] = []
        for index, signature in enumerate(signatures):
            match = _SIGNATURE_DOMAIN.search(signature)
            domain = match.group(1).decode("ascii", "replace") if match else "unknown"
            try:
                checker = dkimpy.DKIM(message)
                kwargs = {"dnsfunc": self._dkim_dns} if self._dkim_dns is not None else {}
                ok = checker.verify(idx=index, **kwargs)
                results.append(("pass" if ok else "fail", domain))
            except dkimpy.ValidationError:  # e.g. the body hash does not match: the signature fails
                results.append(("fail", domain))
            except dkimpy.DKIMException:  # a malformed signature or key
                results.append(("permerror", domain))
            except Exception:  # DNS trouble and the like
                results.append(("temperror", domain))
        return results

    def header(self, *, ip: str, helo: str, sender: str, message: bytes) -> bytes:
        """The Authentication-Results header (CRLF-terminated) for one message."""
        parts = [f"spf={self.spf(ip=ip, sender=sender, helo=helo)} smtp.mailfrom={_value(sender or helo)}"]
        dkim_results = self.dkim(message)
        if dkim_results:
            parts += [f"dkim={result} header.d={_value(domain)}" for result, domain in dkim_results]
        else:
            parts.append("dkim=none")
        return format_header(self._authserv_id, parts)


def format_header(authserv_id: str, results: Sequence[str]) -> bytes:
    text = f"Authentication-Results: {authserv_id};" + ";".join(f"\r\n\t{result}" for result in results) + "\r\n"
    return text.encode("ascii", "replace")
