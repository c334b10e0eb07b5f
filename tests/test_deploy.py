"""A real deployment, end to end: `fedlora certs`, `fedlora server` (SuperLink with TLS and site
authentication) and `fedlora client` processes (SuperNodes with the warm ClientApp) on loopback.

* three sites (finance, medical, retail) complete a DP run whose run directory equals what
  `fedlora simulate` writes for the same config, seed and data; meanwhile a site with an
  unregistered key, a site trusting another CA and a registered site holding another base
  model are all refused, each with a message naming the problem, and a stranger holding only
  the public ca.pem is refused `flwr run` of an app of theirs and `flwr supernode register`
  of a key of theirs at the coordinator's address (which serves the Fleet API only);
* the coordinator is stopped by SIGTERM mid-run (exit 130, the resume command named, no process
  of it left, Flower's home folder removed) and resumed: final adapters and epsilon equal to an
  uninterrupted run (secure aggregation on);
* an adapter of more than 200 MB makes the round trip.

(A site stopped by SIGTERM in the middle of a secure round and restarted is in
tests/test_deployment_secagg.py, on the federation that test starts anyway.) Each test checks that no process is left and that nothing
was written to Flower's default home (FLWR_HOME points at a folder that must stay absent). The
reference ``fedlora simulate`` runs while the deployment does (its rounds mostly wait on the
network), and is waited for before the comparison: nothing depends on which ends first.
"""

from __future__ import annotations

import json
import re
import signal
import stat
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomli_w
from safetensors.numpy import load_file

from deployment import Processes, free_port, live_processes, wait_for
from fedlora.processes import BIN, flower_env
from fedlora.simulation import demo_data

FEDERATION = {"finance": 1, "medical": 1, "retail": 1}


def write_run(tmp: Path, model: Path, cohorts: dict[str, int], **sections: dict) -> tuple[Path, dict[str, list[Path]]]:
    """A RUN.toml and each site's data file, exactly the demo files `fedlora simulate` writes
    for that config (same generator, seed and sizes)."""
    # the tests' regime (as tests/conftest.py's tiny_config): LoRA on A and B, 2 AdamW steps a round
    doc = {"seed": 11, "model": {"source": str(model), "max_length": 32}, "lora": {"rank": 4, "alpha": 8.0, "mode": "standard"},
           "train": {"rounds": 2, "local_steps": 2, "local_epochs": 0.0, "batch_size": 8, "optimizer": "adamw", "learning_rate": 0.01},
           "demo": {"examples_per_site": 40},
           "cohorts": {c: {"sites": n, "labels": list(demo_data.LABELS[c])} for c, n in cohorts.items()}}
    for k, v in sections.items():
        doc[k] = {**doc.get(k, {}), **v}
    (tmp / "run.toml").write_text(tomli_w.dumps(doc))
    files = {c: demo_data.write_cohort(tmp / "data", c, n, seed=11, examples_per_site=40, size_skew=0.5, label_skew=1.0)
             for c, n in cohorts.items()}
    return tmp / "run.toml", files


def certs(p: Processes, out: Path, sites: list[str]) -> Path:
    p.start(f"certs-{out.name}", "certs", "--out", str(out), "--sites", ",".join(sites))
    assert p.wait(f"certs-{out.name}", 60) == 0
    return out


def site(p: Processes, label: str, domain: str, data: Path, port: int, keys: Path, *extra: str, ca: Path | None = None,
         name: str | None = None):
    """``fedlora client`` for site ``name`` (default: ``label``, the process's name in the test)."""
    name = name or label
    return p.start(label, "client", "--server", f"127.0.0.1:{port}", "--data", str(data), "--domain", domain, "--name", name,
                   "--key", str(keys / f"{name}.key"), "--root-cert", str(ca or keys / "ca.pem"), "--state-dir", str(p.root / "sites" / label),
                   "--device", "cpu", *extra)


