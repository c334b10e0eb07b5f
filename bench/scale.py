"""A large population with a small sample per round: fedlora's harness cost next to Flower's Ray engine.

For each population (default 1,000 / 10,000 / 100,000 virtual sites over the finance, medical and
retail demo cohorts) it runs, each in its own subprocess:

* ``fedlora``: ``fedlora simulate`` on the in-process engine with ``federation.site_sample_rate`` =
  ``eval_sample_rate`` = ``--sample`` (1 %), secure aggregation on (the sampled sites are each
  sum's group), ``--rounds`` rounds of 1 local step, on a near-zero-compute model (a 1-layer,
  32-wide BERT built from a config, with the packaged tokenizer), 20 synthetic examples per site.
  A population above ``fedlora.simulation.runner.LAZY_FROM`` is lazy: only sampled sites exist.
* ``ray``: Flower's Ray Simulation Engine (``flwr.simulation.run_simulation``) with the same number
  of SuperNodes and a trivial ServerApp/ClientApp doing the same site-rounds: per round, ``train``
  to as many sites as fedlora sampled that round and ``evaluate`` to as many as it evaluated
  (round 0: evaluate only), each reply a one-value MetricRecord.

Printed per row (and as JSON lines, then one JSON list): the site-rounds (sampled sites that
trained, summed over rounds; each also evaluated about once), the federation's wall time
(fedlora: ``summary.json`` ``wall_seconds``, from discovery to the last adapter written, model
loading excluded; Ray: the ServerApp's main, Ray's start excluded) and per site-round:

* ``ms/site-round``: wall / site-rounds;
* ``model``: the sites' local training and evaluation (``train_local`` + ``evaluate_local``);
* ``secagg sites``: the sampled sites' own secure-aggregation work (key agreement, signing and
  checking their peers' certificates, Shamir shares, masking: ``fedlora.client.secagg_site``),
  what each site of a deployment does on its own machine in parallel;
* ``harness``: the rest (coordinator, messages, records, data, adapters, the coordinator's side
  of secure aggregation) = (wall - model - secagg sites) / site-rounds;

and the peak RSS: of the child process itself (``os.wait4``), and of its whole process tree
(sampled every 0.2 s; Ray's raylet, GCS and worker processes included).

    python bench/scale.py                                 # 1,000 / 10,000 / 100,000 sites (~20 min on 2 cores)
    python bench/scale.py --sites 1000,10000 --rounds 1   # quicker
    python bench/scale.py --engines fedlora --no-secure   # fedlora only, in the clear
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

COHORTS = ("finance", "medical", "retail")
MB = 1024 * 1024


def _cohorts(n_sites: int) -> dict[str, dict[str, int]]:
    base, extra = divmod(n_sites, len(COHORTS))
    return {d: {"sites": base + (1 if i < extra else 0)} for i, d in enumerate(COHORTS)}


def tiny_bert(out: Path) -> Path:
    """A random 1-layer BERT, 32 wide (2 heads, intermediate 64), with the packaged tokenizer."""
    from transformers import BertConfig, BertModel

    from fedlora.config import PACKAGED_MODEL
    from fedlora.model import resolve_model_path

    if not (out / "config.json").exists():
        BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             max_position_embeddings=64)).save_pretrained(out)
        src = resolve_model_path(PACKAGED_MODEL)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy(src / name, out / name)
    return out


# ---- the children -------------------------------------------------------------------------
def _timed(module: Any, name: str, totals: dict[str, float], key: str) -> None:
    """Replace ``module.name`` by a wrapper that adds its time to ``totals[key]`` (measurement only)."""
    real = getattr(module, name)

    @functools.wraps(real)  # keeps its name: the ClientApp registers the secure-aggregation stages by it
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - start

    setattr(module, name, wrapper)


def fedlora_child(args: argparse.Namespace) -> dict[str, Any]:
    import fedlora.client.app as client_app
    import fedlora.client.secagg_site as secagg_site
    from fedlora.config import config_from_dict
    from fedlora.simulation.runner import LAZY_FROM, simulate

    import flwr.superlink.grid  # noqa: F401 - imported on the run's first exchange (fedlora.server.exchange): warm, not timed

    totals = {"model": 0.0, "secagg_sites": 0.0}
    for name in ("train_local", "evaluate_local"):
        _timed(client_app, name, totals, "model")
    for name in ("begin", "share", "masked", "check", "unmask"):  # the stage handlers are looked up when the app is made
        _timed(secagg_site, name, totals, "secagg_sites")
    cfg = config_from_dict({
        "seed": 0, "out": str(Path(args.out) / "run"),
        "model": {"source": args.model, "max_length": 32},
        "lora": {"rank": 4, "alpha": 8.0},
        "train": {"rounds": args.rounds, "local_steps": 1, "local_epochs": 0.0, "batch_size": 8, "eval_every": 1},
        "privacy": {"dp": False},
        "demo": {"examples_per_site": 20},
        "federation": {"site_sample_rate": args.sample, "eval_sample_rate": args.sample},
        "secure_aggregation": {"enabled": args.secure},
        "cohorts": _cohorts(args.sites),
    })
    run_dir, summary = simulate(cfg, progress=False)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sizes = {c: n["sites"] for c, n in _cohorts(args.sites).items()}

    def evaluated(line: dict[str, Any]) -> int:
        return sum(e.get("eval_sites_selected", sizes[c] if args.sample >= 1 else 0) for c, e in line["cohorts"].items())

    plan = [[sum(e.get("sites_selected", 0) for e in line["cohorts"].values()), evaluated(line)] for line in lines]
    return {"engine": "fedlora", "sites": args.sites, "lazy": args.sites > LAZY_FROM, "secure": args.secure, "plan": plan,
            "wall_s": summary["wall_seconds"], "model_s": totals["model"], "secagg_sites_s": totals["secagg_sites"]}


def ray_child(args: argparse.Namespace) -> dict[str, Any]:
    from flwr.app import Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    plan = json.loads(args.plan)
    client = ClientApp()

    @client.train()
    def train(msg: Message, ctx: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num_examples": 1})}), reply_to=msg)

    @client.evaluate()
    def evaluate(msg: Message, ctx: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"accuracy": 0.5})}), reply_to=msg)

    server, out = ServerApp(), {}

    @server.main()
    def main(grid: Grid, ctx: Context) -> None:
        waited = time.perf_counter()
        while len(list(grid.get_node_ids())) < args.sites:  # the SuperNodes register after the ServerApp starts
            if time.perf_counter() - waited > args.timeout:
                raise SystemExit(f"only {len(list(grid.get_node_ids()))} of {args.sites} SuperNodes registered")
            time.sleep(0.5)
        nodes = sorted(grid.get_node_ids())  # 64-bit ids: a Python list (a numpy array would round them)
        rng = random.Random(0)
        warm = [Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), node, "train") for node in nodes[:2 * (os.cpu_count() or 1)]]
        list(grid.send_and_receive(warm))  # Ray's actors start and load the ClientApp: warm, not timed
        out["register_s"] = time.perf_counter() - waited
        start, exchanges = time.perf_counter(), []
        for n_train, n_eval in plan:
            for kind, n in (("train", n_train), ("evaluate", n_eval)):
                picked = rng.sample(nodes, n)
                msgs = [Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), int(node), kind) for node in picked]
                t0 = time.perf_counter()
                replies = list(grid.send_and_receive(msgs))
                exchanges.append(round(time.perf_counter() - t0, 3))
                if len(replies) != n or any(r.has_error() for r in replies):
                    raise SystemExit(f"{kind}: {len(replies)} replies to {n} messages, {sum(r.has_error() for r in replies)} errors")
        out["wall_s"] = time.perf_counter() - start
        print("exchanges (s):", exchanges, flush=True)

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}}
    run_simulation(server_app=server, client_app=client, num_supernodes=args.sites, backend_config=backend)
    if "wall_s" not in out:
        raise SystemExit("Flower's ServerApp did not finish")
    return {"engine": "ray", "sites": args.sites, "lazy": False, "secure": False, "plan": plan, "wall_s": out["wall_s"],
            "model_s": 0.0, "secagg_sites_s": 0.0, "setup_s": out["register_s"]}


# ---- the parent ---------------------------------------------------------------------------
def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_child(argv: list[str], timeout: float) -> tuple[dict[str, Any] | None, float, float, str]:
    """Run ``bench/scale.py --child ...``; (its JSON result or None, its peak RSS in MB, the peak RSS of
    its process tree in MB, the tail of its output)."""
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen([sys.executable, __file__, *argv], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        peak_tree, done = 0, threading.Event()

        def sample() -> None:
            nonlocal peak_tree
            while not done.wait(0.2):
                peak_tree = max(peak_tree, _tree_rss(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        done.set()
        sampler.join()
        log.seek(0)
        text = log.read()
    result = None
    for line in text.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line.removeprefix("RESULT "))
    return result, usage.ru_maxrss / 1024, peak_tree / MB, "\n".join(text.splitlines()[-15:])


def row_of(result: dict[str, Any], rss: float, tree: float) -> dict[str, Any]:
    site_rounds = sum(t for t, _ in result["plan"])
    per = 1000.0 / max(1, site_rounds)
    wall, model, secagg = result["wall_s"], result["model_s"], result["secagg_sites_s"]
    return {"engine": result["engine"], "sites": result["sites"], "lazy": result["lazy"], "secure": result["secure"],
            "site_rounds": site_rounds, "site_evaluations": sum(e for _, e in result["plan"]), "wall_s": round(wall, 2),
            "ms_per_site_round": round(wall * per, 2), "model_ms": round(model * per, 2), "secagg_sites_ms": round(secagg * per, 2),
            "harness_ms": round((wall - model - secagg) * per, 2), "wall_minus_model_ms": round((wall - model) * per, 2),
            "peak_rss_mb": round(rss, 1), "peak_rss_tree_mb": round(tree, 1),
            "setup_s": round(result.get("setup_s", 0.0), 2)}  # Ray: SuperNodes registered, actors warm (not in wall_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", default="1000,10000,100000", help="comma-separated population sizes")
    ap.add_argument("--sample", type=float, default=0.01, help="site_sample_rate and eval_sample_rate (default 1 %%)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--engines", default="fedlora,ray")
    ap.add_argument("--no-secure", dest="secure", action="store_false", help="fedlora without secure aggregation")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per child run")
    ap.add_argument("--child", choices=("fedlora", "ray"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.child == "fedlora":
            args.sites = int(args.sites)
            print("RESULT " + json.dumps(fedlora_child(args)), flush=True)
        else:
            args.sites = int(args.sites)
            print("RESULT " + json.dumps(ray_child(args)), flush=True)
        return
    engines = args.engines.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedlora-scale-") as tmp:
        model = tiny_bert(Path(tmp) / "bert-1x32")
        for n in (int(s) for s in args.sites.split(",")):
            plan = None
            if "fedlora" in engines:
                out = Path(tmp) / f"fedlora-{n}"
                argv = ["--child", "fedlora", "--sites", str(n), "--sample", str(args.sample), "--rounds", str(args.rounds),
                        "--model", str(model), "--out", str(out)] + ([] if args.secure else ["--no-secure"])
                result, rss, tree, tail = run_child(argv, args.timeout)
                shutil.rmtree(out, ignore_errors=True)
                if result is None:
                    print(f"fedlora, {n} sites: no result\n{tail}", flush=True)
                else:
                    rows.append(row_of(result, rss, tree))
                    plan = result["plan"]
                    print(json.dumps(rows[-1]), flush=True)
            if "ray" in engines:
                if plan is None:  # no fedlora run to copy: its expected sample sizes
                    q = args.sample
                    plan = [[0, round(n * q)]] + [[round(n * q), round(n * q)]] * args.rounds
                result, rss, tree, tail = run_child(["--child", "ray", "--sites", str(n), "--plan", json.dumps(plan)], args.timeout)
                if result is None:
                    print(f"ray, {n} sites: no result\n{tail}", flush=True)
                else:
                    rows.append(row_of(result, rss, tree))
                    print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.sample:.0%} of the sites sampled per round (train and evaluate), {args.rounds} rounds; fedlora secure aggregation "
          f"{'on' if args.secure else 'off'}; per site-round in ms")
    print(f"{'engine':>8} {'sites':>7} {'site-rounds':>11} {'wall s':>8} {'ms/site-round':>13} {'model':>7} {'secagg sites':>12} "
          f"{'harness':>8} {'peak RSS MB':>11} {'tree RSS MB':>11}")
    for r in rows:
        print(f"{r['engine']:>8} {r['sites']:>7} {r['site_rounds']:>11} {r['wall_s']:>8.1f} {r['ms_per_site_round']:>13.1f} "
              f"{r['model_ms']:>7.1f} {r['secagg_sites_ms']:>12.1f} {r['harness_ms']:>8.1f} {r['peak_rss_mb']:>11.0f} "
              f"{r['peak_rss_tree_mb']:>11.0f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
