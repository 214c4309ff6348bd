"""The pure builders of client set-up and MTA-STS: Thunderbird's file, Autodiscover's request parsing
and answer, the Apple profile, the policy text and its record id (mailnode.web.autoconfig, mailwire.mtasts)."""

from __future__ import annotations

import plistlib
import xml.etree.ElementTree as ET

import pytest

from mailnode.web import autoconfig
from mailwire import mtasts

SERVERS = autoconfig.Servers(
    host="mail.example.com", imaps=993, imap=143, submissions=465, submission=587, https=443, dav=True
)


def test_thunderbird_names_implicit_tls_first_and_the_dav_url() -> None:
    root = ET.fromstring(autoconfig.thunderbird(SERVERS, domain="example.com"))
    assert root.get("version") == "1.1"
    assert root.find("emailProvider").get("id") == "example.com"  # type: ignore[union-attr]
    incoming = [(s.findtext("port"), s.findtext("socketType")) for s in root.iterfind("emailProvider/incomingServer")]
    assert incoming == [("993", "SSL"), ("143", "STARTTLS")]
    assert {s.findtext("username") for s in root.iter() if s.tag.endswith("Server")} == {"%EMAILADDRESS%"}
    assert root.findtext("addressBook/serverURL") == "https://mail.example.com/dav/"


def test_thunderbird_without_dav_and_on_another_port() -> None:
    servers = autoconfig.Servers(
        host="127.0.0.1", imaps=20004, imap=20003, submissions=20002, submission=20001, https=20008, dav=False
    )
    root = ET.fromstring(autoconfig.thunderbird(servers, domain="example.com"))
    assert root.find("calendar") is None and root.find("addressBook") is None
    assert servers.dav_url == "https://127.0.0.1:20008/dav/"


def test_autodiscover_request_and_answer() -> None:
    request = (
        f'<Autodiscover xmlns="{autoconfig.AUTODISCOVER_REQUEST}"><Request>'
        "<EMailAddress> user@example.com </EMailAddress></Request></Autodiscover>"
    ).encode()
    assert autoconfig.autodiscover_address(request) == "user@example.com"
    for bad in (b"not xml", b"<Autodiscover/>", request.replace(b"user@example.com", b"nobody")):
        with pytest.raises(autoconfig.AutodiscoverError):
            autoconfig.autodiscover_address(bad)
    answer = ET.fromstring(autoconfig.autodiscover(SERVERS, address="user@example.com"))
    ns = {"o": autoconfig.OUTLOOK_RESPONSE}
    assert answer.tag == f"{{{autoconfig.AUTODISCOVER_RESPONSE}}}Autodiscover"
    assert [p.findtext("o:SSL", namespaces=ns) for p in answer.iterfind(".//o:Protocol", ns)] == ["on", "on"]


def test_entity_expansion_is_refused() -> None:
    # "billion laughs": 10**9 bytes from a few hundred; expat (2.4+) stops at its amplification limit
    entities = '<!ENTITY e0 "lol">' + "".join(f'<!ENTITY e{i} "{f"&e{i - 1};" * 10}">' for i in range(1, 10))
    bomb = f'<!DOCTYPE a [{entities}]><a xmlns="{autoconfig.AUTODISCOVER_REQUEST}">&e9;</a>'.encode()
    with pytest.raises(autoconfig.AutodiscoverError, match="not XML"):
        autoconfig.autodiscover_address(bomb)


def test_mobileconfig_is_stable_per_address() -> None:
    first = plistlib.loads(autoconfig.mobileconfig(SERVERS, address="user@example.com"))
    again = plistlib.loads(autoconfig.mobileconfig(SERVERS, address="user@example.com"))
    other = plistlib.loads(autoconfig.mobileconfig(SERVERS, address="other@example.com"))
    assert first == again  # installing it twice replaces the account
    assert first["PayloadUUID"] != other["PayloadUUID"]
    mail = first["PayloadContent"][0]
    assert (mail["IncomingMailServerPortNumber"], mail["OutgoingMailServerPortNumber"]) == (993, 465)
    assert mail["IncomingMailServerUseSSL"] and mail["OutgoingMailServerUseSSL"]


def test_mta_sts_policy_and_its_id() -> None:
    text = mtasts.policy(mode="enforce", mx=["mail.example.com", "*.example.net"], max_age=86400)
    assert text == (
        "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 86400\r\n"
    )
    record = mtasts.txt_record(text)
    assert record.startswith("v=STSv1; id=") and record[len("v=STSv1; id=") :].isalnum()
    assert record == mtasts.txt_record(text)
    assert record != mtasts.txt_record(text.replace("enforce", "testing"))
