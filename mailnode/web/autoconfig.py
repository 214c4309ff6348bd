"""Zero-typing client set-up, as pure builders from the node config: Thunderbird's autoconfig file
(config-v1.1.xml), Microsoft's Autodiscover POX answer and an Apple configuration profile
(.mobileconfig, unsigned). mailnode.web.server serves them; tests/unit/test_autoconfig.py checks them.

Every answer names the ports clients reach (`web.client`), not the container's, and never a password:
clients ask the user for it.
"""

from __future__ import annotations

import dataclasses
import plistlib
import uuid
import xml.etree.ElementTree as ET
from typing import Final

from mailwire.config import NodeConfig

# Microsoft's Autodiscover POX schemas ([MS-OXDSCLI] §2.2.3, §2.2.4)
AUTODISCOVER_REQUEST: Final = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
AUTODISCOVER_RESPONSE: Final = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
OUTLOOK_RESPONSE: Final = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
MOBILECONFIG_TYPE: Final = "application/x-apple-aspen-config"
# uuid5 namespace of the profile's payloads: the same address gets the same UUIDs, so installing the
# profile again replaces it instead of adding a second account
_PROFILE_NAMESPACE: Final = uuid.UUID("6f1d4a9e-3c52-5b8e-9d2a-6a1f0e4c7b21")


@dataclasses.dataclass(frozen=True)
class Servers:
    """Where clients connect: host, IMAP (implicit TLS and STARTTLS), submission (implicit TLS and
    STARTTLS) and HTTPS (CalDAV, CardDAV)."""

    host: str
    imaps: int
    imap: int
    submissions: int
    submission: int
    https: int
    dav: bool

    @classmethod
    def of(cls, config: NodeConfig) -> Servers:
        client = config.web.client
        return cls(
            host=client.host or config.hostname, imaps=client.imaps, imap=client.imap,
            submissions=client.submissions, submission=client.submission, https=client.https, dav=config.web.dav,
        )  # fmt: skip

    @property
    def dav_url(self) -> str:
        port = "" if self.https == 443 else f":{self.https}"
        return f"https://{self.host}{port}/dav/"


def _element(parent: ET.Element, tag: str, text: str | int | None = None, **attributes: str) -> ET.Element:
    child = ET.SubElement(parent, tag, attributes)
    if text is not None:
        child.text = str(text)
    return child


def _xml(root: ET.Element) -> bytes:
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))


def thunderbird(servers: Servers, *, domain: str) -> bytes:
    """Thunderbird's autoconfig file (https://wiki.mozilla.org/Thunderbird:Autoconfiguration:ConfigFileFormat):
    IMAP and SMTP submission, implicit TLS first, then STARTTLS; with DAV, the address book and calendar."""
    root = ET.Element("clientConfig", version="1.1")
    provider = _element(root, "emailProvider", id=domain)
    _element(provider, "domain", domain)
    _element(provider, "displayName", domain)
    _element(provider, "displayShortName", domain)
    for kind, tag, ports in (
        ("imap", "incomingServer", ((servers.imaps, "SSL"), (servers.imap, "STARTTLS"))),
        ("smtp", "outgoingServer", ((servers.submissions, "SSL"), (servers.submission, "STARTTLS"))),
    ):
        for port, socket_type in ports:
            server = _element(provider, tag, type=kind)
            _element(server, "hostname", servers.host)
            _element(server, "port", port)
            _element(server, "socketType", socket_type)
            _element(server, "authentication", "password-cleartext")
            _element(server, "username", "%EMAILADDRESS%")
    if servers.dav:
        for tag, kind in (("addressBook", "carddav"), ("calendar", "caldav")):
            book = _element(root, tag, type=kind)
            _element(book, "username", "%EMAILADDRESS%")
            _element(book, "authentication", "http-basic")
            _element(book, "serverURL", servers.dav_url)
    return _xml(root)


class AutodiscoverError(ValueError):
    """The request is not an Autodiscover POX request with an e-mail address."""


