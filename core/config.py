"""The run configuration: one TOML file describes a run, command-line flags override it.

Every section is a frozen dataclass whose ``__post_init__`` validates its own values and
raises :class:`~fedlora.errors.ConfigError` naming the dotted key and the bad value. The
whole config is therefore validated when it is built, before any work starts. Nothing here
mutates a caller's object: overrides build a new config.

TOML layout (every key optional; see ``RunConfig`` for defaults)::

    seed = 0
    out = "runs/demo"
    [model]      source, max_length, device, dtype, pooling, head_dropout, quantization
    [lora]       rank, alpha, dropout, target_modules, mode,
                 [lora.site_ranks] site = rank   (frozen_a: sites that train a lower rank)
    [task]       kind
    [train]      rounds, local_steps, local_epochs, max_local_steps, batch_size, optimizer, learning_rate,
                 momentum, weight_decay, eval_fraction, eval_every, max_grad_norm, gradient_checkpointing
    [federation] engine, strategy, strategy_options, weight_cap, wire_dtype, ray_cpus_per_site, site_sample_rate,
                 eval_sample_rate
    [demo]       examples_per_site, size_skew, label_skew
    [partition]  kind, alpha, classes, by, min_size   (how a cohort's data file is split across its sites)
    [privacy]    dp, epsilon, delta, max_grad_norm, noise_multiplier, accountant, grad_sample_mode,
                 client_dp, client_noise_multiplier, client_clip_norm, client_delta, client_noise,
                 adaptive_clip, adaptive_target_quantile, adaptive_clip_lr, adaptive_count_noise,
                 [privacy.budgets] site = epsilon
    [cohorts.<name>] sites, labels, data, text_column, label_column, prompt_column, response_column, messages_column
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from .errors import ConfigError
from .privacy_config import PrivacyConfig, SecureAggregationConfig
from .validation import one_of as _one_of, require as _require

PACKAGED_MODEL = "packaged:all-MiniLM-L6-v2"
DEMO_DOMAINS = ("finance", "medical", "retail")
# the demo cohorts' labels, public: the coordinator of a deployment reads them here, the demo data
# generator (fedlora.simulation.demo_data, whose word lists are keyed by them) at the sites
DEMO_LABELS: dict[str, tuple[str, ...]] = {"finance": ("negative", "neutral", "positive"),
                                           "medical": ("cardiovascular", "digestive", "neoplasms", "nervous"),
                                           "retail": ("sizing", "quality", "shipping", "satisfied")}
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass(frozen=True)
class ModelConfig:
    """The base model: a local Hugging Face checkpoint folder or the packaged default."""

    source: str = field(default=PACKAGED_MODEL, metadata={"help": "local checkpoint folder or packaged:all-MiniLM-L6-v2"})
    max_length: int = field(default=64, metadata={"help": "tokens per example after truncation"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu, cuda, cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on a bf16-capable GPU, else fp32), float32, bfloat16"})
    pooling: str = field(default="auto", metadata={"help": "what the head reads: auto (the model's own pooling config, else mean "
                                                           "for encoders, last token for decoders), mean, cls, last"})
    head_dropout: float = field(default=0.0, metadata={"help": "dropout on the pooled vector before the linear head"})
    quantization: str = field(default="none", metadata={"help": "none, 4bit or 8bit base weights (bitsandbytes, QLoRA; CUDA only)"})

    def __post_init__(self) -> None:
        _require(isinstance(self.source, str) and self.source != "", "model.source", self.source, "must be a non-empty path or packaged name")
        _require(isinstance(self.max_length, int) and 8 <= self.max_length <= 8192, "model.max_length", self.max_length, "must be an integer in [8, 8192]")
        _require(isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
                 "model.device", self.device, "must be auto, cpu, cuda or cuda:N")
        _one_of("model.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        _one_of("model.pooling", self.pooling, ("auto", "mean", "cls", "last"))
        _require(isinstance(self.head_dropout, (int, float)) and 0.0 <= self.head_dropout < 1.0, "model.head_dropout", self.head_dropout,
                 "must be in [0, 1)")
        _one_of("model.quantization", self.quantization, ("none", "4bit", "8bit"))


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on the base model's linear layers (PEFT). ``frozen_a``: A comes from a seed every
    site of a cohort shares and stays fixed; only B (and the head) are trained and sent.
    ``probe``: only the head is trained and sent (a linear probe; the DP default, chosen by
    measurement: DP noise grows with the number of trained values, README "Defaults")."""

    rank: int = field(default=4, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator; scale = alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    target_modules: tuple[str, ...] = field(default=("auto",), metadata={"help": "module names (suffix match); auto (the attention "
                                                                            "query/value projections of the model's family) or all-linear"})
    mode: str = field(default="probe", metadata={"help": "probe (only the head on the pooled features: ~1k noisy dimensions instead "
                                                         "of ~20k under DP; LoRA stays at zero), frozen_a (A from a shared seed, only "
                                                         "B and the head trained: exact FedAvg) or standard (A, B and the head)"})
    site_ranks: Mapping[str, int] = field(default_factory=dict, metadata={
        "help": "[lora.site_ranks] site = rank: sites that train a lower rank r <= lora.rank (frozen_a only; the first r "
                "components of the shared A and of B, the update zero-padded to lora.rank: exact, secure aggregation unchanged)"})

    def __post_init__(self) -> None:
        _require(isinstance(self.rank, int) and not isinstance(self.rank, bool) and 1 <= self.rank <= 1024,
                 "lora.rank", self.rank, "must be an integer in [1, 1024]")
        _require(isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0,
                 "lora.alpha", self.alpha, "must be a positive number")
        _require(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "must be in [0, 1)")
        _require(isinstance(self.target_modules, tuple) and len(self.target_modules) > 0
                 and all(isinstance(t, str) and t for t in self.target_modules),
                 "lora.target_modules", self.target_modules, "must be a non-empty list of module names")
        _require(len(self.target_modules) == 1 or not {"auto", "all-linear"} & set(self.target_modules), "lora.target_modules",
                 self.target_modules, "auto and all-linear stand alone, not in a list of module names")
        _one_of("lora.mode", self.mode, ("standard", "frozen_a", "probe"))
        _require(isinstance(self.site_ranks, Mapping), "lora.site_ranks", self.site_ranks, "must be a table of site = rank")
        for site, r in self.site_ranks.items():
            _require(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= self.rank, f"lora.site_ranks.{site}", r,
                     f"must be an integer in [1, lora.rank = {self.rank}]: a site trains at most the cohort's rank")
        _require(not self.site_ranks or self.mode == "frozen_a", "lora.site_ranks", dict(self.site_ranks),
                 f"needs lora.mode = 'frozen_a' (A frozen and shared: a lower-rank site's B zero-padded to lora.rank is exact); "
                 f"lora.mode = {self.mode!r}" + (" trains A too, and padding A is not exact" if self.mode == "standard"
                                                  else " trains no LoRA at all"))


@dataclass(frozen=True)
class TaskConfig:
    """The learning task at the sites; one file each in ``fedlora.tasks``."""

    kind: str = field(default="sequence_classification", metadata={"help": "sequence_classification or causal_lm (instruction tuning)"})

    def __post_init__(self) -> None:
        from .tasks import TASKS

        _one_of("task.kind", self.kind, tuple(TASKS))


@dataclass(frozen=True)
class TrainConfig:
    """Rounds and local training at every site."""

    # Defaults measured on the real sets in ../shared/data (README, "Defaults"): one local epoch per
    # round (capped for large sites), expected batch 64, SGD with momentum (under DP, AdamW rescales
    # the noise-dominated coordinates so that every value random-walks by about the learning rate).
    rounds: int = 5
    local_steps: int = 12  # used only when local_epochs = 0
    local_epochs: float = 1.0  # > 0 replaces local_steps by ceil(epochs * train_examples / batch_size)
    max_local_steps: int = 50  # > 0 caps the steps local_epochs gives a large site (0: no cap)
    batch_size: int = 64
    optimizer: str = "sgd"
    learning_rate: float = 0.5
    momentum: float = 0.9  # SGD's momentum (optimizer = "sgd"); AdamW ignores it
    weight_decay: float = 0.0
    eval_fraction: float = 0.2
    eval_every: int = 1  # evaluate after every k-th round, and always after round 0 and the last
    max_grad_norm: float = 0.0  # > 0 clips the (batch) gradient norm; DP clipping is separate
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory for big decoders; not with DP)

    def __post_init__(self) -> None:
        def positive_int(key: str, v: object, hi: int) -> None:
            _require(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= hi, key, v, f"must be an integer in [1, {hi}]")

        positive_int("train.rounds", self.rounds, 100_000)
        positive_int("train.local_steps", self.local_steps, 10_000_000)
        positive_int("train.batch_size", self.batch_size, 65_536)
        positive_int("train.eval_every", self.eval_every, 100_000)
        _require(isinstance(self.local_epochs, (int, float)) and 0 <= self.local_epochs <= 1000,
                 "train.local_epochs", self.local_epochs, "must be 0 (use local_steps) or a positive number of epochs")
        _one_of("train.optimizer", self.optimizer, ("adamw", "sgd"))
        _require(isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate) and 0 < self.learning_rate <= 10,
                 "train.learning_rate", self.learning_rate, "must be in (0, 10]")
        _require(isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < 1, "train.weight_decay", self.weight_decay, "must be in [0, 1)")
        _require(isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1, "train.momentum", self.momentum, "must be in [0, 1)")
        _require(isinstance(self.max_local_steps, int) and not isinstance(self.max_local_steps, bool) and 0 <= self.max_local_steps <= 10_000_000,
                 "train.max_local_steps", self.max_local_steps, "must be 0 (no cap) or a positive integer")
        _require(isinstance(self.eval_fraction, (int, float)) and 0 < self.eval_fraction < 1,
                 "train.eval_fraction", self.eval_fraction, "must be in (0, 1)")
        _require(isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, "must be >= 0")