def stranger_app(root: Path, target: Path) -> Path:
    """A Flower App of a stranger's whose ServerApp, if it ever ran on the coordinator, would write
    ``target`` (in the coordinator's run directory)."""
    app = root / "stranger-app"
    app.mkdir()
    (app / "pyproject.toml").write_text(tomli_w.dumps({
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "stranger-app", "version": "1.0.0", "description": "not fedlora's", "license": "Apache-2.0",
                    "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": "stranger", "config": {},
                                  "components": {"serverapp": "stranger_app:app", "clientapp": "stranger_app:client"}}}}}))
    (app / "stranger_app.py").write_text(
        "from pathlib import Path\nfrom flwr.clientapp import ClientApp\nfrom flwr.serverapp import ServerApp\n"
        "app = ServerApp()\nclient = ClientApp()\n\n\n@app.main()\ndef main(grid, context):\n"
        f"    Path({str(target)!r}).write_text('a stranger ran code here')\n")
    return app


def stranger_flwr(root: Path, port: int, ca: Path, *args: str) -> str:
    """``flwr ARGS stranger`` from a stranger's own Flower home, who holds only the public ca.pem;
    its output, whitespace and the CLI's box drawing collapsed. It must fail."""
    home = root / "stranger-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "stranger", "stranger": {
        "address": f"127.0.0.1:{port}", "root-certificates": str(ca)}}}))
    done = subprocess.run([str(BIN / "flwr"), *args, "stranger"], capture_output=True, text=True, env=flower_env(home), cwd=root,
                          timeout=120)
    out = " ".join(re.sub(r"[│╭╮╰╯─]", " ", done.stdout + done.stderr).split())
    assert done.returncode != 0, out
    return out


def start_simulate(p: Processes, config: Path, out: Path) -> None:
    """``fedlora simulate`` in the background (see ``simulated``)."""
    p.start("simulate", "simulate", "--config", str(config), "--out", str(out), "--quiet")


def connected(p: Processes, run: Path, server: str = "server") -> None:
    """Returns once ``server`` has all its sites (it writes sites.json then) or has exited (its
    exit status is the test's to check): a reference simulation started now competes with the
    rounds, which mostly wait on the network, not with the processes' start-up."""
    wait_for(lambda: (run / "sites.json").is_file() or p.procs[server].poll() is not None, 600, f"{server}'s sites to connect")


def simulated(p: Processes, out: Path) -> dict:
    """Waits for ``start_simulate``'s run; its summary."""
    assert p.wait("simulate", 600) == 0, p.log("simulate")[-3000:]
    return json.loads((out / "summary.json").read_text())


def adapters(run: Path) -> dict[str, dict[str, np.ndarray]]:
    return {d.name: load_file(str(d / "adapter_model.safetensors")) for d in sorted((run / "adapters").iterdir())}