def autodiscover_address(body: bytes) -> str:
    """The EMailAddress of an Autodiscover POX request ([MS-OXDSCLI] §2.2.3). The caller bounds the
    body's size; expat (Python ≥ 3.11's bundled 2.4+) refuses entity expansion bombs."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as error:
        raise AutodiscoverError(f"not XML: {error}") from error
    found = root.find(f"{{{AUTODISCOVER_REQUEST}}}Request/{{{AUTODISCOVER_REQUEST}}}EMailAddress")
    if found is None or not found.text or "@" not in found.text:
        raise AutodiscoverError("no Request/EMailAddress")
    return found.text.strip()


def autodiscover(servers: Servers, *, address: str) -> bytes:
    """The POX answer for Outlook ([MS-OXDSCLI] §2.2.4.1.1.2): an IMAP and an SMTP account over
    implicit TLS, the address as login name."""
    root = ET.Element("Autodiscover", xmlns=AUTODISCOVER_RESPONSE)
    response = _element(root, "Response", xmlns=OUTLOOK_RESPONSE)
    user = _element(response, "User")
    _element(user, "DisplayName", address)
    account = _element(response, "Account")
    _element(account, "AccountType", "email")
    _element(account, "Action", "settings")
    for kind, port in (("IMAP", servers.imaps), ("SMTP", servers.submissions)):
        protocol = _element(account, "Protocol")
        _element(protocol, "Type", kind)
        _element(protocol, "Server", servers.host)
        _element(protocol, "Port", port)
        _element(protocol, "DomainRequired", "off")
        _element(protocol, "LoginName", address)
        _element(protocol, "SPA", "off")
        _element(protocol, "SSL", "on")
        _element(protocol, "AuthRequired", "on")
        if kind == "SMTP":
            _element(protocol, "UsePOPAuth", "off")
            _element(protocol, "SMTPLast", "off")
    return _xml(root)


def mobileconfig(servers: Servers, *, address: str) -> bytes:
    """An Apple configuration profile (Configuration Profile Reference: com.apple.mail.managed,
    com.apple.caldav.account, com.apple.carddav.account) for one address. Unsigned: iOS and macOS show
    it as "Not Verified" and install it once the user agrees; it holds no password."""

    def payload(kind: str, name: str, **settings: object) -> dict[str, object]:
        return {
            "PayloadType": kind, "PayloadVersion": 1, "PayloadDisplayName": name,
            "PayloadIdentifier": f"{_reverse(servers.host)}.{address}.{kind}",
            "PayloadUUID": str(uuid.uuid5(_PROFILE_NAMESPACE, f"{address}/{kind}")).upper(),
            **settings,
        }  # fmt: skip

    contents = [
        payload(
            "com.apple.mail.managed",
            f"Mail ({address})",
            EmailAccountDescription=address,
            EmailAccountType="EmailTypeIMAP",
            EmailAddress=address,
            IncomingMailServerAuthentication="EmailAuthPassword",
            IncomingMailServerHostName=servers.host,
            IncomingMailServerPortNumber=servers.imaps,
            IncomingMailServerUseSSL=True,
            IncomingMailServerUsername=address,
            OutgoingMailServerAuthentication="EmailAuthPassword",
            OutgoingMailServerHostName=servers.host,
            OutgoingMailServerPortNumber=servers.submissions,
            OutgoingMailServerUseSSL=True,
            OutgoingMailServerUsername=address,
            OutgoingPasswordSameAsIncomingPassword=True,
        )
    ]
    if servers.dav:
        principal = f"{servers.dav_url}{address}/"
        contents += [
            payload(
                "com.apple.caldav.account", f"Calendar ({address})", CalDAVAccountDescription=address,
                CalDAVHostName=servers.host, CalDAVPort=servers.https, CalDAVUseSSL=True, CalDAVUsername=address,
                CalDAVPrincipalURL=principal,
            ),
            payload(
                "com.apple.carddav.account", f"Contacts ({address})", CardDAVAccountDescription=address,
                CardDAVHostName=servers.host, CardDAVPort=servers.https, CardDAVUseSSL=True,
                CardDAVUsername=address, CardDAVPrincipalURL=principal,
            ),
        ]  # fmt: skip
    profile = {
        "PayloadType": "Configuration", "PayloadVersion": 1, "PayloadDisplayName": f"{address} ({servers.host})",
        "PayloadIdentifier": f"{_reverse(servers.host)}.{address}",
        "PayloadUUID": str(uuid.uuid5(_PROFILE_NAMESPACE, address)).upper(), "PayloadContent": contents,
    }  # fmt: skip
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML)


def _reverse(host: str) -> str:
    """A reverse-DNS identifier, as Apple's profiles name their payloads."""
    return ".".join(reversed(host.split(".")))
