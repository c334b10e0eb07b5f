"""The ``fedlora`` command line.

``fedlora privacy-report RUN_DIR``: what every site spent, recomputed from the run's ledger;
``fedlora privacy-report --site STATE_DIR``: one site's spend, from its own ledger.

``fedlora certs`` / ``fedlora server`` / ``fedlora client``: a real deployment (``cli_deploy``).

``fedlora generate ADAPTER_DIR --prompt TEXT``: answers from a causal-LM cohort's adapter (``cli_generate``).

``fedlora simulate``: a local federation (defaults: 9 sites, 3 finance, 3 medical, 3 retail,
synthetic demo data, the packaged pretrained model, LoRA). A TOML config (``--config``)
describes the run and flags override it; the whole config is validated before any work.

Exit codes: 0 done; 2 bad config or flags; 3 bad data; 4 model problem; 5 bad adapter
payload; 6 the federation could not complete; 7 a DP self-check failed; 8 privacy budget
exhausted; 9 deployment (processes, connection, certificates, keys); 10 the run finished but
skipped a cohort (fewer sites than secure aggregation needs; ``--allow-clear-aggregation``
aggregates such a cohort in the clear instead); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tomllib
from collections.abc import Sequence
from typing import Any

from .config import DEMO_DOMAINS, RunConfig, apply_overrides, config_from_dict, load_config
from .errors import ConfigError, FedloraError, RunIncomplete

CLEAR_WARNING = """
******************************************************************************
 WARNING: --allow-clear-aggregation: a cohort with fewer than
 secure_aggregation.min_sites sites is aggregated IN THE CLEAR: the coordinator
 sees each of its sites' updates, train losses and eval metrics. Without the
 flag such a cohort is skipped. {who}
