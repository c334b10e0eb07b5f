"""The deployment commands of the ``fedlora`` CLI: ``certs``, ``server``, ``client``.

``fedlora certs --out DIR --hosts HOST,... --sites NAME,...``: the CA, the coordinator's TLS
certificate and one key pair and certificate per site (``fedlora.server.certs``).

``fedlora server --config RUN.toml --address HOST:PORT --certs DIR --out RUN_DIR``: the
coordinator (``fedlora.server.deploy``); ``--resume RUN_DIR`` continues a stopped run.

``fedlora client --server HOST:PORT --data PATH --domain NAME --key K --root-cert CA [--cert C]``:
a site's agent (``fedlora.client.agent``), running until stopped; ``--cert`` (default: ``K``
with suffix ``.crt``, when it exists) signs its secure-aggregation keys.
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


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_deploy_parsers(sub: Any) -> None:
    from .cli import add_run_flags

    c = sub.add_parser("certs", help="make the CA, the coordinator's TLS certificate and the sites' key pairs",
                       description="Write DIR/ca.pem, server.pem, server.key and <site>.key/.pub/.crt per site (private keys mode 0600). "
                                   "Existing files are kept: run it again with new --sites to add sites (or to issue the "
                                   ".crt of a site key made before).")
    c.add_argument("--out", required=True, metavar="DIR")
    c.add_argument("--hosts", type=_csv, default=["localhost", "127.0.0.1"],
                   help="comma-separated names and IP addresses the sites reach the coordinator at (localhost and 127.0.0.1 are always added)")
    c.add_argument("--sites", type=_csv, default=[], help="comma-separated site names (one key pair each)")
    c.add_argument("--days", type=int, default=365, help="validity of the certificates (default 365)")

    s = sub.add_parser("server", help="run the coordinator: a SuperLink with TLS and site authentication, and the fedlora ServerApp",
                       description="Start a Flower SuperLink (TLS and site authentication by default), wait for the sites, train, "
                                   "checkpoint after every round, write the run directory as fedlora simulate does.")
    s.add_argument("--config", help="TOML run config (flags override it)")
    s.add_argument("--out", help="run directory (required unless --resume); must not exist or be empty")
    s.add_argument("--address", default="0.0.0.0:9092", help="HOST:PORT the SuperLink listens on (default 0.0.0.0:9092)")
    s.add_argument("--certs", metavar="DIR", help="folder made by fedlora certs: ca.pem, server.pem, server.key, <site>.pub allowlist")
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
    k.add_argument("--key", type=Path, help="this site's private key (<site>.key from fedlora certs)")
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
    k.add_argument("--model", default="", help="the base model this site holds (folder or packaged name; default: the one the coordinator names)")
    k.add_argument("--state-dir", type=Path, help="where the site keeps its privacy ledger and logs (default fedlora-state/<name>)")
    k.add_argument("--connect-timeout", type=float, default=300.0,
                   help="give up after this many seconds without reaching the coordinator (default 300; retries with backoff)")


def _cmd_certs(args: argparse.Namespace) -> int:
    from fedlora.server.certs import make_certs

    r = make_certs(args.out, args.hosts, args.sites, days=args.days)
    if r.created:
        print(f"created in {r.out}: {', '.join(r.created)}")
    if r.kept:
        print(f"kept (already there): {', '.join(r.kept)}")
    print(r.guide, end="")
    return 0


def _cmd_server(args: argparse.Namespace) -> int:
    from fedlora.server.deploy import plan_server, serve

    from .cli import config_with_flags, run_overrides
    from .config import load_config

    cfg = None
    if args.resume:
        given = sorted(k for k, v in run_overrides(args).items() if v is not None) + (["config"] if args.config else [])
        if given:
            flag = "--" + given[0].split(".")[-1].replace("_", "-")
            raise ConfigError(flag, "given", "cannot be combined with --resume: a resumed run keeps the config it started with")
    else:
        cfg = config_with_flags(load_config(args.config), run_overrides(args))
    plan = plan_server(cfg, resume=args.resume, address=args.address, certs=args.certs, insecure=args.insecure,
                       min_sites=args.min_sites, wait_timeout=args.wait_timeout)
    if args.insecure:
        print(INSECURE_WARNING.format(where=args.address), file=sys.stderr, flush=True)
    summary = serve(plan)
    print(f"\nrun directory: {plan.run_dir.path}")
    for name, c in summary["cohorts"].items():
        acc = "n/a" if c.get("accuracy") is None else f"{c['accuracy']:.3f}"
        print(f"  {name:<10} accuracy {acc}   sites {len(c['sites'])}   adapter {plan.run_dir.path / 'adapters' / name}")
    for site, p in summary.get("privacy", {}).get("sites", {}).items():
        print(f"  {site:<14} epsilon {p['epsilon']:.3f} of {p['budget_epsilon']:g}")
    print(f"  rounds {summary['rounds_completed']}, bytes up {summary['bytes_up']:,}, down {summary['bytes_down']:,}")
    return 0


def _cmd_client(args: argparse.Namespace) -> int:
    from fedlora.client.agent import SiteOptions, default_cert, run_site

    name = args.name or (args.key.stem if args.key else args.domain)
    if args.insecure:
        print(INSECURE_WARNING.format(where=args.server), file=sys.stderr, flush=True)
    opts = SiteOptions(server=args.server, data=Path(args.data), domain=args.domain, name=name, text_column=args.text_column,
                       label_column=args.label_column, prompt_column=args.prompt_column, response_column=args.response_column,
                       messages_column=args.messages_column, key=args.key, root_cert=args.root_cert,
                       cert=default_cert(args.key, args.cert), insecure=args.insecure,
                       device=args.device, epsilon=args.epsilon, delta=args.delta, accountant=args.accountant,
                       eval_metrics=args.eval_metrics, public_size=args.public_size, model=args.model, state_dir=(args.state_dir or Path("fedlora-state") / name).resolve(),
                       connect_timeout=args.connect_timeout)
    run_site(opts, say=lambda text: print(text, flush=True))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"certs": _cmd_certs, "server": _cmd_server, "client": _cmd_client}
