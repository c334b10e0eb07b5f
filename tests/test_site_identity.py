"""Identity from authentication (DESIGN.md section 7): the coordinator names a site by what
authenticates it (its CA-issued certificate, proved by a signature over a fresh challenge; in
deployment also the SuperNode key it was registered under), never by what the site says.

Each ``test_malicious_...`` plays a site that lies about who it is, against the coordinator's real
discovery (``Coordinator._discover`` over a ``LocalGrid`` of the real ClientApp handlers), and
asserts it is refused or named by its certificate.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict

from fedlora.client.app import make_client_app
from fedlora.client.site import SiteSpec
from fedlora.errors import FederationError
from fedlora.privacy import key_signing
from fedlora.privacy.key_signing import InMemoryCA
from fedlora.protocol import HelloAsk, SiteInfo, read, record_of
from fedlora.server.coordinator import Coordinator
from fedlora.server.rundir import RunDir
from fedlora.simulation.local_grid import LocalGrid

NAMES = ["finance-1", "finance-2", "finance-3"]


def _sites(tmp_path: Path, ca: InMemoryCA | None, names: list[str] = NAMES, cohort: str = "finance") -> list[SiteSpec]:
    data = tmp_path / "site.csv"  # read at the handshake, against the cohort's labels
    data.write_text("text,label\n" + "".join(f"row {i},{lab}\n" for i, lab in enumerate(["negative", "neutral", "positive"] * 2)))
    out = []
    for n in names:
        s = SiteSpec(name=n, cohort=cohort, data_path=str(data))
        if ca is not None:
            c = ca.credentials(n)
            s = replace(s, signing_key=c.signing_key, certificate=c.certificate, ca=c.ca)
        out.append(s)
    return out


def _discover(make_config, tmp_path: Path, sites: list[SiteSpec], ca_pem: str, registered: dict[int, str] | None = None,
              app=None) -> Coordinator:
    cfg = make_config(tmp_path / "run", cohorts={"finance": {"sites": len(sites)}})
    coordinator = Coordinator(cfg, RunDir.start(cfg), {"finance": ["negative", "neutral", "positive"]}, expected_sites=len(sites),
                              progress=False, wait_timeout=5, ca_pem=ca_pem, registered=registered)
    grid = LocalGrid(app or make_client_app(sites, device="cpu"), len(sites))
    try:
        coordinator._discover(grid)
    except FederationError:
        pass
    return coordinator


def _joined(c: Coordinator) -> dict[int, str]:
    return dict(c.cohorts["finance"].nodes)


def test_honest_sites_are_named_by_their_certificates(make_config, tmp_path: Path) -> None:
    ca = InMemoryCA()
    c = _discover(make_config, tmp_path, _sites(tmp_path, ca), ca.pem)
    assert _joined(c) == {1001: "finance-1", 1002: "finance-2", 1003: "finance-3"}


def test_malicious_site_calling_itself_another_name_is_named_by_its_certificate(make_config, tmp_path: Path, caplog) -> None:
    ca = InMemoryCA()
    sites = _sites(tmp_path, ca)
    app = make_client_app(sites, device="cpu")

    def lying(msg: Message, ctx: Context) -> Message:  # finance-3 (its own certificate and key) says it is finance-1
        if msg.metadata.message_type == "query" and int(ctx.node_config["partition-id"]) == 2:
            key = key_signing.load_signing_key(sites[2].signing_key)
            cert = key_signing.der(key_signing.load_certificate(sites[2].certificate))
            challenge = read(HelloAsk, msg.content, "query").challenge
            forged = SiteInfo(name="finance-1", cohort="finance", cert=cert,
                              sig=key_signing.sign_hello(key, challenge, "finance-3", "finance"))
            return Message(RecordDict({SiteInfo.record: record_of(forged)}), reply_to=msg)
        return app(msg, ctx)

    with caplog.at_level(logging.WARNING, logger="fedlora.server"):
        c = _discover(make_config, tmp_path, sites, ca.pem, app=lying)
    assert _joined(c)[1003] == "finance-3"
    assert "named by its certificate" in caplog.text


def test_malicious_site_without_a_certificate_or_from_another_ca_is_refused(make_config, tmp_path: Path, caplog) -> None:
    ca, other = InMemoryCA(), InMemoryCA()
    sites = _sites(tmp_path, ca)
    sites[1] = replace(sites[1], signing_key="", certificate="", ca="")  # unauthenticated
    stranger = other.credentials("finance-3")
    sites[2] = replace(sites[2], signing_key=stranger.signing_key, certificate=stranger.certificate, ca=stranger.ca)
    with caplog.at_level(logging.WARNING, logger="fedlora.server"):
        c = _discover(make_config, tmp_path, sites, ca.pem)
    assert _joined(c) == {1001: "finance-1"}
    assert "node 1002 (calling itself 'finance-2') is not authenticated" in caplog.text
    assert "not issued by the federation CA" in caplog.text


def test_malicious_replayed_hello_from_an_earlier_challenge_is_refused(make_config, tmp_path: Path, caplog) -> None:
    """A recorded answer (signature over another challenge) does not let anyone join as that site."""
    ca = InMemoryCA()
    sites = _sites(tmp_path, ca)
    app = make_client_app(sites, device="cpu")
    key = key_signing.load_signing_key(sites[1].signing_key)
    old = key_signing.sign_hello(key, b"\x00" * 32, "finance-2", "finance")

    def replaying(msg: Message, ctx: Context) -> Message:
        reply = app(msg, ctx)
        if msg.metadata.message_type == "query" and int(ctx.node_config["partition-id"]) == 1:
            info = replace(read(SiteInfo, reply.content, "query"), sig=old)
            reply = Message(RecordDict({SiteInfo.record: record_of(info)}), reply_to=msg)
        return reply

    with caplog.at_level(logging.WARNING, logger="fedlora.server"):
        c = _discover(make_config, tmp_path, sites, ca.pem, app=replaying)
    assert 1002 not in _joined(c)
    assert "challenge does not verify" in caplog.text


def test_malicious_duplicate_certified_name_is_refused(make_config, tmp_path: Path, caplog) -> None:
    """Two nodes with certificates for the same name (a CA that issued twice, or a stolen key):
    the second is refused, never counted twice."""
    ca = InMemoryCA()
    sites = _sites(tmp_path, ca, ["finance-1", "finance-2", "finance-2"])
    with caplog.at_level(logging.WARNING, logger="fedlora.server"):
        c = _discover(make_config, tmp_path, sites, ca.pem)
    assert sorted(_joined(c).values()) == ["finance-1", "finance-2"]
    assert "a name another site already holds; refused" in caplog.text


def test_malicious_unregistered_node_or_certificate_of_another_registered_site_is_refused(make_config, tmp_path: Path,
                                                                                          caplog) -> None:
    """Deployment: node ids come from the registered SuperNode keys; a node not registered is
    refused, and so is one whose certificate names another site than its key."""
    ca = InMemoryCA()
    sites = _sites(tmp_path, ca)
    registered = {1001: "finance-1", 1002: "finance-3"}  # 1002's key is finance-3's, its certificate finance-2's; 1003 unregistered
    with caplog.at_level(logging.WARNING, logger="fedlora.server"):
        c = _discover(make_config, tmp_path, sites, ca.pem, registered=registered)
    assert _joined(c) == {1001: "finance-1"}
    assert "registered as finance-3 but its certificate names 'finance-2'" in caplog.text
    assert "node 1003 (calling itself 'finance-3') is not among the registered site keys" in caplog.text


def test_without_a_ca_the_coordinator_keeps_self_reported_names(make_config, tmp_path: Path) -> None:
    """No federation CA (secure aggregation off, or an insecure deployment): names as the sites say."""
    c = _discover(make_config, tmp_path, _sites(tmp_path, None), "")
    assert sorted(_joined(c).values()) == NAMES


def test_a_site_signs_its_hello_and_the_statement_binds_challenge_name_and_cohort() -> None:
    base = key_signing.hello_statement(b"c" * 32, "finance-1", "finance")
    for other in (key_signing.hello_statement(b"d" * 32, "finance-1", "finance"),
                  key_signing.hello_statement(b"c" * 32, "finance-2", "finance"),
                  key_signing.hello_statement(b"c" * 32, "finance-1", "medical")):
        assert other != base
    ca = InMemoryCA()
    creds = ca.credentials("finance-1")
    key = key_signing.load_signing_key(creds.signing_key)
    cert = key_signing.der(key_signing.load_certificate(creds.certificate))
    sig = key_signing.sign_hello(key, b"c" * 32, "finance-1", "finance")
    assert key_signing.verify_hello(cert, sig, ca.pem, b"c" * 32, "finance") == "finance-1"
    with pytest.raises(key_signing.KeyAuthError, match="does not verify"):
        key_signing.verify_hello(cert, sig, ca.pem, b"c" * 32, "medical")  # the cohort is signed too


def test_a_site_with_wrong_labels_or_an_unknown_cohort_stops_at_its_side_and_the_coordinator_learns_only_a_code(
        make_config, tmp_path: Path, caplog) -> None:
    """At the handshake the coordinator offers the run's cohorts and labels (public). A site whose
    file holds a label its cohort does not have, and one whose cohort the run does not train,
    refuse to join: each is stopped at its side (``on_fatal``, the full message: file, row,
    label), is not counted as joined, and the coordinator's log names the site and the reason
    class (codes 4205 / 4206) but nothing of its data (no path, no row, no label value)."""
    ca = InMemoryCA()
    good = _sites(tmp_path, ca, ["finance-1"])[0]
    secret = tmp_path / "private-bank-c-ledger.csv"
    secret.write_text("text,label\nq3 outlook,neutral\nrates flat,flat\n")
    bad_labels = replace(_sites(tmp_path, ca, ["finance-2"])[0], data_path=str(secret))
    other_cohort = _sites(tmp_path, ca, ["retail-1"], cohort="retail")[0]
    fatal: list[str] = []
    app = make_client_app([good, bad_labels, other_cohort], device="cpu", on_fatal=fatal.append)
    with caplog.at_level(logging.INFO):
        c = _discover(make_config, tmp_path, [good, bad_labels, other_cohort], ca.pem, app=app)
    assert _joined(c) == {1001: "finance-1"}
    assert len(fatal) == 2
    assert any("finance-2" in f and "private-bank-c-ledger.csv" in f and "'flat'" in f for f in fatal), fatal
    assert any("retail-1" in f and "'retail' is not one of this federation's cohorts (finance)" in f for f in fatal), fatal
    server = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("fedlora.server"))
    assert "its data does not fit its cohort's labels" in server and "is not one of this run's" in server, server
    assert "joined: finance: finance-1; did not join: node 1002, node 1003" in server, server
    for leak in ("private-bank-c-ledger", "flat", "row 2", "rates"):
        assert leak not in server, (leak, server)
