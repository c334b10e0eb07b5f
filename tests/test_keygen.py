"""Keys born where they are used: ``fedlora keygen`` at a site, ``fedlora certs --sign-requests`` at the
operator, the coordinator's folder without any site's key or the CA's; keys readable by others refused
at use; ``fedlora server`` without ``--config``; ``fedlora privacy-report --site``."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedlora.cli import main
from fedlora.errors import ConfigError, DeploymentError
from fedlora.keyfiles import check_private_key_file
from fedlora.privacy import key_signing
from fedlora.server.certs import check_server_certs, coordinator_dir, keygen, sign_requests, site_public_keys


def _sites(tmp_path: Path, *names: str) -> dict[str, Path]:
    """Each site's own folder after ``fedlora keygen`` (run through the CLI)."""
    out = {}
    for n in names:
        assert main(["keygen", "--site", n, "--out", str(tmp_path / f"at-{n}")]) == 0
        out[n] = tmp_path / f"at-{n}"
    return out


def _csr(key: ec.EllipticCurvePrivateKey, cn: str) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA384()).public_bytes(serialization.Encoding.DER)


def test_keygen_writes_a_0600_key_its_pub_and_a_csr_naming_the_site_and_never_overwrites(tmp_path: Path, capsys) -> None:
    d = _sites(tmp_path, "bank-a")["bank-a"]
    printed = capsys.readouterr().out
    assert sorted(p.name for p in d.iterdir()) == ["bank-a.csr", "bank-a.key", "bank-a.pub"]
    assert stat.S_IMODE((d / "bank-a.key").stat().st_mode) == 0o600 and stat.S_IMODE(d.stat().st_mode) == 0o700
    key = serialization.load_ssh_private_key((d / "bank-a.key").read_bytes(), None)  # what flower-supernode reads
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    from flwr.cli.supernode.register import try_load_public_key

    assert try_load_public_key(d / "bank-a.pub")  # what `flwr supernode register` reads
    pub = serialization.load_ssh_public_key((d / "bank-a.pub").read_bytes().split(b"\n")[0])
    csr = x509.load_pem_x509_csr((d / "bank-a.csr").read_bytes())
    assert csr.is_signature_valid
    assert [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == ["bank-a"]
    assert csr.public_key().public_numbers() == pub.public_numbers() == key.public_key().public_numbers()
    assert "bank-a.pub" in printed and "bank-a.csr" in printed and "never copy" in printed
    send = next(line for line in printed.splitlines() if "send to the federation's operator" in line)
    assert "bank-a.pub" in send and "bank-a.csr" in send and ".key" not in send  # the .key is named only as what stays here
    # again: nothing overwritten; a lost .csr is remade for the key already there
    before = (d / "bank-a.key").read_bytes()
    (d / "bank-a.csr").unlink()
    r = keygen("bank-a", d)
    assert r.created == ["bank-a.csr"] and r.kept == ["bank-a.key", "bank-a.pub"] and (d / "bank-a.key").read_bytes() == before
    assert x509.load_pem_x509_csr((d / "bank-a.csr").read_bytes()).public_key().public_numbers() == key.public_key().public_numbers()
    with pytest.raises(ConfigError, match="site name"):
        keygen("../evil", tmp_path / "evil")
    assert not (tmp_path / "evil").exists()


def test_signed_requests_give_certificates_a_site_signs_secagg_keys_with_and_peers_verify(tmp_path: Path) -> None:
    from fedlora.client.secagg_site import _signed_keys
    from fedlora.client.site import SiteSpec

    at = _sites(tmp_path, "bank-a", "clinic-b")
    out = tmp_path / "federation"
    # bank-a's .pub beside its .csr; clinic-b's .pub given explicitly
    assert main(["certs", "--out", str(out), "--hosts", "coordinator.example.org", "--sign-requests", str(at["bank-a"] / "bank-a.csr"),
                 str(at["clinic-b"] / "clinic-b.csr"), str(at["clinic-b"] / "clinic-b.pub")]) == 0
    for n, d in at.items():  # the operator sends back ca.pem and the .crt; the key never moved
        (d / f"{n}.crt").write_bytes((out / "sites" / n / f"{n}.crt").read_bytes())
        (d / "ca.pem").write_bytes((out / "sites" / n / "ca.pem").read_bytes())
    ca_pem = (out / "operator" / "ca.pem").read_text()
    assert (out / "coordinator" / "ca.pem").read_text() == ca_pem
    # a site signs its SecAgg keys as the real handler does, from the files its node config names
    spec = SiteSpec.from_node_config({"domain": "finance", "site-name": "bank-a", "data-path": str(tmp_path / "d.csv"),
                                      "signing-key": str(at["bank-a"] / "bank-a.key"), "cert": str(at["bank-a"] / "bank-a.crt"),
                                      "ca": str(at["bank-a"] / "ca.pem")})
    ctx = key_signing.KeyContext("round-1", "finance", 1, "train")
    c_pk, s_pk = bytes(range(32)), bytes(range(32, 64))
    signed = _signed_keys(spec.credentials, ctx, c_pk, s_pk)
    assert signed.sig and signed.cert
    peer = key_signing.SignedKeys(signed.c_pk, signed.s_pk, signed.sig, signed.cert)
    assert key_signing.verify_peers({7: peer}, (at["clinic-b"] / "ca.pem").read_text(), ctx, "clinic-b") == {7: "bank-a"}
    with pytest.raises(key_signing.KeyAuthError, match="does not verify"):  # the coordinator substitutes a key: refused
        key_signing.verify_peers({7: key_signing.SignedKeys(bytes(32), s_pk, signed.sig, signed.cert)}, ca_pem, ctx, "clinic-b")
    cert = key_signing.load_certificate((out / "sites" / "clinic-b" / "clinic-b.crt").read_bytes())
    assert key_signing.check_certificate(cert, key_signing.load_certificate(ca_pem)) == "clinic-b"
    key_signing.check_own(key_signing.Credentials("clinic-b", (at["clinic-b"] / "clinic-b.key").read_text(),
                                                  (at["clinic-b"] / "clinic-b.crt").read_text(), ca_pem))


def test_the_coordinator_folder_holds_no_private_key_but_server_key_and_server_reads_it(tmp_path: Path) -> None:
    at = _sites(tmp_path, "bank-a", "clinic-b")
    out = sign_requests(tmp_path / "fed", ["coordinator.example.org"], [at["bank-a"] / "bank-a.csr", at["clinic-b"] / "clinic-b.csr"]).out
    coord = out / "coordinator"
    assert sorted(p.name for p in coord.iterdir()) == ["bank-a.pub", "ca.pem", "clinic-b.pub", "server.key", "server.pem"]
    assert [p.name for p in coord.iterdir() if b"PRIVATE KEY" in p.read_bytes()] == ["server.key"]
    for name in ("sites/bank-a", "sites/clinic-b"):
        assert not [p for p in (out / name).iterdir() if b"PRIVATE KEY" in p.read_bytes()]
    assert sorted(p.name for p in (out / "operator").iterdir()) == ["ca.key", "ca.pem"]
    assert sorted(p.name for p in out.rglob("*.key")) == ["ca.key", "server.key"]
    # the allowlist entries are the sites' own public keys, byte for byte
    for n in at:
        assert (coord / f"{n}.pub").read_bytes() == (at[n] / f"{n}.pub").read_bytes()
    # fedlora server --certs DIR finds DIR/coordinator; DIR/coordinator itself works too; no ca.key needed
    assert coordinator_dir(out) == coord and coordinator_dir(coord) == coord
    check_server_certs(coordinator_dir(out))
    assert sorted(site_public_keys(coordinator_dir(out))) == ["bank-a", "clinic-b"]
    assert "--sites" not in (out / "WHERE-FILES-GO.txt").read_text()
    # a second call adds a site and keeps everything else
    more = _sites(tmp_path, "shop-c")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "WHERE-FILES-GO.txt"}
    r = sign_requests(out, ["coordinator.example.org"], [more["shop-c"] / "shop-c.csr", at["bank-a"] / "bank-a.csr"])
    assert sorted(r.created) == ["coordinator/shop-c.pub", "sites/shop-c/ca.pem", "sites/shop-c/shop-c.crt"]
    assert all(p.read_bytes() == b for p, b in before.items())


