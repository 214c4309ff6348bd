"""Inbound checks: SPF results from pyspf with the DNS answers given, DKIM results from dkimpy for
signed, altered and unsigned mail, and the Authentication-Results header that reports them."""

from __future__ import annotations

import pytest
import spf

from mailnode import dkim
from mailnode.smtp.inbound import InboundChecker

MESSAGE = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nHello.\r\n"
# pyspf's cache form: (name, type) -> answers. mx.example.org publishes a TXT record that is no SPF.
SPF = {("example.org", "TXT"): [[b"v=spf1 ip4:192.0.2.1 -all"]], ("mx.example.org", "TXT"): [[b"hello"]]}


def test_spf_results() -> None:
    checker = InboundChecker(authserv_id="mail.example.com", spf_records=SPF, timeout=2)
    assert checker.spf(ip="192.0.2.1", sender="a@example.org", helo="mx.example.org") == "pass"
    assert checker.spf(ip="198.51.100.7", sender="a@example.org", helo="mx.example.org") == "fail"


def test_dkim_results_and_the_header() -> None:
    key = dkim.generate_key(1024)
    record = dkim.record(key, domain="example.org", selector="s")
    signed = dkim.sign(MESSAGE, domain="example.org", selector="s", private_key=key) + MESSAGE
    lookup = {record.name: record.value.encode()}

    def dns(name: bytes, timeout: int = 5) -> bytes | None:
        return lookup.get(name.decode().rstrip("."))

    checker = InboundChecker(authserv_id="mail.example.com", spf_records=SPF, dkim_dns=dns, timeout=2)
    assert checker.dkim(signed) == [("pass", "example.org")]
    assert checker.dkim(signed.replace(b"Hello.", b"Goodbye.")) == [("fail", "example.org")]
    assert checker.dkim(MESSAGE) == []
    header = checker.header(ip="192.0.2.1", helo="mx.example.org", sender="a@example.org", message=signed)
    assert header == (
        b"Authentication-Results: mail.example.com;\r\n\tspf=pass smtp.mailfrom=a@example.org;"
        b"\r\n\tdkim=pass header.d=example.org\r\n"
    )
    unsigned = checker.header(ip="198.51.100.7", helo="mx.example.org", sender="", message=MESSAGE)
    assert b"spf=none smtp.mailfrom=mx.example.org" in unsigned  # null sender: the HELO name is checked
    assert unsigned.endswith(b"\r\n\tdkim=none\r\n")


def test_verdicts_are_remembered_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    queries: list[str] = []
    real_query = spf.query

    def counting_query(*args: object, **kwargs: object) -> object:
        queries.append(str(kwargs.get("s")))
        return real_query(*args, **kwargs)

    monkeypatch.setattr(spf, "query", counting_query)
    now = [0.0]
    checker = InboundChecker(authserv_id="m", spf_records=SPF, timeout=2, cache_ttl=60, clock=lambda: now[0])
    for _ in range(3):
        assert checker.spf(ip="192.0.2.1", sender="a@example.org", helo="mx.example.org") == "pass"
    assert len(queries) == 1
    assert checker.spf(ip="198.51.100.7", sender="a@example.org", helo="mx.example.org") == "fail"  # another key
    now[0] += 61
    assert checker.spf(ip="192.0.2.1", sender="a@example.org", helo="mx.example.org") == "pass"
    assert len(queries) == 3