******************************************************************************
"""


def warn_clear(cfg: RunConfig, who: str = "") -> None:
    """The loud warning when a run allows clear aggregation of small cohorts."""
    if cfg.secure_aggregation.enabled and cfg.secure_aggregation.allow_clear:
        print(CLEAR_WARNING.format(who=who), file=sys.stderr, flush=True)


def check_complete(summary: dict[str, Any]) -> None:
    """Raise ``RunIncomplete`` (exit code 10, one line naming them) when the run skipped cohorts."""
    skipped = {c: summary["cohorts"][c].get("skipped", "") for c in summary.get("cohorts_skipped") or []}
    if skipped:
        from fedlora.server.run_summary import incomplete_message

        raise RunIncomplete(incomplete_message(skipped))


def _data_arg(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected DOMAIN=PATH, got {text!r}")
    domain, path = text.split("=", 1)
    if not domain or not path:
        raise argparse.ArgumentTypeError(f"expected DOMAIN=PATH, got {text!r}")
    return domain, path


def _option_arg(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` with VALUE read as a TOML value (``eta=0.01``, ``num_malicious=1``, ``flag=true``)."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name.strip(), tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return name.strip(), value.strip()  # a bare word: a string option


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags that override a run config, shared by ``simulate`` and ``server``."""
    p.add_argument("--strategy", metavar="NAME", help="aggregation rule: fedavg (default), fedavgm, fedprox, fedadam, fedyogi, "
                   "fedadagrad; without secure aggregation also median, trimmed_mean, krum, multikrum")
    p.add_argument("--strategy-option", action="append", type=_option_arg, metavar="NAME=VALUE", dest="strategy_options",
                   help="an option of the strategy (repeatable; e.g. eta=0.01, mu=0.1); [federation.strategy_options] in a config")
    p.add_argument("--sites", type=int, help="sites per cohort")
    p.add_argument("--rounds", type=int, help="federated rounds")
    p.add_argument("--local-steps", type=int, help="optimizer steps per site per round")
    p.add_argument("--local-epochs", type=float, help="epochs per site per round (replaces --local-steps)")
    p.add_argument("--max-local-steps", type=int, help="at most this many steps per round from --local-epochs (0: no cap)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, dest="learning_rate", help="local learning rate")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], help="local optimizer")
    p.add_argument("--momentum", type=float, help="SGD momentum")
    p.add_argument("--pooling", choices=["auto", "mean", "cls", "last"],
                   help="what the classification head reads (default auto: the model's own pooling config, else mean for "
                        "encoders and the last token for decoders)")
    p.add_argument("--seed", type=int)
    p.add_argument("--task", dest="task_kind", metavar="KIND",
                   help="a task of fedlora.tasks: sequence_classification (default) or causal_lm (instruction tuning of a decoder)")
    p.add_argument("--model", dest="model_source", help="local HF checkpoint folder (default: the packaged all-MiniLM-L6-v2; "
                                                        "with --task causal_lm packaged:SmolLM2-135M-Instruct)")
    p.add_argument("--target-modules", help="LoRA targets: auto (default), all-linear, or module names (comma separated)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward (less memory for big decoders; not with DP)")
    p.add_argument("--quantization", choices=["none", "4bit", "8bit"], help="4/8-bit base weights (bitsandbytes, CUDA sites only)")
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--lora-mode", choices=["standard", "frozen_a", "probe"],
                   help="standard (A and B trained), frozen_a (only B), probe (only the head: a linear probe)")
    p.add_argument("--wire-dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--dp", action=argparse.BooleanOptionalAction, default=None,
                   help="DP-SGD at every site (default on, epsilon 8 per site; --no-dp turns it off)")
    p.add_argument("--epsilon", type=float, help="each site's privacy budget epsilon (default 8)")
    p.add_argument("--delta", type=float, help="delta (default: 1e-5, or 0.1/n at a site with n records)")
    p.add_argument("--max-grad-norm", type=float, help="DP-SGD per-example clipping norm C (default 1.0)")
    p.add_argument("--client-dp", action=argparse.BooleanOptionalAction, default=None,
                   help="client-level DP: clip each site's update, add noise to each cohort's sum (default off)")
    p.add_argument("--secure-aggregation", action=argparse.BooleanOptionalAction, default=None,
                   help="SecAgg+ for cohorts of at least secure_aggregation.min_sites sites, smaller ones skipped (default on; "
                        "--no-secure-aggregation aggregates every cohort in the clear, which deployed sites accept only when "
                        "started with --allow-clear-aggregation)")
    p.add_argument("--allow-clear-aggregation", action="store_true", default=None,
                   help="aggregate a cohort with fewer than secure_aggregation.min_sites sites IN THE CLEAR (loud warning); "
                        "default: such a cohort is skipped and the run exits with code 10")
    p.add_argument("--grad-sample-mode", choices=["hooks", "ghost"], help="Opacus per-sample gradient mode for DP-SGD (default hooks)")
    p.add_argument("--eval-metrics", choices=["site", "noised", "public"],
                   help="under DP, what sites do with eval metrics: keep them (default), release them noised (charged), or "
                        "release them exactly (outside the guarantee)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedlora", description="Federated, privacy-preserving LoRA fine-tuning on Flower.")
    p.add_argument("--version", action="version", version=f"fedlora {__import__('fedlora').__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("simulate", help="run a whole federation locally",
                       description="Run a local federation. Without --data: synthetic demo data for finance, medical and retail.")
    s.add_argument("--config", help="TOML run config (flags override it)")
    s.add_argument("--out", help="run directory (default runs/<timestamp>); must not exist or be empty")
    s.add_argument("--data", action="append", type=_data_arg, metavar="DOMAIN=PATH",
                   help="real CSV/JSONL/Parquet data for a cohort, split across its sites (repeatable); only the named cohorts run")
    s.add_argument("--text-column", help="text column of --data files (default text)")
    s.add_argument("--label-column", help="label column of --data files (default label)")
    s.add_argument("--prompt-column", help="causal_lm: prompt column of --data files (with --response-column)")
    s.add_argument("--response-column", help="causal_lm: response column of --data files")
    s.add_argument("--messages-column", help="causal_lm: a column of chat turns whose last turn is the assistant's answer")
    s.add_argument("--engine", choices=["inprocess", "ray"])
    s.add_argument("--ray-address", metavar="HOST:PORT", help="with --engine ray: a running Ray cluster (ray start --head) to run the "
                   "virtual sites on (default: RAY_ADDRESS, else a local Ray)")
    s.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    s.add_argument("--examples-per-site", type=int, help="demo data rows at the largest site")
    s.add_argument("--partition", choices=["iid", "dirichlet", "pathological", "size", "column"],
                   help="how a --data file is split across its cohort's sites (Flower Datasets' partitioners; default iid)")
    s.add_argument("--partition-alpha", type=float, metavar="A", help="dirichlet: concentration (smaller = more label skew; default 0.5)")
    s.add_argument("--partition-classes", type=int, metavar="K", help="pathological: labels per site (default 2)")
    s.add_argument("--partition-by", metavar="COLUMN", help="column: one site per distinct value of COLUMN (a branch or hospital id)")
    s.add_argument("--partition-min-size", type=int, metavar="M", help="fewest rows per site (default 2; dirichlet redraws until met)")
    add_run_flags(s)
    s.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint (with its own config)")
    s.add_argument("--quiet", action="store_true", help="no progress bar; print only the summary JSON")
    s.add_argument("--reproducible-noise", action="store_true", default=None,
                   help="research only: seed the DP noise from the run's seed (bit-identical DP runs); the run then gives NO "
                        "guarantee against anyone who knows the seed")
    from .cli_deploy import add_deploy_parsers

    add_deploy_parsers(sub)
    r = sub.add_parser("privacy-report", help="what every site spent (JSON, Markdown, HTML with a plot), or one site's own account",
                       description="Recompute every site's privacy spend from a run directory's ledger; works on a run in progress. "
                                   "With --site STATE_DIR instead: one site's spend per cohort and round from its own ledger.")
    r.add_argument("run_dir", metavar="RUN_DIR", nargs="?")
    r.add_argument("--out", help="where to write privacy.json/.md/.html/.png, or with --site site-privacy.json/.md "
                                 "(default: RUN_DIR or STATE_DIR)")
    r.add_argument("--site", metavar="STATE_DIR", help="a site's state folder (fedlora client --state-dir): report its own ledger")
    r.add_argument("--epsilon", type=float, help="with --site: the site's budget, when its ledger does not record it")
    r.add_argument("--delta", type=float, help="with --site: the site's delta, when its ledger does not record it (else 1e-5, said so)")
    from .cli_generate import add_generate_parser

    add_generate_parser(sub)
    return p


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted config keys from the flags ``add_run_flags`` defines (None: not given)."""
    return {
        "out": args.out, "seed": args.seed, "train.rounds": args.rounds, "train.local_steps": args.local_steps,
        "train.local_epochs": args.local_epochs, "train.batch_size": args.batch_size, "train.learning_rate": args.learning_rate,
        "train.max_local_steps": args.max_local_steps, "train.optimizer": args.optimizer, "train.momentum": args.momentum,
        "model.pooling": args.pooling, "task.kind": args.task_kind, "lora.target_modules": args.target_modules,
        "train.gradient_checkpointing": args.gradient_checkpointing, "model.quantization": args.quantization,
        "federation.wire_dtype": args.wire_dtype, "model.source": args.model_source, "federation.strategy": args.strategy,
        **{f"federation.strategy_options.{name}": value for name, value in (getattr(args, "strategy_options", None) or [])},
        "lora.rank": args.lora_rank, "lora.mode": args.lora_mode,
        "privacy.dp": args.dp, "privacy.epsilon": args.epsilon,
        "privacy.delta": args.delta, "privacy.max_grad_norm": args.max_grad_norm, "privacy.client_dp": args.client_dp,
        "privacy.grad_sample_mode": args.grad_sample_mode, "secure_aggregation.enabled": args.secure_aggregation,
        "secure_aggregation.allow_clear": getattr(args, "allow_clear_aggregation", None),
        "privacy.eval_metrics": args.eval_metrics, "privacy.reproducible_noise": getattr(args, "reproducible_noise", None),
        "cohorts.*.sites": args.sites, "cohorts.*.text_column": getattr(args, "text_column", None),
        "cohorts.*.label_column": getattr(args, "label_column", None),
        "cohorts.*.prompt_column": getattr(args, "prompt_column", None),
        "cohorts.*.response_column": getattr(args, "response_column", None),
        "cohorts.*.messages_column": getattr(args, "messages_column", None),
    }


def config_with_flags(data: dict[str, Any], overrides: dict[str, Any]) -> RunConfig:
    if "cohorts" not in data and any(overrides[k] is not None for k in overrides if k.startswith("cohorts.")):
        data = {**data, "cohorts": {d: {} for d in DEMO_DOMAINS}}
    return config_from_dict(apply_overrides(data, overrides))


def simulate_config(args: argparse.Namespace) -> RunConfig:
    """The run config from ``--config`` plus flags (flags win); validated."""
    data: dict[str, Any] = load_config(args.config)
    if args.data:
        seen = [d for d, _ in args.data]
        dup = sorted({d for d in seen if seen.count(d) > 1})
        if dup:
            raise ConfigError("--data", dup[0], "given more than once")
        old = data.get("cohorts", {})
        data = dict(data)
        data["cohorts"] = {d: {**old.get(d, {}), "data": path} for d, path in args.data}
    overrides = run_overrides(args) | {"federation.engine": args.engine, "federation.ray_address": args.ray_address,
                                       "model.device": args.device,
                                       "demo.examples_per_site": args.examples_per_site,
                                       "partition.kind": args.partition, "partition.alpha": args.partition_alpha,
                                       "partition.classes": args.partition_classes, "partition.by": args.partition_by,
                                       "partition.min_size": args.partition_min_size}
    return config_with_flags(data, overrides)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fedlora.simulation.runner import resume, simulate  # the CLI is the one core module above the subpackages

    if args.resume:
        given = sorted(k for k, v in vars(args).items() if v not in (None, False) and k not in ("command", "resume", "quiet"))
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')}", getattr(args, given[0]),
                              "cannot be combined with --resume: a resumed run keeps the config it started with")
        run_dir, summary = resume(args.resume, progress=not args.quiet)
    else:
        cfg = simulate_config(args)
        warn_clear(cfg)
        run_dir, summary = simulate(cfg, progress=not args.quiet)
    if args.quiet:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(f"\nrun directory: {run_dir}")
        for name, c in summary["cohorts"].items():
            shown = [f"{k.replace('_', ' ')} {c[k]:.3f}" for k in ("accuracy", "majority_baseline", "eval_loss", "perplexity")
                     if isinstance(c.get(k), (int, float))]
            print(f"  {name:<10} SKIPPED: {c['skipped']}" if c.get("skipped") else f"  {name:<10} {'   '.join(shown)}   sites {len(c['sites'])}")
        for site, p in summary.get("privacy", {}).get("sites", {}).items():
            print(f"  {site:<14} epsilon {p['epsilon']:.3f} of {p['budget_epsilon']:g} (delta {p['delta']:.1g}), rounds {p['rounds_joined']}")
        print(f"  rounds {summary['rounds_completed']}, bytes up {summary['bytes_up']:,}, down {summary['bytes_down']:,}, "
              f"{summary['wall_seconds']:.1f} s")
    check_complete(summary)
    return 0


def _cmd_site_privacy_report(args: argparse.Namespace) -> int:
    from fedlora.privacy.site_report import write_site_report

    r, paths = write_site_report(args.site, args.out, budget_epsilon=args.epsilon, delta=args.delta)
    print(r["headline"])
    for cohort, v in r["cohorts"].items():
        eps = "inf (no guarantee)" if v["epsilon"] is None else f"{v['epsilon']:.3f}"
        print(f"  cohort {cohort:<12} epsilon {eps} on its own, rounds {v['rounds_joined']}")
    budget = "" if r["budget_epsilon"] is None else f" of {r['budget_epsilon']:g}"
    for x in r["rounds"]:
        eps = "inf (no guarantee)" if x["epsilon_after"] is None else f"{x['epsilon_after']:.3f}"
        print(f"  round {x['round']:<4} {', '.join(x['cohorts']):<14} epsilon so far {eps}{budget}")
    print(f"  delta {r['delta']:.2g} ({r['delta_rule']}); budget: {r['budget_source']}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _cmd_privacy_report(args: argparse.Namespace) -> int:
    from fedlora.privacy.report import write_report

    if (args.site is None) == (args.run_dir is None):
        raise ConfigError("privacy-report", args.run_dir or args.site, "give a RUN_DIR, or --site STATE_DIR for one site's own "
                                                                      "ledger (not both)")
    if args.site is not None:
        return _cmd_site_privacy_report(args)
    if args.epsilon is not None or args.delta is not None:
        raise ConfigError("--epsilon" if args.epsilon is not None else "--delta", "given", "only with --site: a run's report "
                                                                                           "uses what each site declared")
    paths = write_report(args.run_dir, args.out)
    report = json.loads(paths[0].read_text(encoding="utf-8"))
    state = "complete" if report["complete"] else "in progress or stopped"
    print(f"{args.run_dir}: {state}, {report['rounds_completed']} of {report['rounds_planned']} rounds")
    for site, v in report["sites"].items():
        eps = "inf (no guarantee)" if v["epsilon"] is None else f"{v['epsilon']:.3f}"
        budget = f" of {v['budget_epsilon']:g}" if v.get("budget_epsilon") is not None else ""
        print(f"  {site:<16} epsilon {eps}{budget}  rounds {v['rounds_joined']}")
    for cohort, v in report["cohorts"].items():
        if v.get("skipped"):
            print(f"  {cohort:<16} SKIPPED, nothing released: {v['skipped']}")
        if v.get("client_level"):
            print(f"  {cohort:<16} client-level epsilon {v['client_level']['epsilon']} (delta {v['client_level']['delta']:.1g})")
    for d in report["deviations"]:
        print(f"  note: {d}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)  # Flower's own loggers run at DEBUG and propagate here
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    try:
        from .cli_deploy import COMMANDS

        from .cli_generate import cmd_generate

        return {"simulate": _cmd_simulate, "privacy-report": _cmd_privacy_report, "generate": cmd_generate,
                **COMMANDS}[args.command](args)
    except FedloraError as e:
        print(f"fedlora: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("fedlora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