def test_the_one_shot_demo_mode_is_labelled_and_kept_apart(tmp_path: Path, capsys) -> None:
    assert main(["certs", "--out", str(tmp_path / "demo"), "--sites", "a,b"]) == 0
    assert "for tests and demos: makes the sites' private keys here" in (tmp_path / "demo" / "WHERE-FILES-GO.txt").read_text()
    at = _sites(tmp_path, "c")
    capsys.readouterr()
    assert main(["certs", "--out", str(tmp_path / "demo"), "--sign-requests", str(at["c"] / "c.csr")]) == 2
    assert "one-shot" in capsys.readouterr().err
    assert main(["certs", "--out", str(tmp_path / "x"), "--sites", "d", "--sign-requests", str(at["c"] / "c.csr")]) == 2
    assert not (tmp_path / "x").exists()


def test_forged_or_misnamed_requests_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    at = _sites(tmp_path, "site-a", "site-b")
    good = (at["site-a"] / "site-a.csr").read_bytes()
    csr_a = x509.load_pem_x509_csr(good)
    der = csr_a.public_bytes(serialization.Encoding.DER)
    forged = tmp_path / "forged"
    forged.mkdir()
    # 1. the name changed after signing (site-a's key certified as site-b)
    (forged / "renamed.csr").write_bytes(der.replace(b"site-a", b"site-b"))
    # 2. the key swapped after signing (site-b's public key under site-a's signature)
    spki = lambda c: c.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)  # noqa: E731
    csr_b = x509.load_pem_x509_csr((at["site-b"] / "site-b.csr").read_bytes())
    assert spki(csr_a) in der
    (forged / "swapped.csr").write_bytes(der.replace(spki(csr_a), spki(csr_b)))
    out = tmp_path / "fed"
    for bad in ("renamed.csr", "swapped.csr"):
        assert x509.load_der_x509_csr((forged / bad).read_bytes())  # it parses: only the signature gives it away
        with pytest.raises(ConfigError, match="signature does not verify"):
            sign_requests(out, ["h"], [forged / bad])
    # 3. validly signed, but not a site name (a path, the CA's or the coordinator's file names)
    key = ec.generate_private_key(ec.SECP384R1())
    for i, cn in enumerate(["../evil", "ca", "server", "a b"]):
        (forged / f"n{i}.csr").write_bytes(_csr(key, cn))
        with pytest.raises(ConfigError, match="site name"):
            sign_requests(out, ["h"], [forged / f"n{i}.csr"])
    # 4. a .pub beside the request that is not the request's key
    (forged / "site-a.csr").write_bytes(good)
    (forged / "site-a.pub").write_bytes((at["site-b"] / "site-b.pub").read_bytes())
    with pytest.raises(ConfigError, match="does not hold the key"):
        sign_requests(out, ["h"], [forged / "site-a.csr"])
    # 5. one key asking for two names
    (forged / "twin.csr").write_bytes(_csr(key, "twin-1"))
    (forged / "twin2.csr").write_bytes(_csr(key, "twin-2"))
    with pytest.raises(ConfigError, match="one key cannot stand for two sites"):
        sign_requests(out, ["h"], [forged / "twin.csr", forged / "twin2.csr"])
    assert not out.exists()
    # 6. a registered site asking again with another key
    sign_requests(out, ["h"], [at["site-a"] / "site-a.csr"])
    other = ec.generate_private_key(ec.SECP384R1())
    (forged / "again.csr").write_bytes(_csr(other, "site-a"))
    with pytest.raises(ConfigError, match="registered with another key"):
        sign_requests(out, ["h"], [forged / "again.csr"])


