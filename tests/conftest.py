"""Shared fixtures: a tiny BERT built from a config (no downloads), small run configs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# One torch thread per process unless the caller says otherwise: the tests' models are tiny, so a
# second thread gains little, and on 2 shared cores (several processes at once in the deployment
# tests: sites, coordinator, a reference simulation) contending threads made them 2-4x slower.
# Set before torch loads; subprocesses (fedlora server/client/simulate, Flower's, Ray's workers) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from fedlora.config import config_from_dict  # noqa: E402
from fedlora.model import resolve_model_path, PACKAGED_MODEL  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config: pytest.Config) -> None:
    import torch

    try:
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    except ValueError:  # not a number: leave torch's own choice
        pass


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer MiniLM: the packaged checkpoint's config cut to one transformer layer, with
    its pretrained embeddings and first layer (a random-init tiny BERT cannot learn with LoRA
    alone), saved without a task head, with the packaged tokenizer. No download."""
    import transformers
    from transformers import AutoModel

    transformers.logging.set_verbosity_error()
    out = tmp_path_factory.mktemp("tiny-minilm")
    src = resolve_model_path(PACKAGED_MODEL)
    AutoModel.from_pretrained(str(src), num_hidden_layers=1).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer SmolLM2: the packaged decoder (GGUF, dequantised by transformers) cut to its first
    two layers, with its pretrained (tied) embeddings, final norm and chat-template tokenizer, saved
    as a plain checkpoint folder. No download; about 20 s once per session."""
    import torch
    import transformers

    from fedlora.model import PACKAGED_DECODER, model_files

    transformers.logging.set_verbosity_error()
    out = tmp_path_factory.mktemp("tiny-smollm2")
    path, gguf = model_files(PACKAGED_DECODER)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), gguf_file=gguf, dtype=torch.float32, num_hidden_layers=2)
    model.hf_quantizer = None  # a GGUF-loaded model keeps its quantizer; a plain checkpoint has none
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(str(path), gguf_file=gguf).save_pretrained(out)
    return out


def tiny_config(model: Path, out: Path, **over: object) -> object:
    """A fast run: tiny model, 2 cohorts of 2 demo sites (aggregated in the clear: ``allow_clear``), 2 rounds, no DP unless asked for."""
    data = {
        "seed": 7, "out": str(out),
        "model": {"source": str(model), "max_length": 32},
        # the tests' regime predates the measured defaults (README "Defaults"): pinned so their numbers hold
        "lora": {"rank": 4, "alpha": 8.0, "mode": "standard"},
        "train": {"rounds": 2, "local_steps": 4, "local_epochs": 0.0, "batch_size": 8, "optimizer": "adamw", "learning_rate": 0.01},
        "demo": {"examples_per_site": 40},
        "cohorts": {"finance": {"sites": 2}, "medical": {"sites": 2}},
        # 2-site cohorts are below secure_aggregation.min_sites: the tests' regime aggregates them in the clear (a test
        # that sets its own [secure_aggregation] table, or allow_clear = false, gets the fail-closed default: skipped)
        "secure_aggregation": {"allow_clear": True},
    }
    set_keys(data, over)
    data.setdefault("privacy", {}).setdefault("dp", False)  # DP-SGD only where a test asks for it
    return config_from_dict(data)


def set_keys(data: dict, over: dict) -> dict:
    """``data`` with ``section__key=value`` overrides set in place (``train__rounds=3``)."""
    for dotted, value in over.items():
        node = data
        parts = dotted.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return data


@pytest.fixture
def make_config(tiny_model: Path):
    """``make_config(out, train__rounds=3, ...)``: a tiny-model RunConfig (see ``tiny_config``)."""
    return lambda out, **over: tiny_config(tiny_model, out, **over)


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` (real labelled sets, on development and CI machines only); skips where absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent: real data sets exist on development and CI machines only")
    return SHARED_DATA


def run_with(cfg, intercept=None, rewrite=None) -> Path:
    """Run a real federation in-process; ``rewrite(msg, ctx)`` may alter every message before the
    site's real handlers see it (a malicious coordinator), ``intercept(msg, ctx, reply)`` sees (and
    may alter) every site's reply. Returns the run directory."""
    from fedlora.client.app import make_client_app
    from fedlora.server.app import make_server_app
    from fedlora.server.rundir import RunDir
    from fedlora.simulation.runner import _write_demo_data, plan_sites, run_engine, with_credentials

    plan = plan_sites(cfg)
    run_dir = RunDir.start(cfg)  # with config.toml, as fedlora simulate writes it
    sites = _write_demo_data(cfg, plan, run_dir)
    from fedlora.privacy.key_signing import InMemoryCA

    ca = InMemoryCA() if cfg.secure_aggregation.enabled else None
    if ca is not None:  # signed SecAgg keys and certified names, as in fedlora simulate
        sites = with_credentials(sites, ca)
    real = make_client_app(sites, device="cpu")

    def client(msg, ctx):
        if rewrite is not None:  # the coordinator shares one content between a cohort's messages: rewrite a copy
            from flwr.app import ConfigRecord, RecordDict

            msg.content = RecordDict({k: ConfigRecord(dict(v)) if isinstance(v, ConfigRecord) else v for k, v in msg.content.items()})
            msg = rewrite(msg, ctx)
        reply = real(msg, ctx)
        return intercept(msg, ctx, reply) if intercept is not None else reply

    server = make_server_app(cfg, run_dir, plan.labels, expected_sites=len(sites), progress=False, ca_pem=ca.pem if ca is not None else "")
    run_engine(cfg, sites, server, client)
    return run_dir.path


def interrupt_before(round_: int, monkeypatch) -> None:
    """Simulated sites raise KeyboardInterrupt (as Ctrl-C would) when asked to train ``round_``."""
    import fedlora.simulation.runner as runner

    real = runner.make_client_app

    def factory(*a, **kw):
        app = real(*a, **kw)

        def client(msg, ctx):
            if msg.metadata.message_type == "train" and int(msg.content["config"]["round"]) == round_:
                raise KeyboardInterrupt
            return app(msg, ctx)
        return client

    monkeypatch.setattr(runner, "make_client_app", factory)
