"""Use a cohort's exported classifier (``RUN_DIR/adapters/<cohort>``) without the federation.

The folder holds a PEFT LoRA adapter for the base model's body, ``head.safetensors`` and
``fedlora.json`` (see ``LoraRuntime.save_peft``). This is the README's recipe as a function::

    body   = PeftModel.from_pretrained(AutoModel.from_pretrained(base), adapter_dir)
    hidden = body(**tokenizer(texts, padding=True, truncation=True, max_length=L)).last_hidden_state
    logits = pool(hidden, attention_mask, meta["pooling"]) @ W.T + b
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelError
from .pooling import pool


@dataclass
class ExportedClassifier:
    body: Any  # PeftModel over AutoModel
    tokenizer: Any
    weight: torch.Tensor  # k x d
    bias: torch.Tensor  # k
    pooling: str
    labels: list[str]
    max_length: int

    @torch.no_grad()
    def logits(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        hidden = self.body(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        return pool(hidden, enc["attention_mask"], self.pooling) @ self.weight.T + self.bias

    def predict(self, texts: list[str]) -> list[str]:
        return [self.labels[i] for i in self.logits(texts).argmax(dim=-1).tolist()]


def load_classifier(adapter_dir: str | Path, base_model: str | Path | None = None) -> ExportedClassifier:
    """The exported classifier in eval mode; ``base_model`` defaults to the folder the adapter names."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    d = Path(adapter_dir)
    meta_path = d / "fedlora.json"
    if not meta_path.is_file():
        raise ModelError(f"{d} is not a fedlora adapter folder (no fedlora.json)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if base_model is None:
        base_model = json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
    body = PeftModel.from_pretrained(AutoModel.from_pretrained(str(base_model), dtype=torch.float32), str(d)).eval()
    head = load_file(str(d / meta.get("head", "head.safetensors")))
    return ExportedClassifier(body=body, tokenizer=AutoTokenizer.from_pretrained(str(base_model)), weight=head["classifier.weight"],
                              bias=head["classifier.bias"], pooling=meta["pooling"], labels=list(meta["labels"]),
                              max_length=int(meta.get("max_length", 512)))