@dataclass(frozen=True)
class FederationConfig:
    """How the federation runs: engine, aggregation strategy, adapter wire dtype, how long replies are waited for."""

    engine: str = "inprocess"
    strategy: str = "fedavg"  # fedlora.strategies.available(): fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad, median, ...
    strategy_options: Mapping[str, Any] = field(default_factory=dict)  # [federation.strategy_options]: the strategy's own options
    # a site weighs min(n, weight_cap) for its n training examples, in the clear and under secure aggregation alike (each site
    # then sends w = min(n, cap) / cap in [0, 1]); a public cap that bounds any one site's pull on the mean
    weight_cap: float = 1000.0
    wire_dtype: str = "float32"
    ray_cpus_per_site: float = 1.0
    ray_address: str = ""  # engine "ray": a running Ray cluster's address (ray start --head; also RAY_ADDRESS); "": a local Ray
    site_sample_rate: float = 1.0  # each round, every site of a cohort is sampled independently with this probability
    # each evaluation, every site of a cohort is sampled independently with this probability (its own draw; 1: every site)
    eval_sample_rate: float = 1.0
    # seconds the coordinator waits for a site's reply to each message of a kind; a site that has not answered by then
    # is left out of that round and named ("timed out after N s"); secure-aggregation stages: secure_aggregation.stage_timeout
    train_timeout: float = 3600.0
    evaluate_timeout: float = 3600.0
    query_timeout: float = 600.0  # the handshake (who are you, which cohort)

    def __post_init__(self) -> None:
        _one_of("federation.engine", self.engine, ("inprocess", "ray"))
        _require(isinstance(self.weight_cap, (int, float)) and not isinstance(self.weight_cap, bool) and math.isfinite(self.weight_cap)
                 and self.weight_cap >= 1, "federation.weight_cap", self.weight_cap, "must be a number of examples >= 1")
        self.build_strategy()  # an unknown strategy or option is refused here, before anything runs
        _one_of("federation.wire_dtype", self.wire_dtype, ("float32", "bfloat16", "float16"))
        _require(isinstance(self.ray_address, str) and (not self.ray_address or self.engine == "ray"), "federation.ray_address",
                 self.ray_address, "is the address of a Ray cluster for federation.engine = \"ray\" (--engine ray)")
        _require(isinstance(self.ray_cpus_per_site, (int, float)) and self.ray_cpus_per_site > 0,
                 "federation.ray_cpus_per_site", self.ray_cpus_per_site, "must be > 0")
        _require(isinstance(self.site_sample_rate, (int, float)) and 0 < self.site_sample_rate <= 1,
                 "federation.site_sample_rate", self.site_sample_rate, "must be in (0, 1]")
        _require(isinstance(self.eval_sample_rate, (int, float)) and not isinstance(self.eval_sample_rate, bool)
                 and 0 < self.eval_sample_rate <= 1, "federation.eval_sample_rate", self.eval_sample_rate, "must be in (0, 1]")
        for key in ("train_timeout", "evaluate_timeout", "query_timeout"):
            v = getattr(self, key)
            _require(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0, f"federation.{key}", v,
                     "must be a number of seconds > 0")

    def build_strategy(self) -> Any:
        """The run's strategy (``fedlora.strategies.get_strategy``) built with its options; an unknown
        name, option or a bad value is a ``ConfigError`` naming it and what is allowed."""
        from .strategies import StrategyOptionError, get_strategy

        try:
            return get_strategy(self.strategy, **dict(self.strategy_options))
        except StrategyOptionError as e:
            key = "federation.strategy" if str(e).startswith("unknown strategy") else "federation.strategy_options"
            raise ConfigError(key, self.strategy if key == "federation.strategy" else dict(self.strategy_options), str(e)) from None


