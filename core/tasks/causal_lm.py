"""Causal-LM instruction tuning: a decoder learns to answer prompts; loss on the answer only.

**Data** (CSV, JSONL or Parquet through the same loader and its errors), one of:

* ``prompt`` / ``response`` columns (``--prompt-column``, ``--response-column``);
* a ``messages`` column (``--messages-column``) of chat turns ``[{"role", "content"}, ...]`` (a JSON
  string in CSV) whose last turn is the assistant's answer;
* a classification file (``text`` + ``label``): *label-answer* data. The prompt asks for one of
  the cohort's labels (``INSTRUCTION``) and the answer is the label, so every classification set
  also works with this task.

**Encoding.** The prompt is the tokenizer's chat template over the turns with the generation
prompt (without a template: the turns' text and a newline, after BOS); the answer is its tokens
plus EOS. The loss is the mean cross-entropy over the answer tokens of each example (prompt
tokens are masked). Past ``max_length`` the prompt is cut in the middle (its first quarter and
its end, with the generation prompt, stay) and the answer is kept; an example whose answer is
empty would be all prompt and is refused. Batches are left-padded (with explicit position ids),
so that every example ends at the last position and only the answer's positions need logits.

**Evaluation.** Per example the mean answer-token loss (capped at ``LOSS_CAP`` in the DP release);
a cohort's ``perplexity`` is ``exp`` of the example-weighted mean of those losses. On label-answer
data also *generative accuracy*: greedy decoding of a few tokens from the prompt; the prediction
is the label equal to the normalised answer (lower case, punctuation and spaces trimmed), else the
label named first in it, else none (wrong). That is how FlowerTune scores FPB and TFNS.

**Model.** ``AutoModelForCausalLM`` with LoRA on the attention query/value projections
(``lora.target_modules = "auto"``; ``"all-linear"`` for every linear layer but the LM head);
nothing else is trainable: tied embeddings and the LM head stay frozen.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedlora.errors import DataError

from .base import EncodedExamples, EvalResult, LabelledTexts, SiteColumns, Turns, capped_sum
from .classification import default_targets

INSTRUCTION = "{text}\n\nAnswer with one of: {choices}."
ANSWER_TOKENS = 16  # greedy decoding length for generative accuracy (room for an untrained model to name a label)
IGNORE = -100


def label_prompt(text: str, labels: Sequence[str]) -> str:
    """The instruction for label-answer data: the text, then the choices (nearest the answer, so
    that a middle cut keeps them)."""
    return INSTRUCTION.format(text=text.strip(), choices=", ".join(labels))


def normalise(text: str) -> str:
    return re.sub(r"[^\w\s-]", " ", text.lower()).strip()


def predicted_label(answer: str, labels: Sequence[str]) -> int:
    """The index of the label the generated ``answer`` gives (module docstring), or -1."""
    norm = normalise(answer)
    names = [normalise(lab) for lab in labels]
    for i, name in enumerate(names):
        if norm == name:
            return i
    best, where = -1, len(norm) + 1
    for i, name in enumerate(names):
        m = re.search(rf"(?<!\w){re.escape(name)}(?!\w)", norm)
        if m and m.start() < where:
            best, where = i, m.start()
    return best


def _turns(cell: Any, p: Path, row: int, column: str) -> tuple[Turns, str]:
    """A messages cell -> (turns before the answer, the answer)."""
    value = cell
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: row {row}, column {column!r}: not a JSON list of chat turns ({e.msg})") from None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise DataError(f"{p}: row {row}, column {column!r}: expected a non-empty list of chat turns, found {type(value).__name__}")
    turns = []
    for t in value:
        if not isinstance(t, dict) or not isinstance(t.get("role"), str) or not isinstance(t.get("content"), str):
            raise DataError(f"{p}: row {row}, column {column!r}: every turn needs a string 'role' and 'content', found {t!r:.80}")
        turns.append((t["role"], t["content"]))
    if turns[-1][0] != "assistant":
        raise DataError(f"{p}: row {row}, column {column!r}: the last turn must be the assistant's answer (role "
                        f"'assistant'), found role {turns[-1][0]!r}")
    if len(turns) < 2:
        raise DataError(f"{p}: row {row}, column {column!r}: there is no prompt before the assistant's answer")
    return tuple(turns[:-1]), turns[-1][1]


def read_instructions(path: str, columns: SiteColumns, labels: Sequence[str] | None) -> tuple[LabelledTexts, list[str]]:
    """Instruction data from ``path`` (module docstring). Label-answer data keeps its label ids and
    list (``labels`` None: the sorted labels found; empty: refused, the cohort's list is needed);
    prompt/response and messages data have no classes (ids -1, label list empty)."""
    from fedlora.client.data import _column, load_labelled_texts, read_table

    if not (columns.messages or columns.prompt):
        if labels is not None and len(labels) == 0:
            raise DataError(f"{path}: label-answer data (text and label columns) needs the cohort's labels, and the plan names "
                            "none (cohorts.<name>.labels; or give --prompt-column/--response-column or --messages-column)")
        return load_labelled_texts(path, columns.text, columns.label, labels)
    p = Path(path)
    df = read_table(p)
    prompts: list[str | Turns] = []
    answers: list[str] = []
    if columns.messages:
        for i, cell in enumerate(_column(df, p, columns.messages, "messages").tolist()):
            turns, answer = _turns(cell, p, i + 1, columns.messages)
            prompts.append(turns)
            answers.append(answer)
    else:
        if not columns.response:
            raise DataError(f"{p}: a prompt column ({columns.prompt!r}) needs a response column (--response-column)")
        for role, col in (("prompt", columns.prompt), ("response", columns.response)):
            for i, v in enumerate(_column(df, p, col, role).tolist()):
                if not isinstance(v, str):
                    raise DataError(f"{p}: row {i + 1}, column {col!r}: expected text, found {type(v).__name__} {v!r:.40}")
                (prompts if role == "prompt" else answers).append(v)
    for i, (q, a) in enumerate(zip(prompts, answers)):
        if isinstance(q, str) and not q.strip():
            raise DataError(f"{p}: row {i + 1}: empty prompt")
        if not a.strip():
            raise DataError(f"{p}: row {i + 1}: empty response: the example would be all prompt, with nothing to learn")
    return LabelledTexts(tuple(prompts), np.full(len(prompts), -1, dtype=np.int64), tuple(answers)), []


def _cut_middle(ids: list[int], budget: int) -> list[int]:
    """At most ``budget`` tokens of ``ids``: its first quarter and its end."""
    if len(ids) <= budget:
        return ids
    head = budget // 4
    return ids[:head] + ids[len(ids) - (budget - head):]


def prompt_ids(tokenizer: Any, prompt: str | Turns) -> list[int]:
    """The prompt's token ids up to where the answer starts (chat template with the generation prompt)."""
    turns = ((("user", prompt),) if isinstance(prompt, str) else prompt)
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return [int(i) for i in out]
    text = "\n".join(c for _, c in turns) + "\n"
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


class CausalLM:
    """Supervised instruction tuning of a decoder (module docstring)."""

    name = "causal_lm"
    peft_task_type = "CAUSAL_LM"
    labels_required = False
    head_attr = ""
    extra_metrics = ("perplexity",)
    # config keys this task sets when the config leaves them unset ("dp" under DP, the default; "no_dp" without)
    defaults: dict[str, dict[str, dict[str, Any]]] = {
        "dp": {"model": {"source": "packaged:SmolLM2-135M-Instruct", "max_length": 128},
               "lora": {"mode": "frozen_a", "rank": 8},
               "train": {"batch_size": 16, "learning_rate": 2.0, "max_local_steps": 8},
               "demo": {"examples_per_site": 72}},
        "no_dp": {"model": {"source": "packaged:SmolLM2-135M-Instruct", "max_length": 128},
                  "lora": {"mode": "standard", "rank": 8},
                  "train": {"batch_size": 8, "optimizer": "adamw", "learning_rate": 1e-3, "max_local_steps": 8},
                  "demo": {"examples_per_site": 72}},
    }

    # ---- data ---------------------------------------------------------------------
    def read(self, path: str, columns: SiteColumns, labels: Sequence[str] | None) -> tuple[LabelledTexts, list[str]]:
        return read_instructions(path, columns, labels)

    def encode(self, tokenizer: Any, data: LabelledTexts, labels: Sequence[str], max_length: int) -> EncodedExamples:
        eos = tokenizer.eos_token_id
        rows: list[list[int]] = []
        lengths: list[int] = []
        for i, text in enumerate(data.texts):
            if data.responses is not None:
                prompt, answer = text, data.responses[i]
            else:
                prompt, answer = label_prompt(str(text), labels), labels[int(data.labels[i])]
            a = [int(t) for t in tokenizer(answer, add_special_tokens=False)["input_ids"]]
            if not a:
                raise DataError(f"example {i + 1}: the answer {answer!r} has no tokens: the example would be all prompt")
            a = (a + ([eos] if eos is not None else []))[: max_length - 1]
            q = _cut_middle(prompt_ids(tokenizer, prompt), max_length - len(a))
            rows.append(q + a)
            lengths.append(len(q))
        return EncodedExamples(input_ids=rows, labels=np.asarray(data.labels, dtype=np.int64), prompt_lengths=lengths)

    def batch(self, examples: EncodedExamples, index: np.ndarray, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Left-padded ids, mask, position ids and the answer mask (1 on answer tokens)."""
        rows = [examples.input_ids[i] for i in index]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        answer = torch.zeros((len(rows), width), dtype=torch.long)
        for j, (i, r) in enumerate(zip(index, rows)):
            off = width - len(r)
            ids[j, off:] = torch.tensor(r, dtype=torch.long)
            mask[j, off:] = 1
            answer[j, off + examples.prompt_lengths[i]:] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device),
                "answer_mask": answer.to(device), "labels": torch.from_numpy(examples.labels[index]).to(device)}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], reduction: str = "mean") -> tuple[torch.Tensor, None]:
        """Mean answer-token cross-entropy per example (``reduction="none"``) or over the batch.

        Only the last ``K = longest answer + 1`` positions get logits (``logits_to_keep``): the
        logit at position p predicts token p + 1."""
        answer = batch["answer_mask"]
        k = int(answer.sum(dim=1).max()) + 1
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                       logits_to_keep=k).logits[:, :-1].float()
        targets = batch["input_ids"][:, -k + 1:]
        weight = answer[:, -k + 1:].to(logits.dtype)
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none").view_as(weight)
        per_example = (per_token * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)
        return (per_example if reduction == "none" else per_example.mean()), None

    # ---- model --------------------------------------------------------------------
    def load_base(self, path: Path, dtype: torch.dtype, **kwargs: Any) -> nn.Module:
        import transformers

        return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)

    def default_targets(self, model_type: str) -> tuple[str, ...]:
        return default_targets(model_type)

    def make_head(self, hidden_size: int, num_labels: int) -> nn.Module | None:
        return None  # nothing trainable besides LoRA: the (tied) LM head stays frozen

    def wrap(self, peft_model: nn.Module, pooling: str, head_dropout: float, hidden_size: int) -> nn.Module:
        return peft_model

    def set_head(self, model: nn.Module, head: nn.Module | None) -> None:
        return None

    # ---- evaluation -----------------------------------------------------------------
    @torch.no_grad()
    def generate(self, runtime: Any, prompts: Sequence[list[int]], max_new_tokens: int) -> list[str]:
        """Greedy answers to tokenised prompts (left-padded batch), decoded without special tokens."""
        tok = runtime.tokenizer
        width = max(len(p) for p in prompts)
        pad = int(tok.pad_token_id)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(prompts):
            ids[j, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[j, width - len(p):] = 1
        with runtime.autocast():
            out = runtime.peft_model.generate(input_ids=ids.to(runtime.device), attention_mask=mask.to(runtime.device),
                                              max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        return [tok.decode(row[width:], skip_special_tokens=True) for row in out.cpu()]

    @torch.no_grad()
    def evaluate(self, runtime: Any, examples: EncodedExamples, labels: Sequence[str], batch_size: int) -> EvalResult:
        """Answer loss per example; on label-answer data also the generative accuracy."""
        pad = int(runtime.tokenizer.pad_token_id)
        n = len(examples)
        total, capped, correct = 0.0, 0.0, 0
        start_time = time.perf_counter()
        for start in range(0, n, batch_size):
            index = np.arange(start, min(start + batch_size, n))
            batch = self.batch(examples, index, pad, runtime.device)
            with runtime.autocast():
                per_example, _ = self.loss(runtime.model, batch, reduction="none")
            total += float(per_example.sum())
            capped += capped_sum(per_example)
            if labels:
                prompts = [examples.input_ids[i][: examples.prompt_lengths[i]] for i in index]
                answers = self.generate(runtime, prompts, ANSWER_TOKENS)
                truth = examples.labels[index]
                correct += sum(int(predicted_label(a, labels) == int(t)) for a, t in zip(answers, truth))
        counts = np.bincount(examples.labels, minlength=len(labels)).tolist() if labels else [n]
        return EvalResult(loss=total / n, accuracy=correct / n, num_examples=n, label_counts=[int(c) for c in counts],
                          seconds=time.perf_counter() - start_time, loss_sum_capped=capped)

    def count_buckets(self, labels: Sequence[str]) -> int:
        return len(labels) or 1

    def report(self, metrics: dict[str, Any], labels: Sequence[str]) -> dict[str, Any]:
        """Adds ``perplexity`` (exp of the eval loss); without labels there is no accuracy nor majority."""
        out = dict(metrics)
        loss = out.get("eval_loss")
        out["perplexity"] = float(np.exp(min(loss, 50.0))) if isinstance(loss, (int, float)) else None
        if not labels:
            out["accuracy"] = None
            out["majority_baseline"] = None
        return out

    def export_meta(self, labels: Sequence[str]) -> dict[str, Any]:
        return {"labels": list(labels), "instruction": INSTRUCTION if labels else None}
