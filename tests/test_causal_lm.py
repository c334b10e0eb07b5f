"""The causal-LM task: encoding and loss against transformers' own, data formats and their errors,
defaults, and federations end to end (clear, and DP with secure aggregation), then the adapter in
plain PEFT and ``fedlora generate``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import set_keys

from fedlora.config import config_from_dict
from fedlora.errors import DataError
from fedlora.model import ModelSpec, get_runtime
from fedlora.tasks import LabelledTexts, SiteColumns, get_task
from fedlora.tasks.causal_lm import predicted_label

LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def runtime(tiny_decoder: Path):
    spec = ModelSpec(str(tiny_decoder), 48, "causal_lm", 4, 8.0, 0.0, ("q_proj", "v_proj"), "standard")
    return get_runtime(spec, "cpu")


def _texts() -> LabelledTexts:
    return LabelledTexts(("Profit rose 20% in the quarter.", "The company held its annual general meeting in Helsinki today."),
                         np.array([2, 1], dtype=np.int64))


def test_loss_is_on_the_answer_only_and_matches_transformers_unpadded(runtime) -> None:
    task = runtime.task
    enc = task.encode(runtime.tokenizer, _texts(), LABELS, 48)
    for i, answer in enumerate(("positive", "neutral")):
        tail = runtime.tokenizer.decode(enc.input_ids[i][enc.prompt_lengths[i]:])
        assert tail.startswith(answer) and tail.endswith(runtime.tokenizer.eos_token)
        assert "assistant" in runtime.tokenizer.decode(enc.input_ids[i][: enc.prompt_lengths[i]])[-12:]
    runtime.load_adapter(runtime.initial_adapter(0, "finance", 3), 0, "finance", 3)
    runtime.model.eval()
    with torch.no_grad():
        batch = task.batch(enc, np.array([0, 1]), runtime.tokenizer.pad_token_id, runtime.device)  # left-padded, two lengths
        mine, _ = task.loss(runtime.model, batch, reduction="none")
        for i in range(2):
            ids = torch.tensor([enc.input_ids[i]])
            labels = ids.clone()
            labels[0, : enc.prompt_lengths[i]] = -100
            ref = float(runtime.model(input_ids=ids, labels=labels).loss)
            assert float(mine[i]) == pytest.approx(ref, rel=1e-4, abs=1e-4)
    runtime.model.train()


def test_truncation_keeps_the_answer_and_the_generation_prompt(runtime) -> None:
    long = LabelledTexts(("word " * 300,), np.array([0]))
    enc = runtime.task.encode(runtime.tokenizer, long, LABELS, 40)
    ids = enc.input_ids[0]
    assert len(ids) == 40
    assert runtime.tokenizer.decode(ids[enc.prompt_lengths[0]:]).startswith("negative")
    prompt = runtime.tokenizer.decode(ids[: enc.prompt_lengths[0]])
    assert prompt.rstrip().endswith("assistant") and "Answer with one of" in prompt


def test_only_lora_is_trainable_and_tied_embeddings_stay_frozen(runtime) -> None:
    runtime.load_adapter(runtime.initial_adapter(0, "finance", 3), 0, "finance", 3)
    trainable = {id(p) for p in runtime.trainable_parameters()}
    assert trainable == {id(p) for p in runtime.lora_params.values()}
    assert runtime.head_shapes(3) == {}
    emb = runtime.peft_model.get_input_embeddings().weight
    assert not emb.requires_grad and id(emb) not in trainable


def test_instruction_files_and_their_errors(tmp_path: Path) -> None:
    task = get_task("causal_lm")
    rows = [{"q": "What is 2+2?", "a": "4"}, {"q": "Capital of France?", "a": "Paris"}]
    jl = tmp_path / "qa.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data, labels = task.read(str(jl), SiteColumns(prompt="q", response="a"), None)
    assert labels == [] and data.responses == ("4", "Paris") and data.texts[0] == "What is 2+2?"
    chats = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    ch = tmp_path / "chat.jsonl"
    ch.write_text(json.dumps(chats[0]) + "\n")
    data, _ = task.read(str(ch), SiteColumns(messages="messages"), None)
    assert data.texts[0] == (("user", "hi"),) and data.responses == ("hello",)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: row 1, column 'messages': the last turn must be the assistant"):
        task.read(str(bad), SiteColumns(messages="messages"), None)
    empty = tmp_path / "empty.csv"
    empty.write_text("q,a\nhello,\n")
    with pytest.raises(DataError, match=r"empty\.csv: row 1: empty response: the example would be all prompt"):
        task.read(str(empty), SiteColumns(prompt="q", response="a"), None)
    with pytest.raises(DataError, match=r"no response column 'answer'"):
        task.read(str(jl), SiteColumns(prompt="q", response="answer"), None)


@pytest.mark.parametrize(("answer", "expected"), [("positive", 2), ("Positive.", 2), (" neutral\n", 1),
                                                  ("The sentiment is negative, not positive", 0), ("unsure", -1), ("positively", -1)])
def test_generated_answers_map_to_labels(answer: str, expected: int) -> None:
    assert predicted_label(answer, LABELS) == expected


def test_causal_lm_defaults_and_lora_targets_per_architecture(tiny_decoder: Path, tiny_model: Path) -> None:
    cfg = config_from_dict({"task": {"kind": "causal_lm"}})
    assert cfg.model.source == "packaged:SmolLM2-135M-Instruct" and cfg.lora.mode == "frozen_a" and cfg.privacy.dp
    assert config_from_dict({"task": {"kind": "causal_lm"}, "privacy": {"dp": False}}).lora.mode == "standard"
    dec = config_from_dict({"task": {"kind": "causal_lm"}, "model": {"source": str(tiny_decoder)}})
    assert ModelSpec.from_config(dec).lora_targets == ("q_proj", "v_proj")
    enc = config_from_dict({"model": {"source": str(tiny_model)}})
    assert ModelSpec.from_config(enc).lora_targets == ("query", "value")  # the classification default is unchanged
    with pytest.raises(Exception, match="lora.target_modules"):
        config_from_dict({"lora": {"target_modules": ["auto", "query"]}})


def test_quantization_is_refused_on_cpu(tiny_decoder: Path) -> None:
    from fedlora.errors import ModelError
    from fedlora.model import LoraRuntime

    spec = ModelSpec(str(tiny_decoder), 32, "causal_lm", 4, 8.0, 0.0, ("q_proj",), "standard", quantization="4bit")
    with pytest.raises(ModelError, match="4bit.*needs a CUDA device"):
        LoraRuntime(spec, torch.device("cpu"), torch.float32)


def _decoder_config(model: Path, out: Path, **over):
    data = {"seed": 3, "out": str(out), "task": {"kind": "causal_lm"},
            "model": {"source": str(model), "max_length": 48},
            "train": {"rounds": 2, "local_epochs": 0.0, "local_steps": 4, "batch_size": 8},
            "demo": {"examples_per_site": 32}, "cohorts": {"finance": {"sites": 3}}}
    return config_from_dict(set_keys(data, over))


def test_clear_federation_lowers_the_answer_loss_and_exports_a_peft_adapter(tiny_decoder: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from fedlora.simulation.runner import simulate

    cfg = _decoder_config(tiny_decoder, tmp_path / "run", privacy__dp=False, train__learning_rate=3e-3,
                          secure_aggregation__enabled=False)
    run_dir, summary = simulate(cfg, progress=False)
    c = summary["cohorts"]["finance"]
    assert summary["task"] == "causal_lm"
    assert c["eval_loss"] < 0.8 * json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["cohorts"]["finance"]["eval_loss"]
    assert c["perplexity"] == pytest.approx(float(np.exp(c["eval_loss"])))
    assert c["perplexity"] < c["initial_perplexity"]
    adapter = run_dir / "adapters" / "finance"
    meta = json.loads((adapter / "fedlora.json").read_text())
    assert meta["task"] == "causal_lm" and meta["labels"] == ["negative", "neutral", "positive"]
    assert not (adapter / "head.safetensors").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_decoder)), str(adapter)).eval()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b)  # the exported adapter carries the trained B
    # plain PEFT reproduces fedlora's own answer loss on one example (same model, same adapter)
    rt = get_runtime(ModelSpec.from_config(cfg), "cpu")
    enc = rt.task.encode(rt.tokenizer, _texts(), LABELS, 48)
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    rt.load_adapter(state, cfg.seed, "finance", 3)
    rt.model.eval()
    ids = torch.tensor([enc.input_ids[0]])
    labels = ids.clone()
    labels[0, : enc.prompt_lengths[0]] = -100
    with torch.no_grad():
        ours = float(rt.model(input_ids=ids, labels=labels).loss)
        theirs = float(model(input_ids=ids, labels=labels).loss)
        out = model.generate(input_ids=ids[:, : enc.prompt_lengths[0]], max_new_tokens=3, do_sample=False)
    rt.model.train()
    assert theirs == pytest.approx(ours, rel=1e-5)
    assert out.shape[1] == enc.prompt_lengths[0] + 3 or int(out[0, -1]) == rt.tokenizer.eos_token_id


def test_dp_and_secure_aggregation_on_the_causal_lm_task_then_generate(tiny_decoder: Path, tmp_path: Path, capsys) -> None:
    from fedlora.cli import main
    from fedlora.simulation.runner import simulate

    cfg = _decoder_config(tiny_decoder, tmp_path / "run", privacy__epsilon=4.0)
    assert cfg.privacy.dp and cfg.secure_aggregation.enabled and cfg.lora.mode == "frozen_a"
    run_dir, summary = simulate(cfg, progress=False)
    c = summary["cohorts"]["finance"]
    assert c["secure_aggregation"] is True
    # the sites kept their eval metrics (the DP default); the harness, which runs every site, reads them back
    assert c["eval_loss"] is not None and c["perplexity"] == pytest.approx(float(np.exp(c["eval_loss"])))
    assert "sites' own records" in c["metrics_source"]
    sites = summary["privacy"]["sites"]
    assert len(sites) == 3
    for s in sites.values():
        assert 0 < s["epsilon"] <= 4.0
    assert main(["generate", str(run_dir / "adapters" / "finance"), "--prompt", "Profit rose sharply.", "--max-new-tokens", "4",
                 "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt"] == "Profit rose sharply." and isinstance(line["answer"], str)


def test_prompt_response_data_reports_perplexity_without_accuracy(tiny_decoder: Path, tmp_path: Path) -> None:
    from fedlora.simulation.runner import simulate

    rows = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(40)]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = _decoder_config(tiny_decoder, tmp_path / "run", privacy__dp=False, train__rounds=1, secure_aggregation__allow_clear=True,
                          cohorts={"finance": {"sites": 2, "data": str(path), "prompt_column": "question", "response_column": "answer"}})
    _, summary = simulate(cfg, progress=False)
    c = summary["cohorts"]["finance"]
    assert c["accuracy"] is None and c["majority_baseline"] is None and c["labels"] == []
    assert c["perplexity"] is not None and c["perplexity"] > 1.0
    with pytest.raises(Exception, match="splits by class"):
        from fedlora.simulation.runner import plan_sites

        plan_sites(_decoder_config(tiny_decoder, tmp_path / "r2", partition={"kind": "dirichlet"},
                                   cohorts={"finance": {"sites": 2, "data": str(path), "prompt_column": "question",
                                                        "response_column": "answer"}}))


def test_dp_sgd_on_decoder_lora_clips_per_example_and_ghost_matches_hooks(runtime) -> None:
    """Opacus on the decoder's LoRA (hooks and ghost clipping): full batch, no noise, SGD lr 1, so the
    step is the mean of clipped per-example gradients (norm <= C) and both modes give the same step."""
    from fedlora.client.dp_trainer import DpSgdSettings, train_local_dp
    from fedlora.client.trainer import LocalTrainSettings
    from fedlora.privacy.randomness import RoundSeeds

    texts = LabelledTexts(tuple(f"Quarterly sales rose {i} percent." for i in range(6)), np.array([2, 1, 0, 2, 1, 0]))
    enc = runtime.task.encode(runtime.tokenizer, texts, LABELS, 48)
    state = runtime.initial_adapter(0, "finance", 3)
    settings = LocalTrainSettings(local_steps=1, local_epochs=0.0, batch_size=6, optimizer="sgd", learning_rate=1.0,
                                  weight_decay=0.0, max_grad_norm=0.0)
    dp = DpSgdSettings(noise_multiplier=0.0, max_grad_norm=1e-3, sample_rate=1.0)
    deltas = {}
    for mode in ("hooks", "ghost"):
        res, _ = train_local_dp(runtime, state, enc, settings, dp, seed=0, site="bank-1", cohort="finance", num_labels=3,
                                round_=1, seeds=RoundSeeds.reproducible(0, "bank-1", 1), grad_sample_mode=mode)
        norm = float(np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in res.delta.values())))
        assert 0 < norm <= 1e-3 * (1 + 1e-4)
        deltas[mode] = res.delta
    for k in deltas["hooks"]:
        np.testing.assert_allclose(deltas["ghost"][k], deltas["hooks"][k], rtol=1e-3, atol=1e-8)