@dataclass(frozen=True)
class DemoConfig:
    """The synthetic demo data (used for cohorts without a ``data`` file)."""

    examples_per_site: int = 240
    size_skew: float = 0.5  # site k of a cohort gets examples_per_site * (1 - size_skew)^(k/(n-1))
    label_skew: float = 1.0  # Dirichlet concentration of each site's label mix (smaller = more skew)

    def __post_init__(self) -> None:
        _require(isinstance(self.examples_per_site, int) and 20 <= self.examples_per_site <= 1_000_000,
                 "demo.examples_per_site", self.examples_per_site, "must be an integer in [20, 1000000]")
        _require(isinstance(self.size_skew, (int, float)) and 0 <= self.size_skew < 1, "demo.size_skew", self.size_skew, "must be in [0, 1)")
        _require(isinstance(self.label_skew, (int, float)) and self.label_skew > 0, "demo.label_skew", self.label_skew, "must be > 0")


PARTITION_KINDS = ("iid", "dirichlet", "pathological", "size", "column")


@dataclass(frozen=True)
class PartitionConfig:
    """How a cohort's data file is split across its sites in simulation, with Flower Datasets'
    partitioners (the math: ``fedlora.simulation.partition``). Demo cohorts are generated per
    site instead and skewed by ``[demo]``."""

    kind: str = field(default="iid", metadata={"help": "iid, dirichlet (label skew), pathological (K labels per site), "
                                                       "size (linear size skew) or column (one site per value of `by`)"})
    alpha: float = field(default=0.5, metadata={"help": "dirichlet: concentration; smaller = more label skew"})
    classes: int = field(default=2, metadata={"help": "pathological: labels per site"})
    by: str = field(default="", metadata={"help": "column: the column whose values are the sites (a branch or hospital id)"})
    min_size: int = field(default=2, metadata={"help": "fewest rows per site (at least 2); dirichlet redraws until it holds"})

    def __post_init__(self) -> None:
        _one_of("partition.kind", self.kind, PARTITION_KINDS)
        _require(isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and math.isfinite(self.alpha)
                 and self.alpha > 0, "partition.alpha", self.alpha, "must be > 0")
        _require(isinstance(self.classes, int) and not isinstance(self.classes, bool) and 1 <= self.classes <= 100_000,
                 "partition.classes", self.classes, "must be an integer >= 1 (labels per site)")
        _require(isinstance(self.min_size, int) and not isinstance(self.min_size, bool) and 2 <= self.min_size <= 10_000_000,
                 "partition.min_size", self.min_size, "must be an integer >= 2 (a site needs one row to train and one to evaluate)")
        _require(isinstance(self.by, str), "partition.by", self.by, "must be a column name")
        if self.kind == "column":
            _require(self.by != "", "partition.by", self.by, 'is required with partition.kind = "column" (the column whose values name the sites)')
        else:
            _require(self.by == "", "partition.by", self.by, f'is used only with partition.kind = "column" (kind is {self.kind!r})')

    def describe(self) -> dict[str, Any]:
        """The scheme and the parameters it uses (for summary.json and partition.json)."""
        used = {"iid": (), "dirichlet": ("alpha",), "pathological": ("classes",), "size": (), "column": ("by",)}[self.kind]
        return {"kind": self.kind, **{k: getattr(self, k) for k in used}, "min_size": self.min_size}


