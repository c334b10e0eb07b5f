"""What every task provides, and the pieces tasks share (pure torch; no Flower, no privacy).

A task is one file in ``fedlora.tasks`` plus its entry in ``TASKS``. It owns everything that is
task-specific, so that the coordinator, the strategies, privacy and secure aggregation never
branch on the task:

* its data: which columns it reads (``read``), how records become token ids (``encode``) and
  batches (``batch``);
* its model: the base model class it loads (``load_base``), what is trainable besides LoRA (a head
  or nothing: ``make_head``), how the model is called (``wrap``) and its loss per example (``loss``);
* its evaluation (``evaluate``) and the integers its metrics are summed in: every task reports
  ``EvalResult`` (a capped loss sum, a count of correct answers and ``count_buckets(labels)``
  counts that sum to the number of examples), so the clear mean, the DP eval release and the
  secure sum carry the same vector for every task; ``report`` turns a cohort's combined figures
  into its fields in metrics.jsonl and summary.json;
* its export (``peft_task_type``, ``export_meta``) and its config defaults (``defaults``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from fedlora.privacy.eval_release import LOSS_CAP  # the DP eval release's per-example loss cap (one definition)


# a chat prompt: the turns before the answer, as (role, content) pairs
Turns = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class LabelledTexts:
    """A site's records: texts (or chat turns) and their class ids (indices into the cohort's label
    list; -1 where the data has no classes), and for instruction data the answer to each text."""

    texts: tuple[str | Turns, ...]
    labels: np.ndarray  # int64
    responses: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: np.ndarray | Sequence[int]) -> LabelledTexts:
        """The rows ``index`` (0-based data rows, in that order); a new object (labels copied)."""
        index = np.asarray(index, dtype=np.int64)
        responses = None if self.responses is None else tuple(self.responses[i] for i in index)
        return LabelledTexts(tuple(self.texts[i] for i in index), self.labels[index], responses)


@dataclass
class EncodedExamples:
    """A site's examples, tokenised once (unpadded token ids; padded per batch). For a causal
    LM): ``prompt_lengths``, per example how many leading tokens are prompt (no loss on them)."""

    input_ids: list[list[int]]
    labels: np.ndarray  # int64 class ids (-1: no class)
    prompt_lengths: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class SiteColumns:
    """Which columns of a site's file a task reads (``text``/``label``; ``prompt``/``response``; ``messages``)."""

    text: str = "text"
    label: str = "label"
    prompt: str = ""
    response: str = ""
    messages: str = ""


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean per-example loss
    accuracy: float  # correct / n (0 where the task has no classes)
    num_examples: int
    label_counts: list[int]  # ``count_buckets`` counts that sum to num_examples (per class: the majority baseline)
    seconds: float  # wall time of the forward passes
    loss_sum_capped: float = 0.0  # sum of min(loss_i, LOSS_CAP) over the examples (the DP eval release's loss entry)


class Task(Protocol):
    name: str
    peft_task_type: str
    labels_required: bool  # whether a cohort needs a label list (deployment: in the config)
    head_attr: str  # the head's attribute on the model and its wire keys' prefix ("" without a head)
    extra_metrics: tuple[str, ...]  # the task's own fields in metrics.jsonl and summary.json (``report`` adds them)
    defaults: Mapping[str, Mapping[str, Any]]  # config keys this task sets when the config leaves them unset

    def read(self, path: str, columns: SiteColumns, labels: Sequence[str] | None) -> tuple[LabelledTexts, list[str]]: ...

    def encode(self, tokenizer: Any, data: LabelledTexts, labels: Sequence[str], max_length: int) -> EncodedExamples: ...

    def batch(self, examples: EncodedExamples, index: np.ndarray, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]: ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], reduction: str = "mean") -> tuple[torch.Tensor, Any]: ...

    def load_base(self, path: Path, dtype: torch.dtype, **kwargs: Any) -> nn.Module: ...

    def default_targets(self, model_type: str) -> tuple[str, ...]: ...

    def make_head(self, hidden_size: int, num_labels: int) -> nn.Module | None: ...

    def wrap(self, peft_model: nn.Module, pooling: str, head_dropout: float, hidden_size: int) -> nn.Module: ...

    def set_head(self, model: nn.Module, head: nn.Module | None) -> None: ...

    def evaluate(self, runtime: Any, examples: EncodedExamples, labels: Sequence[str], batch_size: int) -> EvalResult: ...

    def count_buckets(self, labels: Sequence[str]) -> int: ...

    def report(self, metrics: dict[str, Any], labels: Sequence[str]) -> dict[str, Any]: ...

    def export_meta(self, labels: Sequence[str]) -> dict[str, Any]: ...


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id rows to the longest: (ids, attention mask), both int64 (batch x width)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[j, : len(r)] = 1
    return ids, mask


def capped_sum(per_example: torch.Tensor) -> float:
    """``sum_i min(loss_i, LOSS_CAP)`` (a non-finite loss, from a crafted adapter, counts as the cap:
    no NaN can signal a record)."""
    per = per_example.float()
    return float(torch.where(torch.isfinite(per), per.clamp(0.0, LOSS_CAP), torch.full_like(per, LOSS_CAP)).sum())