def metrics(run: Path) -> list[dict]:
    """metrics.jsonl without wall-clock times."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        doc = json.loads(line)
        doc.pop("seconds", None)
        for c in doc["cohorts"].values():
            for k in ("site_train_seconds", "site_eval_seconds"):
                c.pop(k, None)
        out.append(doc)
    return out


def assert_same_run(a: Path, b: Path, *, skip_round0_bytes: bool = False, exact: bool = True) -> None:
    """The same run: metrics, adapters, privacy, accuracy. ``exact=False`` (secret DP noise): the
    same rounds, keys, sites and privacy spend, the same adapter shapes, other noised values."""
    ma, mb = metrics(a), metrics(b)
    if skip_round0_bytes:
        for m in (ma[0], mb[0]):
            m.pop("bytes_up"), m.pop("bytes_down")
    # bytes on the wire agree to within the signed secure-aggregation keys' encodings: ECDSA signatures and the
    # sites' certificates are DER, a byte or two longer or shorter from one signature (one CA) to the next
    wire = lambda ms: [m.pop(k) for m in ms for k in ("bytes_up", "bytes_down") if k in m]  # noqa: E731
    assert wire(ma) == pytest.approx(wire(mb), rel=2e-3)
    if exact:
        assert ma == mb
    else:
        keys = lambda ms: [{c: sorted(e) for c, e in m["cohorts"].items()} for m in ms]  # noqa: E731
        assert keys(ma) == keys(mb)
    aa, ab = adapters(a), adapters(b)
    assert aa.keys() == ab.keys()
    for cohort in aa:
        assert aa[cohort].keys() == ab[cohort].keys()
        for k in aa[cohort]:
            if exact:
                np.testing.assert_array_equal(aa[cohort][k], ab[cohort][k], err_msg=f"{cohort} {k}")
            else:
                assert aa[cohort][k].shape == ab[cohort][k].shape
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert sa["privacy"] == sb["privacy"]
    if exact:
        assert {c: v["accuracy"] for c, v in sa["cohorts"].items()} == {c: v["accuracy"] for c, v in sb["cohorts"].items()}
    assert json.loads((a / "sites.json").read_text()) == json.loads((b / "sites.json").read_text())


def assert_clean(p: Processes) -> None:
    assert live_processes(p.tree) == []  # every process of every started group, children of children included
    assert not (p.root / "flwr-home-unused").exists()  # nothing went to Flower's default home


def test_certs_files_permissions_and_what_flower_reads(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    from fedlora.errors import ConfigError
    from fedlora.server.certs import check_server_certs, make_certs

    r = make_certs(tmp_path / "c", ["coordinator.example.org", "10.0.0.5"], ["bank-a", "clinic-b"])
    d = r.out
    assert sorted(p.name for p in d.iterdir()) == sorted(["ca.pem", "ca.key", "server.pem", "server.key", "bank-a.key", "bank-a.pub",
                                                          "bank-a.crt", "clinic-b.key", "clinic-b.pub", "clinic-b.crt",
                                                          "WHERE-FILES-GO.txt"])
    for key in ("ca.key", "server.key", "bank-a.key", "clinic-b.key"):
        assert stat.S_IMODE((d / key).stat().st_mode) == 0o600
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    cert = x509.load_pem_x509_certificate((d / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"coordinator.example.org", "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"10.0.0.5", "127.0.0.1"}
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((d / "ca.pem").read_bytes()))
    check_server_certs(d)
    load_ssh_private_key((d / "bank-a.key").read_bytes(), None)  # what flower-supernode reads
    assert try_load_public_key(d / "bank-a.pub")  # what `flwr supernode register` reads
    assert "bank-a.key" in r.guide and "ca.key" in r.guide
    # again with a new site: the CA and the other files are kept, the new pair added
    before = (d / "ca.pem").read_bytes(), (d / "bank-a.key").read_bytes()
    r2 = make_certs(d, ["coordinator.example.org"], ["bank-a", "shop-c"])
    assert r2.created == ["shop-c.key", "shop-c.pub", "shop-c.crt"] and (d / "ca.pem").read_bytes(), (d / "bank-a.key").read_bytes() == before
    with pytest.raises(ConfigError, match="site name"):
        make_certs(tmp_path / "bad", ["h"], ["../evil"])
    other = make_certs(tmp_path / "other", ["h"], []).out
    (d / "server.key").chmod(0o600)
    (d / "server.key").write_bytes((other / "server.key").read_bytes())
    with pytest.raises(ConfigError, match="does not belong to server.pem"):
        check_server_certs(d)


SECRET_LABEL = "zebra-label-q7"  # a label only the refused site's own file holds


def test_tls_deployment_matches_simulate_and_refuses_strangers(tiny_model: Path, tmp_path: Path) -> None:
    """The coordinator runs with ``--no-dp``; the three sites were started with ``--epsilon 4``: they train
    with DP within 4 all the same (their policy, not the coordinator's request), with secret noise,
    so the run equals ``fedlora simulate`` with the same site policies in everything but the noised values."""
    # one site per cohort: below secure_aggregation.min_sites, so both sides must allow clear aggregation
    clear = {"allow_clear": True}
    config, files = write_run(tmp_path, tiny_model, FEDERATION, privacy={"dp": True, "epsilon": 8.0}, secure_aggregation=clear)
    (tmp_path / "reference").mkdir()
    reference_config, _ = write_run(tmp_path / "reference", tiny_model, FEDERATION,
                                    privacy={"dp": False, "budgets": {f"{c}-1": 4.0 for c in FEDERATION}}, secure_aggregation=clear)
    other_model = tmp_path / "other-model"
    other_model.mkdir()
    for f in tiny_model.iterdir():
        (other_model / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((other_model / "config.json").read_text())
    cfg["layer_norm_eps"] = 1e-7  # another model: same shapes, other content
    (other_model / "config.json").write_text(json.dumps(cfg))
    # a site whose data carries a label its cohort does not have, and one whose --domain is no cohort of the run
    bad = pd.read_csv(files["medical"][0])
    bad.loc[bad.index[:3], "label"] = SECRET_LABEL
    bad_file = tmp_path / "private" / "medical-7-export.csv"
    bad_file.parent.mkdir()
    bad.to_csv(bad_file, index=False)
    port = free_port()
    with Processes(tmp_path) as p:
        keys = certs(p, tmp_path / "certs", ["finance-1", "medical-1", "retail-1", "finance-9", "medical-7", "legal-1"])
        strangers = certs(p, tmp_path / "strangers", ["finance-2"])
        p.start("server", "server", "--config", str(config), "--no-dp", "--address", f"127.0.0.1:{port}", "--certs", str(keys), "--out",
                str(tmp_path / "run"), "--min-sites", "6", "--wait-timeout", "120")
        for cohort, paths in files.items():
            site(p, f"{cohort}-1", cohort, paths[0], port, keys, "--epsilon", "4", "--allow-clear-aggregation")
        site(p, "finance-9", "finance", files["finance"][0], port, keys, "--model", str(other_model))
        site(p, "medical-7", "medical", bad_file, port, keys, "--allow-clear-aggregation")
        site(p, "legal-1", "legal", files["retail"][0], port, keys, "--allow-clear-aggregation")
        site(p, "finance-2", "finance", files["finance"][0], port, strangers, "--connect-timeout", "30", ca=keys / "ca.pem")  # key not registered
        site(p, "medical-1-bad-ca", "medical", files["medical"][0], port, keys, "--connect-timeout", "30", name="medical-1",
             ca=strangers / "ca.pem")
        assert p.wait("finance-2", 120) == 9
        assert p.wait("medical-1-bad-ca", 120) == 9
        assert p.wait("medical-7", 300) == 3, p.log("medical-7")[-3000:]  # stopped at its side, at the handshake
        assert p.wait("legal-1", 300) == 3, p.log("legal-1")[-3000:]
        connected(p, tmp_path / "run")
        start_simulate(p, reference_config, tmp_path / "simulated")
        # while the federation runs: a stranger with the public ca.pem reaches the coordinator's address
        pwned = tmp_path / "run" / "stranger-was-here"
        tried = stranger_flwr(tmp_path, port, keys / "ca.pem", "run", str(stranger_app(tmp_path, pwned)))
        assert "serves only the Fleet API" in tried and "Successfully started run" not in tried, tried
        tried = stranger_flwr(tmp_path, port, keys / "ca.pem", "supernode", "register", str(strangers / "finance-2.pub"))
        assert "serves only the Fleet API" in tried, tried
        assert not pwned.exists() and [f for f in (tmp_path / "run").rglob("*") if "stranger" in f.name] == []
        assert p.wait("server", 600) == 0, p.log("server")[-4000:]
        reference = simulated(p, tmp_path / "simulated")
    assert_clean(p)
    gate_log = (tmp_path / "run" / "logs" / "superlink.log").read_text()
    assert "refused POST /v1/control/start-run" in gate_log and "refused POST /v1/control/register-node" in gate_log
    assert "StartRun of fedlora's own ServerApp accepted" in gate_log
    assert "Fleet API only" in p.log("server") and "this machine only" in p.log("server")
    assert not pwned.exists()
    assert "refused this site's key" in p.log("finance-2") and "finance-2.pub" in p.log("finance-2")
    assert "not signed by the CA" in p.log("medical-1-bad-ca")
    assert "base model mismatch" in p.log("server") and "finance-9" in p.log("server")
    assert "base model mismatch" in p.log("finance-9")
    run = tmp_path / "run"
    assert_same_run(run, tmp_path / "simulated", skip_round0_bytes=True, exact=False)  # the query went to one more (refusing) site
    summary = json.loads((run / "summary.json").read_text())
    for s in ("finance-1", "medical-1", "retail-1"):  # no update left a site without DP
        assert 0 < summary["privacy"]["sites"][s]["epsilon"] == reference["privacy"]["sites"][s]["epsilon"] <= 4.0
        assert summary["privacy"]["sites"][s]["noise"] == "secret"
    assert "trained with DP, epsilon" in p.log("finance-1")  # one line per round at the site
    assert not (run / ".flower").exists() and not (run / "error.json").exists()
    assert "fedlora server: registered 6 site key(s)" in p.log("server")
    # the refused sites were told, in their own logs; the coordinator's console and files hold only that they did not join
    assert SECRET_LABEL in p.log("medical-7") and "medical-7-export.csv" in p.log("medical-7")
    assert "not one of this federation's cohorts" in p.log("legal-1")
    coordinator_text = p.log("server") + "".join(f.read_text(errors="replace") for f in run.rglob("*") if f.is_file()
                                                 and f.suffix in (".log", ".json", ".jsonl", ".toml"))
    assert "medical-7 did not join: its data does not fit its cohort's labels" in coordinator_text, coordinator_text[-3000:]
    assert "legal-1 did not join: its cohort (--domain) is not one of this run's" in coordinator_text
    assert SECRET_LABEL not in coordinator_text and "medical-7-export" not in coordinator_text and str(tmp_path / "private") not in coordinator_text
    for log_file in (run / "logs" / "superlink.log", run / "logs" / "run.log", tmp_path / "sites" / "finance-1" / "supernode.log"):
        assert "\x1b[" not in log_file.read_text(), log_file  # log files without terminal colour codes


def test_coordinator_sigtermed_and_resumed_equals_an_uninterrupted_run(tiny_model: Path, tmp_path: Path) -> None:
    # DP off: the sites' DP noise is secret, so only a run without it can be compared bit for bit
    # (a resumed DP run continuing with the same ledger is shown in tests/test_resume.py)
    # 2 rounds: stopped after round 1's checkpoint, the resumed coordinator runs round 2
    # SIGTERM goes to the `fedlora server` process only (systemd with KillMode=mixed, Kubernetes, kill PID): it must end
    # the SuperLink, Flower's SuperExec and ServerApp (sessions of their own) itself, and say how to resume
    config, files = write_run(tmp_path, tiny_model, {"finance": 3}, train={"rounds": 2},
                              privacy={"dp": False}, secure_aggregation={"stage_timeout": 60.0})
    port = free_port()
    run = tmp_path / "run"
    with Processes(tmp_path) as p:
        keys = certs(p, tmp_path / "certs", ["finance-1", "finance-2", "finance-3"])
        serve = ("--address", f"127.0.0.1:{port}", "--certs", str(keys), "--wait-timeout", "120")
        p.start("server", "server", "--config", str(config), "--out", str(run), *serve)
        for i, path in enumerate(files["finance"], start=1):
            site(p, f"finance-{i}", "finance", path, port, keys)
        connected(p, run)
        start_simulate(p, config, tmp_path / "uninterrupted")
        checkpoint = run / "checkpoint" / "state.json"
        wait_for(lambda: checkpoint.is_file() and json.loads(checkpoint.read_text())["round"] == 1, 300, "round 1's checkpoint")
        p.signal("server", signal.SIGTERM)
        assert p.wait("server", 120) == 130, p.log("server")[-4000:]
        assert p.leftovers_of("server") == []  # no SuperLink, SuperExec or ServerApp outlives it
        stopped = p.log("server")
        assert "fedlora: error: stopped by SIGTERM; the run directory keeps the last completed round" in stopped
        assert f"fedlora server --resume {run}" in stopped
        assert not (run / "summary.json").exists() and not (run / ".flower").exists()
        p.start("server-resumed", "server", "--resume", str(run), *serve)
        assert p.wait("server-resumed", 600) == 0, p.log("server-resumed")[-4000:]
        simulated(p, tmp_path / "uninterrupted")
    assert_clean(p)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_after_round"] == 1 and summary["cohorts"]["finance"]["secure_aggregation"] is True
    assert_same_run(run, tmp_path / "uninterrupted", skip_round0_bytes=True)


def wide_bert(out: Path) -> Path:
    """A random 2-layer BERT, 2048 wide (intermediate 4096), with the packaged tokenizer: LoRA of
    rank 1024 on query, key, value and every dense layer has 61,440 x 1024 = 62.9M values (252 MB)."""
    import shutil

    from transformers import BertConfig, BertModel

    from fedlora.config import PACKAGED_MODEL
    from fedlora.model import resolve_model_path

    BertModel(BertConfig(vocab_size=30522, hidden_size=2048, num_hidden_layers=2, num_attention_heads=16, intermediate_size=4096,
                         max_position_embeddings=64)).save_pretrained(out)
    src = resolve_model_path(PACKAGED_MODEL)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, out / name)
    return out


def test_an_adapter_of_200_mb_makes_the_round_trip(tmp_path: Path) -> None:
    model = wide_bert(tmp_path / "wide-bert")
    config, files = write_run(tmp_path, model, {"retail": 1}, lora={"rank": 1024, "alpha": 8.0, "target_modules": ["query", "key", "value", "dense"]},
                              train={"rounds": 1, "local_steps": 1, "batch_size": 2, "eval_every": 1},
                              privacy={"dp": False},  # the wire's size limits are tested, not DP-SGD (on by default)
                              secure_aggregation={"allow_clear": True})  # nor secure aggregation: one site, in the clear
    port = free_port()
    run = tmp_path / "run"
    with Processes(tmp_path) as p:
        p.start("server", "server", "--config", str(config), "--out", str(run), "--address", f"127.0.0.1:{port}", "--insecure")
        p.start("retail-1", "client", "--server", f"127.0.0.1:{port}", "--data", str(files["retail"][0]), "--domain", "retail",
                "--name", "retail-1", "--insecure", "--state-dir", str(tmp_path / "sites" / "retail-1"), "--allow-clear-aggregation")
        assert p.wait("server", 600) == 0, p.log("server")[-4000:]
    assert_clean(p)
    assert "WARNING: --insecure" in p.log("server") and "WARNING: --insecure" in p.log("retail-1")
    summary = json.loads((run / "summary.json").read_text())
    adapter = run / "adapters" / "retail" / "adapter_model.safetensors"
    assert adapter.stat().st_size > 200e6
    assert summary["bytes_up"] > 200e6  # the trained update came back whole
    line = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1]["cohorts"]["retail"]
    assert line["sites_trained"] == 1 and line["sites_failed"] == []
    initial = {k: v for k, v in load_file(str(adapter)).items() if "lora_B" in k}
    assert any(np.abs(v).max() > 0 for v in initial.values())  # B starts at 0: the site's training arrived