@dataclass(frozen=True)
class CohortConfig:
    """One domain's sites: they share one adapter and head, aggregated only among themselves."""

    name: str
    sites: int = 3
    labels: tuple[str, ...] = ()  # empty: the demo's labels, or the sorted labels found in `data`
    data: str = ""  # a CSV/JSONL/Parquet file split across this cohort's sites; empty: demo data
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = ""  # causal_lm: prompt/response columns instead of text/label
    response_column: str = ""
    messages_column: str = ""  # causal_lm: a column of chat turns whose last turn is the answer

    def __post_init__(self) -> None:
        key = f"cohorts.{self.name}"
        _require(isinstance(self.name, str) and _NAME.match(self.name) is not None, key, self.name,
                 "cohort names are lower-case letters, digits and _ (at most 32), starting with a letter")
        _require(isinstance(self.sites, int) and not isinstance(self.sites, bool) and 1 <= self.sites <= 100_000,
                 f"{key}.sites", self.sites, "must be an integer in [1, 100000]")
        _require(isinstance(self.labels, tuple) and all(isinstance(x, str) and x for x in self.labels),
                 f"{key}.labels", self.labels, "must be a list of non-empty strings")
        _require(len(set(self.labels)) == len(self.labels), f"{key}.labels", self.labels, "must not repeat a label")
        _require(len(self.labels) != 1, f"{key}.labels", self.labels, "needs at least two labels")
        _require(isinstance(self.data, str), f"{key}.data", self.data, "must be a path")
        if not self.data:
            _require(self.name in DEMO_DOMAINS, key, self.name,
                     f"has no `data` file, and demo data exists only for {', '.join(DEMO_DOMAINS)}")
        for col in ("text_column", "label_column"):
            v = getattr(self, col)
            _require(isinstance(v, str) and v != "", f"{key}.{col}", v, "must be a non-empty column name")
        _require(self.text_column != self.label_column, f"{key}.label_column", self.label_column, "must differ from text_column")
        for col in ("prompt_column", "response_column", "messages_column"):
            _require(isinstance(getattr(self, col), str), f"{key}.{col}", getattr(self, col), "must be a column name")
        _require(bool(self.prompt_column) == bool(self.response_column), f"{key}.response_column", self.response_column,
                 "prompt_column and response_column go together (instruction data)")


