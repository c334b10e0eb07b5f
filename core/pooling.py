"""Pooling for the classification head (``fedlora.tasks.classification``): one vector of the last hidden states.

For hidden states ``h`` (batch x T x d) and attention mask ``m`` (batch x T, 1 on real tokens,
right-padded), the pooled vector of example ``b`` is

* ``mean``: ``sum_t m[b,t] h[b,t] / sum_t m[b,t]`` (the masked mean; what sentence-embedding
  encoders such as all-MiniLM-L6-v2 were trained with),
* ``cls``:  ``h[b,0]`` (the first token's hidden state; no pooler layer),
* ``last``: ``h[b, sum_t m[b,t] - 1]`` (the last real token; what a decoder's state summarises),

and the logits are ``W dropout(pooled) + b_`` with ``W`` (k x d). ``auto`` chooses from the model
folder: sentence-transformers' ``1_Pooling/config.json`` when it ships one, else ``last`` for
decoder-only architectures (``...ForCausalLM``, ``...LMHeadModel``) and ``mean`` for encoders.

Why not ``AutoModelForSequenceClassification``: for BERT-family checkpoints it classifies the CLS
token through BERT's pooler, which for all-MiniLM-L6-v2 is nearly a constant (the spread between
examples is 0.80 against 3.55 for mean pooling; under DP-SGD its head learns the majority class).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ModelError

POOLING_MODES = ("auto", "mean", "cls", "last")
_DECODER_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def resolve_pooling(requested: str, model_dir: Path) -> str:
    """The concrete pooling (``mean``, ``cls`` or ``last``) for ``requested`` on the checkpoint at ``model_dir``."""
    if requested != "auto":
        if requested not in POOLING_MODES:
            raise ModelError(f"model.pooling {requested!r}: known modes are {', '.join(POOLING_MODES)}")
        return requested
    st = model_dir / "1_Pooling" / "config.json"
    if st.is_file():
        cfg = json.loads(st.read_text(encoding="utf-8"))
        if cfg.get("pooling_mode_cls_token"):
            return "cls"
        if cfg.get("pooling_mode_lasttoken"):
            return "last"
        return "mean"  # mean_tokens, and the mean-like modes we do not reproduce exactly (max, sqrt-len)
    config = model_dir / "config.json"
    arch = json.loads(config.read_text(encoding="utf-8")).get("architectures") or [] if config.is_file() else []
    return "last" if any(str(a).endswith(_DECODER_SUFFIXES) for a in arch) else "mean"


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """The pooled vector (batch x d) of ``hidden`` (batch x T x d) under ``mask`` (module docstring)."""
    if mode == "mean":
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        last = mask.long().sum(dim=1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ModelError(f"unknown pooling {mode!r}; known: mean, cls, last")
