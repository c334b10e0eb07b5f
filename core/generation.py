"""Use a causal-LM cohort's exported adapter (``RUN_DIR/adapters/<cohort>``) without the federation.

The folder holds a PEFT LoRA adapter (task ``CAUSAL_LM``) and ``fedlora.json`` (the base model the
run used, its labels and instruction for label-answer data). The README's recipe as a function::

    base  = AutoModelForCausalLM.from_pretrained(base_dir, gguf_file=...)   # gguf_file: packaged SmolLM2 only
    model = PeftModel.from_pretrained(base, adapter_dir)
    ids   = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    out   = model.generate(ids, max_new_tokens=..., do_sample=False)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelError
from .tasks.causal_lm import label_prompt, predicted_label, prompt_ids


@dataclass
class ExportedGenerator:
    model: Any  # PeftModel over AutoModelForCausalLM, eval mode
    tokenizer: Any
    labels: list[str]  # label-answer adapters: the labels it answers with ([] otherwise)

    def prompt_text(self, text: str, as_is: bool = False) -> str:
        """What the adapter was trained to answer: label-answer adapters wrap ``text`` in the
        run's instruction (``causal_lm.INSTRUCTION``) unless ``as_is``."""
        return text if as_is or not self.labels else label_prompt(text, self.labels)

    @torch.no_grad()
    def answer(self, prompts: Sequence[str], max_new_tokens: int = 64, as_is: bool = False) -> list[str]:
        """Greedy answers, one per prompt (one at a time: no padding effects)."""
        out = []
        for text in prompts:
            ids = torch.tensor([prompt_ids(self.tokenizer, self.prompt_text(text, as_is))], dtype=torch.long)
            gen = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
            out.append(self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
        return out

    def label_of(self, answer: str) -> str | None:
        """The label a label-answer adapter's answer names (``causal_lm.predicted_label``), or None."""
        i = predicted_label(answer, self.labels) if self.labels else -1
        return self.labels[i] if i >= 0 else None


def load_generator(adapter_dir: str | Path, base_model: str | None = None) -> ExportedGenerator:
    """The exported adapter on its base model (``base_model``: override the folder or packaged name the
    run recorded), in eval mode on CPU."""
    import transformers
    from peft import PeftModel

    from .model import model_files, quiet_progress

    d = Path(adapter_dir)
    meta_path = d / "fedlora.json"
    if not meta_path.is_file() or not (d / "adapter_config.json").is_file():
        raise ModelError(f"{d} is not a fedlora adapter folder (no fedlora.json / adapter_config.json)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("task") != "causal_lm":
        raise ModelError(f"{d} is a {meta.get('task')} adapter; fedlora generate needs a causal_lm one (classifiers: "
                         "fedlora.inference.load_classifier)")
    path, gguf = model_files(base_model or meta["base_model"])
    extra = {"gguf_file": gguf} if gguf else {}
    transformers.logging.set_verbosity_error()
    with quiet_progress():
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), **extra)
        base = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **extra)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = PeftModel.from_pretrained(base, str(d)).eval()
    return ExportedGenerator(model=model, tokenizer=tokenizer, labels=list(meta.get("labels") or []))