def _default_cohorts() -> tuple[CohortConfig, ...]:
    return tuple(CohortConfig(name=d) for d in DEMO_DOMAINS)


@dataclass(frozen=True)
class RunConfig:
    """A whole run. Defaults: 9 sites (3 finance, 3 medical, 3 retail) on synthetic demo
    data, the packaged pretrained model, LoRA r=8 on query/value, FedAvg, in-process engine."""

    seed: int = 0
    out: str = ""  # empty: runs/<timestamp>
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    cohorts: tuple[CohortConfig, ...] = field(default_factory=_default_cohorts)

    def __post_init__(self) -> None:
        _require(isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**63,
                 "seed", self.seed, "must be a non-negative integer")
        _require(isinstance(self.out, str), "out", self.out, "must be a path")
        _require(len(self.cohorts) > 0, "cohorts", [], "at least one cohort is needed")
        names = [c.name for c in self.cohorts]
        _require(len(set(names)) == len(names), "cohorts", names, "cohort names must be unique")
        _require(self.partition.kind == "iid" or any(c.data for c in self.cohorts), "partition.kind", self.partition.kind,
                 "splits a cohort's data file across its sites, but no cohort has one (--data DOMAIN=PATH); the demo data "
                 "is skewed by [demo] size_skew and label_skew")
        refusal = self.federation.build_strategy().secure_refusal()
        if self.secure_aggregation.enabled and refusal:
            _require(False, "federation.strategy", self.federation.strategy, f"{refusal}, or set secure_aggregation.enabled = false "
                     "(--no-secure-aggregation)")
        if self.privacy.client_dp and refusal:
            _require(False, "federation.strategy", self.federation.strategy, "cannot be combined with privacy.client_dp: client-level "
                     f"DP releases only the noised mean of the clipped updates ({refusal.split(';')[0]})")
        _require(not (self.train.gradient_checkpointing and self.privacy.dp), "train.gradient_checkpointing", True,
                 "cannot be combined with DP-SGD: Opacus's per-example gradient hooks would see every checkpointed layer twice "
                 "(recomputed in backward); turn one of them off")
        if self.privacy.client_dp and self.privacy.client_noise == "sites":
            _require(self.secure_aggregation.enabled, "privacy.client_noise", "sites",
                     "needs secure aggregation: in the clear the coordinator sees each update with only its own share of the "
                     "noise (multiplier z / sqrt(m)); use client_noise = \"coordinator\" or enable secure_aggregation")
        if self.secure_aggregation.enabled and self.privacy.adaptive_clip:
            _require(self.privacy.client_noise == "coordinator", "privacy.adaptive_clip", True,
                     "with secure aggregation needs privacy.client_noise = \"coordinator\" (the coordinator noises the "
                     "securely summed count of unclipped updates)")

    @property
    def total_sites(self) -> int:
        return sum(c.sites for c in self.cohorts)

    def cohort(self, name: str) -> CohortConfig:
        for c in self.cohorts:
            if c.name == name:
                return c
        raise ConfigError("cohorts", name, f"no such cohort; known: {', '.join(c.name for c in self.cohorts)}")

    def to_dict(self) -> dict[str, Any]:
        """A TOML/JSON-ready dict (tuples as lists, cohorts as a table by name)."""
        out: dict[str, Any] = {"seed": self.seed, "out": self.out}
        for f in fields(self):
            if f.name in ("seed", "out", "cohorts"):
                continue
            out[f.name] = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(getattr(self, f.name)).items()}
        out["cohorts"] = {c.name: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(c).items() if k != "name"}
                          for c in self.cohorts}
        return out


