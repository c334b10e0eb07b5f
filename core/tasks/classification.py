"""Sequence classification: text -> one of k labels, a linear head on the pooled hidden states.

Model: the base model's body (``AutoModel``: an encoder, or a decoder without its LM head) with
LoRA, then ``logits = W dropout(pool(h, mask)) + b`` (``fedlora.pooling``: mean, cls or last).
The head (``classifier.weight`` k x d, ``classifier.bias`` k) is trained and sent beside LoRA.
Loss: cross-entropy of the logits. Evaluation: mean loss, accuracy and the eval examples per
class (``count_buckets = k``; the cohort's majority baseline is ``max count / n``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from ..errors import DataError
from ..pooling import pool
from .base import EncodedExamples, EvalResult, LabelledTexts, SiteColumns, capped_sum, pad_right


class PooledClassifier(nn.Module):
    """``backbone`` (a PEFT-wrapped encoder or decoder body returning ``last_hidden_state``) ->
    ``pool`` -> dropout -> ``classifier`` (nn.Linear). The head is swapped per cohort by assigning
    ``.classifier``; its parameters are named ``classifier.weight`` / ``classifier.bias``."""

    def __init__(self, backbone: nn.Module, pooling: str, classifier: nn.Linear, dropout: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = classifier

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SequenceClassifierOutput:
        pooled = self.pooled(input_ids, attention_mask)
        return SequenceClassifierOutput(logits=self.classifier(self.dropout(pooled.to(self.classifier.weight.dtype))))


# LoRA targets by the base model's ``model_type`` (attention query and value projections)
_TARGETS = {"bert": ("query", "value"), "roberta": ("query", "value"), "xlm-roberta": ("query", "value"),
            "distilbert": ("q_lin", "v_lin"), "gpt2": ("c_attn",)}
_DEFAULT_TARGETS = ("q_proj", "v_proj")  # Llama, Qwen, Mistral, Gemma, Phi-3 and most newer families


def default_targets(model_type: str) -> tuple[str, ...]:
    """The attention query/value projections' names for ``model_type`` (shared with ``causal_lm``)."""
    return _TARGETS.get(model_type, _DEFAULT_TARGETS)


class SequenceClassification:
    """Text -> one of k labels. Loss: mean cross-entropy of the logits of the model's head."""

    name = "sequence_classification"
    peft_task_type = "FEATURE_EXTRACTION"  # the exported LoRA adapts the body; the head ships beside it
    labels_required = True
    defaults: dict[str, dict[str, Any]] = {}  # the dataclass defaults are this task's
    head_attr = "classifier"
    extra_metrics: tuple[str, ...] = ()  # fields beyond loss/accuracy/majority in metrics.jsonl and summary.json

    # ---- data ---------------------------------------------------------------------
    def read(self, path: str, columns: SiteColumns, labels: Sequence[str] | None) -> tuple[LabelledTexts, list[str]]:
        """The text and label columns; ``labels`` None: the sorted labels found; an empty list is refused."""
        from fedlora.client.data import load_labelled_texts

        if labels is not None and len(labels) == 0:
            raise DataError(f"{path}: the cohort's plan names no labels; a classifier needs its cohort's label list")
        return load_labelled_texts(path, columns.text, columns.label, labels)

    def encode(self, tokenizer: Any, data: LabelledTexts, labels: Sequence[str], max_length: int) -> EncodedExamples:
        enc = tokenizer(list(data.texts), truncation=True, max_length=max_length, padding=False)
        return EncodedExamples(input_ids=[list(ids) for ids in enc["input_ids"]], labels=np.asarray(data.labels, dtype=np.int64))

    def batch(self, examples: EncodedExamples, index: np.ndarray, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Right-pad the selected examples to the longest one in the batch."""
        ids, mask = pad_right([examples.input_ids[i] for i in index], pad_id)
        labels = torch.from_numpy(examples.labels[index])
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (cross-entropy, mean or per example (``reduction="none"``), logits)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        return F.cross_entropy(logits, batch["labels"], reduction=reduction), logits

    # ---- model --------------------------------------------------------------------
    def load_base(self, path: Path, dtype: torch.dtype, **kwargs: Any) -> nn.Module:
        import transformers

        return transformers.AutoModel.from_pretrained(str(path), dtype=dtype, **kwargs)

    def default_targets(self, model_type: str) -> tuple[str, ...]:
        return default_targets(model_type)

    def make_head(self, hidden_size: int, num_labels: int) -> nn.Module | None:
        return nn.Linear(hidden_size, num_labels)

    def wrap(self, peft_model: nn.Module, pooling: str, head_dropout: float, hidden_size: int) -> nn.Module:
        return PooledClassifier(peft_model, pooling, nn.Linear(hidden_size, 2), head_dropout)

    def set_head(self, model: nn.Module, head: nn.Module | None) -> None:
        model.classifier = head

    # ---- evaluation -----------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, runtime: Any, examples: EncodedExamples, labels: Sequence[str], batch_size: int) -> EvalResult:
        """Mean loss, accuracy and per-class counts of the loaded adapter on ``examples``."""
        import time

        pad = int(runtime.tokenizer.pad_token_id)
        total_loss, capped, correct = 0.0, 0.0, 0
        start_time = time.perf_counter()
        for start in range(0, len(examples), batch_size):
            index = np.arange(start, min(start + batch_size, len(examples)))
            batch = self.batch(examples, index, pad, runtime.device)
            with runtime.autocast():
                per_example, logits = self.loss(runtime.model, batch, reduction="none")
            total_loss += float(per_example.mean()) * len(index)
            capped += capped_sum(per_example)
            correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
        n = len(examples)
        counts = np.bincount(examples.labels, minlength=len(labels)).tolist()
        return EvalResult(loss=total_loss / n, accuracy=correct / n, num_examples=n, label_counts=[int(c) for c in counts],
                          seconds=time.perf_counter() - start_time, loss_sum_capped=capped)

    def count_buckets(self, labels: Sequence[str]) -> int:
        return len(labels)

    def report(self, metrics: dict[str, Any], labels: Sequence[str]) -> dict[str, Any]:
        """A cohort's fields in metrics.jsonl / summary.json: eval_loss, accuracy, majority_baseline as combined."""
        return metrics

    def export_meta(self, labels: Sequence[str]) -> dict[str, Any]:
        return {"labels": list(labels), "num_labels": len(labels), "id2label": dict(enumerate(labels)), "head": "head.safetensors"}
