"""The operator's side of the HTTPS listener: spec.dav and spec.mtaSts in the node config, the port on
the container and the Service only with a certificate, the records to publish (MTA-STS and TLS
reporting, autoconfig/autodiscover, RFC 6186 and RFC 6764 SRV) and the certificate's names."""

from __future__ import annotations

from mailfleet import api, specs
from mailfleet.specs import common, network
from mailwire import config, mtasts
from tests.unit.test_specs import example_domain


def records(domain: api.MailDomain) -> dict[tuple[str, str], str]:
    found = specs.dns_records(domain, dkim_record=None)
    for record in found:
        api.DNSRecord.model_validate(record)
    return {(r["type"], r["name"]): r["value"] for r in found}


def test_the_https_records_for_the_domain_and_its_alias() -> None:
    by_name = records(example_domain())  # examples/maildomain.yaml enables DAV
    for name in ("example.com", "example.net"):
        assert by_name[("TXT", f"_smtp._tls.{name}")] == "v=TLSRPTv1; rua=mailto:postmaster@example.com"
        assert by_name[("TXT", f"_mta-sts.{name}")].startswith("v=STSv1; id=")
        for host in ("mta-sts", "autoconfig", "autodiscover"):
            assert by_name[("CNAME", f"{host}.{name}")] == "mail.example.com."
        assert by_name[("SRV", f"_submission._tcp.{name}")] == "0 1 587 mail.example.com."
        assert by_name[("SRV", f"_submissions._tcp.{name}")] == "0 1 465 mail.example.com."
        assert by_name[("SRV", f"_imaps._tcp.{name}")] == "0 1 993 mail.example.com."
        assert by_name[("SRV", f"_imap._tcp.{name}")] == "0 1 143 mail.example.com."
        assert by_name[("SRV", f"_caldavs._tcp.{name}")] == "0 1 443 mail.example.com."
        assert by_name[("TXT", f"_carddavs._tcp.{name}")] == "path=/dav/"


def test_no_dav_records_without_dav_and_no_https_records_without_a_certificate() -> None:
    without_dav = records(example_domain(dav={"enabled": False}))
    assert ("SRV", "_imaps._tcp.example.com") in without_dav
    assert not any("dav" in name for _, name in without_dav)
    without_tls = records(example_domain(tls=None))
    assert not any(kind in ("SRV", "CNAME") or "sts" in name for kind, name in without_tls)


def test_the_mta_sts_id_follows_the_policy_the_nodes_serve() -> None:
    testing, enforce = example_domain(), example_domain(mtaSts="enforce")
    policy = network.mta_sts_policy(enforce)
    # what mailnode.web.server serves from the node config the operator renders
    node = config.NodeConfig.model_validate({**specs.node_config(enforce), "data_dir": "/d", "directory_file": "/f"})
    served = mtasts.policy(mode=node.domains[0].mta_sts, mx=[node.hostname], max_age=node.web.mta_sts_max_age)
    assert policy == served
    assert "mode: enforce\r\n" in policy and "mx: mail.example.com\r\n" in policy
    ids = {records(d)[("TXT", "_mta-sts.example.com")] for d in (testing, enforce)}
    assert len(ids) == 2  # a new mode is a new id: senders fetch the policy again


def test_the_node_config_of_dav_and_mta_sts() -> None:
    plain = specs.node_config(example_domain(dav={"enabled": False}))
    assert "mta_sts" not in plain["domains"][0]  # the default: configs of domains that never set it stay as they were
    assert plain["web"] == {"dav": False}
    on = config.NodeConfig.model_validate(specs.node_config(example_domain(dav={"enabled": True}, mtaSts="none")))
    assert on.web.dav is True and on.domains[0].mta_sts == "none"
    assert on.listen.https == 8443
    assert "web" not in specs.node_config(example_domain(tls=None))


def test_the_certificate_names() -> None:
    assert common.tls_names(example_domain()) == [
        "mail.example.com", "autoconfig.example.com", "autodiscover.example.com", "mta-sts.example.com",
        "autoconfig.example.net", "autodiscover.example.net", "mta-sts.example.net",
    ]  # fmt: skip