_SECTIONS: dict[str, type] = {
    "model": ModelConfig, "lora": LoraSettings, "task": TaskConfig, "train": TrainConfig,
    "federation": FederationConfig, "demo": DemoConfig, "partition": PartitionConfig, "privacy": PrivacyConfig,
    "secure_aggregation": SecureAggregationConfig,
}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert TOML/flag values to the field's type, naming the key on mismatch."""
    text = str(hint)
    if text.startswith("tuple"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        _require(isinstance(value, (list, tuple)), key, value, "must be a list")
        return tuple(value)
    if hint is float or text == "float":
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "must be a number")
        return float(value)
    if hint is int or text == "int":
        _require(isinstance(value, int) and not isinstance(value, bool), key, value, "must be an integer")
        return value
    if text.startswith("Mapping"):
        _require(isinstance(value, Mapping), key, value, "must be a table")
        return dict(value)
    if hint is bool or text == "bool":
        _require(isinstance(value, bool), key, value, "must be true or false")
        return value
    if hint is str or text == "str":
        _require(isinstance(value, str), key, value, "must be a string")
        return value
    return value


def _build(cls: type, data: Mapping[str, Any], prefix: str, **extra: Any) -> Any:
    _require(isinstance(data, Mapping), prefix, data, "must be a table")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)} - set(extra)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}" if prefix else unknown[0], data[unknown[0]],
                          f"unknown key; known keys here: {', '.join(sorted(known))}")
    kwargs = {k: _coerce(f"{prefix}.{k}" if prefix else k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs, **extra)


# The dataclass defaults are DP-SGD's (DP is on by default). Without DP these defaults apply to
# every key the config does not set (measured on ../shared/data; README "Defaults").
NO_DP_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"mode": "standard", "rank": 8},
    "train": {"batch_size": 16, "optimizer": "adamw", "learning_rate": 2e-3, "max_local_steps": 200},
}