def test_keys_readable_by_others_are_refused_at_use(tmp_path: Path) -> None:
    from fedlora.client.agent import SiteOptions, check_site

    at = _sites(tmp_path, "finance-1")
    key = at["finance-1"] / "finance-1.key"
    out = sign_requests(tmp_path / "fed", ["h"], [at["finance-1"] / "finance-1.csr"]).out
    check_private_key_file(key)  # 0600: fine
    key.chmod(0o644)
    with pytest.raises(DeploymentError) as e:
        check_private_key_file(key)
    assert str(key) in str(e.value) and "0644" in str(e.value) and f"chmod 600 {key}" in str(e.value)
    # the client's key-loading path, before anything else is read or started
    opts = SiteOptions(server="127.0.0.1:9092", data=tmp_path / "absent.csv", domain="finance", name="finance-1", key=key,
                       root_cert=out / "sites" / "finance-1" / "ca.pem")
    with pytest.raises(DeploymentError, match="chmod 600"):
        check_site(opts)
    key.chmod(0o600)
    with pytest.raises(Exception) as e:  # now past the key: the missing data file is what stops it
        check_site(opts)
    assert "chmod" not in str(e.value) and "absent.csv" in str(e.value)
    # the coordinator's server.key, and the CA's key when fedlora certs reads it again
    (out / "coordinator" / "server.key").chmod(0o640)
    with pytest.raises(DeploymentError, match="server.key has mode 0640"):
        check_server_certs(coordinator_dir(out))
    (out / "operator" / "ca.key").chmod(0o604)
    more = _sites(tmp_path, "finance-2")
    with pytest.raises(DeploymentError, match="ca.key has mode 0604"):
        sign_requests(out, ["h"], [more["finance-2"] / "finance-2.csr"])
    assert not (out / "coordinator" / "finance-2.pub").exists()
    assert main(["certs", "--out", str(out), "--sign-requests", str(more["finance-2"] / "finance-2.csr")]) == 9


