"""``fedlora generate ADAPTER_DIR --prompt TEXT`` (or ``--input FILE``): answers from a causal-LM adapter."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import ConfigError


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="answer prompts with a causal-LM cohort's adapter (RUN_DIR/adapters/<cohort>)",
                       description="Load the run's base model with the cohort's LoRA adapter and answer greedily. For adapters "
                                   "trained on label-answer data the prompt is wrapped in the run's instruction (--as-is: not).")
    g.add_argument("adapter", metavar="ADAPTER_DIR")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--input", metavar="FILE", help="a text file, one prompt per line")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--base-model", help="the base model (default: the one the run recorded in fedlora.json)")
    g.add_argument("--as-is", action="store_true", help="send the prompt as given (no instruction around it)")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt: prompt, answer, label")


def cmd_generate(args: argparse.Namespace) -> int:
    from .generation import load_generator

    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens", args.max_new_tokens, "must be at least 1")
    if args.input:
        p = Path(args.input)
        if not p.is_file():
            raise ConfigError("--input", args.input, "file not found")
        prompts = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ConfigError("--input", args.input, "holds no prompt (one per line)")
    else:
        prompts = list(args.prompt)
    gen = load_generator(args.adapter, args.base_model)
    for prompt, answer in zip(prompts, gen.answer(prompts, args.max_new_tokens, as_is=args.as_is)):
        if args.json:
            print(json.dumps({"prompt": prompt, "answer": answer, "label": gen.label_of(answer)}, ensure_ascii=False))
        else:
            print(answer)
    return 0