def mode_defaults(task: str, dp: bool) -> dict[str, dict[str, Any]]:
    """The values a run takes for the keys its config leaves unset: the task's own defaults
    (``fedlora.tasks``, e.g. the causal-LM task's decoder and batch), else, without DP,
    ``NO_DP_DEFAULTS``; under DP the dataclass defaults."""
    from .tasks import task_defaults

    own = task_defaults(task, dp)
    if own is not None:
        return own
    return {} if dp else NO_DP_DEFAULTS


def _with_mode_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` plus ``mode_defaults`` for the keys it leaves unset."""
    privacy, task = data.get("privacy", {}), data.get("task", {})
    dp = not (isinstance(privacy, Mapping) and privacy.get("dp", PrivacyConfig.dp) is False)
    kind = task.get("kind", TaskConfig.kind) if isinstance(task, Mapping) else TaskConfig.kind
    out = dict(data)
    for section, values in mode_defaults(str(kind), dp).items():
        given = data.get(section, {})
        if isinstance(given, Mapping):
            out[section] = {**values, **given}
    return out


def config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from a parsed TOML document (with ``mode_defaults`` for the
    task and ``privacy.dp``)."""
    data = _with_mode_defaults(dict(data))
    top_known = {"seed", "out", "cohorts", *_SECTIONS}
    unknown = sorted(set(data) - top_known)
    if unknown:
        raise ConfigError(unknown[0], data[unknown[0]], f"unknown key; known top-level keys: {', '.join(sorted(top_known))}")
    kwargs: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        if name in data:
            kwargs[name] = _build(cls, data[name], name)
    if "cohorts" in data:
        table = data["cohorts"]
        _require(isinstance(table, Mapping) and len(table) > 0, "cohorts", table, "must be a non-empty table of [cohorts.<name>]")
        kwargs["cohorts"] = tuple(_build(CohortConfig, v, f"cohorts.{k}", name=k) for k, v in table.items())
    for k in ("seed", "out"):
        if k in data:
            kwargs[k] = _coerce(k, data[k], int if k == "seed" else str)
    return RunConfig(**kwargs)


def load_config(path: str | Path | None) -> dict[str, Any]:
    """Parse a TOML config file into a plain dict (validation happens in ``config_from_dict``)."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError("--config", str(p), "file not found")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError("--config", str(p), f"is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("--config", str(p), f"is not valid TOML: {e}") from None


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted-key overrides applied (``train.rounds`` -> 3).

    ``cohorts.*.sites`` sets a key in every cohort. Values of None are skipped (flag not given).
    """
    out: dict[str, Any] = _deep_copy(data)
    for dotted, value in overrides.items():
        if value is None:
            continue
        parts = dotted.split(".")
        if parts[0] == "cohorts" and len(parts) == 3 and parts[1] == "*":
            cohorts = out.setdefault("cohorts", {n: {} for n in DEMO_DOMAINS})
            for c in cohorts.values():
                c[parts[2]] = value
            continue
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _deep_copy(d: Any) -> Any:
    if isinstance(d, Mapping):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d
