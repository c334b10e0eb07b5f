"""The learning task at a site: one pluggable piece.

A task says how texts and labels become tensors and how loss and accuracy are computed; the
model it runs on is the base model's body with LoRA and a head on its pooled hidden states
(``fedlora.model``, ``fedlora.pooling``). The coordinator and
the strategies never look inside a task; a later task (causal-LM instruction tuning) adds a
class here and a name in ``TASKS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError


@dataclass
class EncodedExamples:
    """A site's examples, tokenised once (unpadded token ids; padded per batch)."""

    input_ids: list[list[int]]
    labels: np.ndarray  # int64 class ids

    def __len__(self) -> int:
        return len(self.input_ids)


class Task(Protocol):
    name: str
    peft_task_type: str

    def encode(self, tokenizer: Any, texts: Sequence[str], labels: np.ndarray, max_length: int) -> EncodedExamples: ...

    def batch(self, examples: EncodedExamples, index: np.ndarray, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]: ...


class SequenceClassification:
    """Text -> one of k labels. Loss: mean cross-entropy of the logits of the model's head."""

    name = "sequence_classification"
    peft_task_type = "FEATURE_EXTRACTION"  # the exported LoRA adapts the body; the head ships beside it

    def encode(self, tokenizer: Any, texts: Sequence[str], labels: np.ndarray, max_length: int) -> EncodedExamples:
        enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
        return EncodedExamples(input_ids=[list(ids) for ids in enc["input_ids"]], labels=np.asarray(labels, dtype=np.int64))

    def batch(self, examples: EncodedExamples, index: np.ndarray, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Right-pad the selected examples to the longest one in the batch."""
        rows = [examples.input_ids[i] for i in index]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, : len(r)] = 1
        labels = torch.from_numpy(examples.labels[index])
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (cross-entropy, mean or per example (``reduction="none"``), logits)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        return F.cross_entropy(logits, batch["labels"], reduction=reduction), logits


TASKS: dict[str, type] = {"sequence_classification": SequenceClassification}


def get_task(name: str) -> Task:
    """Return the task registered under ``name``; unknown names list the known ones."""
    try:
        return TASKS[name]()
    except KeyError:
        raise ConfigError("task.kind", name, f"unknown task; known: {', '.join(TASKS)}") from None