def test_server_without_config_is_refused_before_anything_starts_and_demo_runs_the_demo_plan(tmp_path: Path, monkeypatch,
                                                                                              capsys) -> None:
    import fedlora.server.deploy as deploy

    calls = []

    class Stop(Exception):
        pass

    def plan_server(cfg, **kw):
        calls.append(cfg)
        raise Stop

    monkeypatch.setattr(deploy, "plan_server", plan_server)
    monkeypatch.setattr(deploy, "serve", lambda *a, **k: pytest.fail("serve started"))
    run = tmp_path / "run"
    assert main(["server", "--insecure", "--address", "127.0.0.1:9", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "--config" in err and "--demo" in err
    assert calls == [] and not run.exists()
    with pytest.raises(Stop):
        main(["server", "--demo", "--insecure", "--address", "127.0.0.1:9", "--out", str(run)])
    assert "WARNING: --demo" in capsys.readouterr().err
    assert sorted(c.name for c in calls[0].cohorts) == ["finance", "medical", "retail"]  # the embedded demo plan
    cfg = tmp_path / "run.toml"
    cfg.write_text("[cohorts.finance]\nsites = 1\n")
    assert main(["server", "--demo", "--config", str(cfg), "--insecure", "--out", str(run)]) == 2
    assert len(calls) == 1


def test_privacy_report_of_a_site_from_its_own_state_folder(make_config, tmp_path: Path, capsys) -> None:
    from fedlora.simulation.runner import simulate

    cfg = make_config(tmp_path / "run", train__rounds=2, privacy={"dp": True, "epsilon": 4.0})
    run, summary = simulate(cfg, progress=False)
    s = summary["privacy"]["sites"]["finance-1"]
    state = run / "site_state" / "finance-1"
    ledger_before = (state / "privacy.json").read_bytes()
    assert main(["privacy-report", "--site", str(state), "--epsilon", "4", "--delta", str(s["delta"])]) == 0
    printed = capsys.readouterr().out
    r = json.loads((state / "site-privacy.json").read_text())
    assert (state / "privacy.json").read_bytes() == ledger_before  # the ledger itself untouched
    assert r["site"] == "finance-1" and r["budget_epsilon"] == 4.0 and r["delta"] == s["delta"]
    assert r["epsilon"] == pytest.approx(s["epsilon"]) and 0 < r["epsilon"] <= 4.0  # the coordinator's account agrees
    assert r["within_budget"] and r["budget_left"] == pytest.approx(4.0 - s["epsilon"])
    assert list(r["cohorts"]) == ["finance"] and r["cohorts"]["finance"]["rounds_joined"] == [1, 2]
    assert [x["round"] for x in r["rounds"]] == [1, 2]
    assert 0 < r["rounds"][0]["epsilon_after"] < r["rounds"][1]["epsilon_after"] == pytest.approx(r["epsilon"])
    md = (state / "site-privacy.md").read_text()
    assert md.startswith("# Site privacy report: finance-1") and "| finance |" in md
    assert "finance-1" in printed and "round 2" in printed
    # without the flags: the delta and budget the site recorded in its own ledger
    assert main(["privacy-report", "--site", str(state), "--out", str(tmp_path / "rep")]) == 0
    r2 = json.loads((tmp_path / "rep" / "site-privacy.json").read_text())
    assert r2["delta"] == s["delta"] and r2["epsilon"] == pytest.approx(s["epsilon"])
    assert r2["budget_epsilon"] == pytest.approx(json.loads((state / "privacy.json").read_text())["ledger"]["declarations"]["finance-1"]
                                                 ["budget_epsilon"])
    # a folder without a ledger: a clear error naming it
    empty = tmp_path / "not-a-site"
    empty.mkdir()
    capsys.readouterr()
    assert main(["privacy-report", "--site", str(empty)]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no privacy ledger" in err
    assert main(["privacy-report", str(run), "--site", str(state)]) == 2
