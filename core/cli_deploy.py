"""The deployment commands of the ``fedlora`` CLI: ``keygen``, ``certs``, ``server``, ``client``.

``fedlora keygen --site NAME --out DIR``: at a site, its private key (never leaves the site), its
public key and its certificate request (``fedlora.server.certs.keygen``).

``fedlora certs --out DIR --hosts HOST,... --sign-requests NAME.csr ...``: the operator's CA, the
coordinator's TLS certificate, and a certificate per site request, in ``DIR/operator``,
``DIR/coordinator`` and ``DIR/sites/<site>`` (``sign_requests``). ``fedlora certs --out DIR
--sites NAME,...`` is the one-shot folder for tests and demos: it makes the sites' private keys
centrally (``make_certs``).

``fedlora server --config RUN.toml --address HOST:PORT --certs DIR --out RUN_DIR``: the
coordinator (``fedlora.server.deploy``); ``--resume RUN_DIR`` continues a stopped run; without
``--config`` it refuses to start unless ``--demo`` asks for the embedded demo plan. SIGTERM
stops it as Ctrl-C does (``processes.stop_signals``): every process it started is ended, Flower's
home folder removed, and it exits 130 naming the ``--resume`` command; it is the subreaper of its
processes (``processes.become_subreaper``), so that none escapes the clean-up by being orphaned.

``fedlora client --server HOST:PORT --data PATH --domain NAME --key K --root-cert CA [--cert C]``:
a site's agent (``fedlora.client.agent``), running until stopped (SIGTERM or Ctrl-C: exit 0,
also in the middle of a round); ``--cert`` (default: ``K`` with suffix ``.crt``, when it exists)
signs its secure-aggregation keys.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError

INSECURE_WARNING = """
******************************************************************************
 WARNING: --insecure: no TLS and no site authentication. Every update, adapter
 and secure-aggregation share crosses the network readable by anyone on the
 path, and ANY machine that reaches {where} can join as a site. Use this only
 on a private test network; for real sites use fedlora certs + --certs/--key.
******************************************************************************
"""


CLEAR_SITE_WARNING = """
******************************************************************************
 WARNING: --allow-clear-aggregation: this site sends its update, train loss and
 eval metrics IN THE CLEAR whenever the coordinator asks without secure
 aggregation: the coordinator then sees them, not only a cohort's sum.
******************************************************************************
"""


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_deploy_parsers(sub: Any) -> None:
    from .cli import add_run_flags

    g = sub.add_parser("keygen", help="at a site: make its private key, public key and certificate request",
                       description="Write DIR/NAME.key (EC P-256, OpenSSH, mode 0600; it never leaves this machine), NAME.pub (the "
                                   "coordinator's allowlist entry) and NAME.csr (a certificate request, CN = NAME). Send the .pub "
                                   "and .csr to the federation's operator, never the .key. Existing files are never overwritten.")
    g.add_argument("--site", required=True, metavar="NAME", help="this site's name (letters, digits, '-', '_', '.')")
    g.add_argument("--out", required=True, metavar="DIR", help="where to write the three files (made with mode 0700)")

    c = sub.add_parser("certs", help="the operator: sign the sites' certificate requests (or, for tests and demos, make every key here)",
                       description="With --sign-requests: check each site's request (from fedlora keygen) and write DIR/operator/ "
                                   "(ca.key, ca.pem: keep offline), DIR/coordinator/ (ca.pem, server.pem, server.key, every "
                                   "<site>.pub: what fedlora server --certs reads) and DIR/sites/<site>/ (ca.pem, <site>.crt: "
                                   "send back to the site). No site's private key is made or seen here. "
                                   "With --sites (for tests and demos: makes the sites' private keys here): write DIR/ca.pem, "
                                   "server.pem, server.key and <site>.key/.pub/.crt per site in one folder. Private keys are "
                                   "mode 0600; existing files are kept: run it again to add sites.")
    c.add_argument("--out", required=True, metavar="DIR")
    c.add_argument("--hosts", type=_csv, default=["localhost", "127.0.0.1"],
                   help="comma-separated names and IP addresses the sites reach the coordinator at (localhost and 127.0.0.1 are always added)")
    c.add_argument("--sign-requests", nargs="+", default=[], metavar="REQ",
                   help="the sites' NAME.csr files from fedlora keygen (their NAME.pub is read from beside each, or give the "
                        ".pub files here too)")
    c.add_argument("--sites", type=_csv, default=[],
                   help="for tests and demos: makes the sites' private keys here; comma-separated site names (one key pair each)")
    c.add_argument("--days", type=int, default=365, help="validity of the certificates (default 365)")

    s = sub.add_parser("server", help="run the coordinator: a SuperLink with TLS and site authentication, and the fedlora ServerApp",
                       description="Start a Flower SuperLink (TLS and site authentication by default), wait for the sites, train, "
                                   "checkpoint after every round, write the run directory as fedlora simulate does.")
    s.add_argument("--config", help="TOML run config (flags override it); required unless --resume or --demo")
    s.add_argument("--demo", action="store_true", help="without --config: run the embedded demo plan (demo cohorts; a warning)")
    s.add_argument("--out", help="run directory (required unless --resume); must not exist or be empty")
    s.add_argument("--address", default="0.0.0.0:9092", help="HOST:PORT the SuperLink listens on (default 0.0.0.0:9092)")
    s.add_argument("--certs", metavar="DIR", help="folder made by fedlora certs: ca.pem, server.pem, server.key, <site>.pub allowlist "
                                                  "(DIR/coordinator when it exists; ca.key is never needed)")
    s.add_argument("--insecure", action="store_true", help="no TLS and no site authentication (test networks only; loud warning)")
    s.add_argument("--min-sites", type=int, help="sites to wait for before the first round (default: the config's total)")
    s.add_argument("--wait-timeout", type=float, default=600.0, help="seconds to wait for them (default 600)")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint (with its own config)")
    add_run_flags(s)

    k = sub.add_parser("client", help="run a data site's agent: a SuperNode and the fedlora ClientApp beside the data",
                       description="Join a fedlora coordinator as one site. The data path, domain, budget and model stay at the site.")
    k.add_argument("--server", required=True, metavar="HOST:PORT", help="the coordinator's address")
    k.add_argument("--data", required=True, help="the site's CSV/JSONL/Parquet file")
    k.add_argument("--domain", required=True, help="the cohort this site trains with (finance, medical, retail, ...)")
    k.add_argument("--name", help="this site's name (default: the --key file's name, else the domain)")
    k.add_argument("--text-column", default="text")
    k.add_argument("--label-column", default="label")
    k.add_argument("--prompt-column", default="", help="causal_lm: prompt column (with --response-column)")
    k.add_argument("--response-column", default="", help="causal_lm: response column")
    k.add_argument("--messages-column", default="", help="causal_lm: a column of chat turns ending with the answer")
    k.add_argument("--key", type=Path, help="this site's private key (<site>.key from fedlora keygen; mode 0600, refused when "
                                            "its group or others can read it)")
    k.add_argument("--root-cert", type=Path, help="the federation's CA certificate (ca.pem from fedlora certs)")
    k.add_argument("--cert", type=Path, help="this site's certificate, which signs its secure-aggregation keys (<site>.crt from "
                                             "fedlora certs; default: the --key path with suffix .crt, when it exists)")
    k.add_argument("--insecure", action="store_true", help="no TLS and no site key (test networks only)")
    k.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    k.add_argument("--epsilon", type=float, default=0.0,
                   help="this site's own DP budget: the site always trains with DP within it, whatever the coordinator asks "
                        "(default: none of its own; the coordinator's request decides)")
    k.add_argument("--delta", type=float, default=0.0,
                   help="the largest delta this site accepts (default: 1e-5, or 0.1/n for its public size n); a coordinator "
                        "asking for more is refused")
    k.add_argument("--accountant", choices=["rdp", "prv"], default="", help="this site's accountant (default: the coordinator's)")
    k.add_argument("--eval-metrics", choices=["site", "noised", "public"], default="site",
                   help="under DP: keep eval metrics at the site (default), release them noised (charged to the budget), or "
                        "release them exactly (outside the guarantee)")
    k.add_argument("--public-size", type=int, default=0,
                   help="the training-set size this site declares public (default: its size rounded to 2 significant figures)")
    k.add_argument("--allow-clear-aggregation", action="store_true",
                   help="let this site send its update, train loss and eval metrics IN THE CLEAR when the coordinator asks "
                        "without secure aggregation (default: refused, error 4203; only metrics kept at the site are allowed)")
    k.add_argument("--model", default="", help="the base model this site holds (folder or packaged name; default: the one the coordinator names)")
    k.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="the LoRA rank this site trains (its compute budget): at most the cohort's lora.rank, below it only with "
                        "lora.mode = frozen_a (its B update is zero-padded to the cohort's rank; the coordinator is not told R). "
                        "Default: the cohort's")
    k.add_argument("--state-dir", type=Path, help="where the site keeps its privacy ledger and logs (default fedlora-state/<name>)")
    k.add_argument("--connect-timeout", type=float, default=300.0,
                   help="give up after this many seconds without reaching the coordinator (default 300; retries with backoff)")


def _cmd_keygen(args: argparse.Namespace) -> int:
    from fedlora.server.certs import keygen

    return _report_written(keygen(args.site, args.out))


def _report_written(r: Any) -> int:
    """What ``keygen`` / ``certs`` wrote and kept, then where each file goes."""
    if r.created:
        print(f"created in {r.out}: {', '.join(r.created)}")
    if r.kept:
        print(f"kept (already there): {', '.join(r.kept)}")
    print(r.guide, end="")
    return 0


def _cmd_certs(args: argparse.Namespace) -> int:
    from fedlora.server.certs import make_certs, sign_requests

    if args.sign_requests and args.sites:
        raise ConfigError("--sites", ",".join(args.sites), "cannot be combined with --sign-requests: the sites make their own "
                                                           "keys (fedlora keygen); --sites is for tests and demos")
    if args.sign_requests:
        r = sign_requests(args.out, args.hosts, args.sign_requests, days=args.days)
    else:
        r = make_certs(args.out, args.hosts, args.sites, days=args.days)
    return _report_written(r)


def _cmd_server(args: argparse.Namespace) -> int:
    from .processes import become_subreaper, stop_signals

    become_subreaper()  # Flower's SuperExec and ServerApp, orphaned, stay this process's to stop
    with stop_signals():  # SIGTERM (systemd, Kubernetes, kill) takes Ctrl-C's way out
        return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    from fedlora.server.deploy import plan_server, serve

    from .cli import check_complete, config_with_flags, run_overrides, warn_clear
    from .config import load_config

    cfg = None
    if args.resume:
        given = (sorted(k for k, v in run_overrides(args).items() if v is not None) + (["config"] if args.config else [])
                 + (["demo"] if args.demo else []))
        if given:
            flag = "--" + given[0].split(".")[-1].replace("_", "-")
            raise ConfigError(flag, "given", "cannot be combined with --resume: a resumed run keeps the config it started with")
    else:
        if not args.config and not args.demo:
            raise ConfigError("--config", None, "fedlora server needs the run's plan: pass --config RUN.toml, or --demo for the "
                                                "embedded demo plan")
        if args.config and args.demo:
            raise ConfigError("--demo", "given", "cannot be combined with --config")
        if args.demo:
            print("fedlora server: WARNING: --demo: running the embedded demo plan (the demo cohorts and their labels), "
                  "not a config of yours", file=sys.stderr, flush=True)
        cfg = config_with_flags(load_config(args.config), run_overrides(args))
    plan = plan_server(cfg, resume=args.resume, address=args.address, certs=args.certs, insecure=args.insecure,
                       min_sites=args.min_sites, wait_timeout=args.wait_timeout)
    if args.insecure:
        print(INSECURE_WARNING.format(where=args.address), file=sys.stderr, flush=True)
    warn_clear(plan.cfg, "The sites must allow it too (fedlora client --allow-clear-aggregation).")
    summary = serve(plan)
    print(f"\nrun directory: {plan.run_dir.path}")
    for name, c in summary["cohorts"].items():
        if c.get("skipped"):
            print(f"  {name:<10} SKIPPED: {c['skipped']}")
            continue
        acc = "n/a" if c.get("accuracy") is None else f"{c['accuracy']:.3f}"
        trained, joined = len(c.get("sites_trained", c["sites"])), len(c["sites"])
        sites = f"{trained}" if trained == joined else f"{trained} trained of {joined} joined"
        print(f"  {name:<10} accuracy {acc}   sites {sites}   adapter {plan.run_dir.path / 'adapters' / name}")
    for site, p in summary.get("privacy", {}).get("sites", {}).items():
        print(f"  {site:<14} epsilon {p['epsilon']:.3f} of {p['budget_epsilon']:g}")
    print(f"  rounds {summary['rounds_completed']}, bytes up {summary['bytes_up']:,}, down {summary['bytes_down']:,}")
    check_complete(summary)
    return 0


def _cmd_client(args: argparse.Namespace) -> int:
    from fedlora.client.agent import SiteOptions, default_cert, run_site

    name = args.name or (args.key.stem if args.key else args.domain)
    if args.insecure:
        print(INSECURE_WARNING.format(where=args.server), file=sys.stderr, flush=True)
    if args.allow_clear_aggregation:
        print(CLEAR_SITE_WARNING, file=sys.stderr, flush=True)
    opts = SiteOptions(server=args.server, data=Path(args.data), domain=args.domain, name=name, text_column=args.text_column,
                       label_column=args.label_column, prompt_column=args.prompt_column, response_column=args.response_column,
                       messages_column=args.messages_column, key=args.key, root_cert=args.root_cert,
                       cert=default_cert(args.key, args.cert), insecure=args.insecure,
                       device=args.device, epsilon=args.epsilon, delta=args.delta, accountant=args.accountant,
                       eval_metrics=args.eval_metrics, public_size=args.public_size, model=args.model, lora_rank=args.lora_rank,
                       state_dir=(args.state_dir or Path("fedlora-state") / name).resolve(),
                       connect_timeout=args.connect_timeout, allow_clear_aggregation=args.allow_clear_aggregation)
    run_site(opts, say=lambda text: print(text, flush=True), hard_exit=True)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"keygen": _cmd_keygen, "certs": _cmd_certs, "server": _cmd_server, "client": _cmd_client}
