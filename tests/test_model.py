from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.config import config_from_dict
from fedlora.errors import ModelError
from fedlora.model import ModelSpec, get_runtime, resolve_model_path


def _spec(model: Path, **kw: object) -> ModelSpec:
    base = dict(source=str(model), max_length=32, task="sequence_classification", lora_rank=4, lora_alpha=8.0,
                lora_dropout=0.0, lora_targets=("query", "value"), lora_mode="standard")
    base.update(kw)
    return ModelSpec(**base)  # type: ignore[arg-type]


def test_lora_on_embeddings_is_refused(tiny_model: Path) -> None:
    with pytest.raises(ModelError, match="LoRA on embedding layers is not supported.*word_embeddings"):
        get_runtime(_spec(tiny_model, lora_targets=("word_embeddings",)), "cpu")


def test_targets_that_match_nothing_list_the_linear_layers(tiny_model: Path) -> None:
    with pytest.raises(ModelError, match=r"match no module.*query.*value"):
        get_runtime(_spec(tiny_model, lora_targets=("q_proj",)), "cpu")


def test_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a Hugging Face checkpoint folder"):
        resolve_model_path(str(tmp_path))


def test_cuda_requested_without_gpu_is_refused(tiny_model: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ModelError, match="CUDA is not available"):
        get_runtime(_spec(tiny_model), "cuda")


def test_initial_adapter_is_a_pure_function_of_seed_and_cohort(tiny_model: Path) -> None:
    rt = get_runtime(_spec(tiny_model), "cpu")
    a1, a2 = rt.initial_adapter(3, "finance", 3), rt.initial_adapter(3, "finance", 3)
    other = rt.initial_adapter(3, "medical", 3)
    assert a1.keys() == a2.keys()
    assert all(np.array_equal(a1[k], a2[k]) for k in a1)
    lora_a = [k for k in a1 if ".lora_A." in k]
    lora_b = [k for k in a1 if ".lora_B." in k]
    assert lora_a and lora_b and "classifier.weight" in a1
    assert all(not np.array_equal(a1[k], other[k]) for k in lora_a)
    assert all(np.all(a1[k] == 0) for k in lora_b)
    bound = 1 / np.sqrt(32)
    assert all(np.abs(a1[k]).max() <= bound for k in lora_a)


def test_frozen_a_sends_only_b_and_the_head(tiny_model: Path) -> None:
    rt = get_runtime(_spec(tiny_model, lora_mode="frozen_a"), "cpu")
    shapes = rt.adapter_shapes(4)
    assert not any(".lora_A." in k for k in shapes)
    assert any(".lora_B." in k for k in shapes) and "classifier.weight" in shapes
    state = rt.initial_adapter(0, "retail", 4)
    rt.load_adapter(state, 0, "retail", 4)
    full = rt.export_adapter(include_frozen=True)
    expected_a = rt.initial_adapter(0, "retail", 4, include_frozen=True)
    assert all(np.array_equal(full[k], expected_a[k]) for k in full if ".lora_A." in k)
    assert all(not p.requires_grad for k, p in rt.lora_params.items() if ".lora_A." in k)
    standard = get_runtime(_spec(tiny_model), "cpu").adapter_shapes(4)
    assert sum(np.prod(s) for s in shapes.values()) < sum(np.prod(s) for s in standard.values())


@pytest.mark.parametrize("mode", ["standard", "frozen_a"])
def test_saved_adapter_loads_with_peft_and_gives_the_same_logits(tiny_model: Path, tmp_path: Path, mode: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    rt = get_runtime(_spec(tiny_model, lora_mode=mode), "cpu")
    rng = np.random.default_rng(0)
    state = {k: (v + rng.normal(scale=0.05, size=v.shape)).astype(np.float32) for k, v in rt.initial_adapter(1, "finance", 3).items()}
    labels = ["negative", "neutral", "positive"]
    rt.save_peft(tmp_path / "adapter", state, 1, "finance", labels)
    rt.load_adapter(state, 1, "finance", 3)
    rt.peft_model.eval()
    batch = rt.tokenizer(["profit rose sharply", "shares fell"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = rt.peft_model(**batch).logits
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=3)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = loaded(**batch).logits
    rt.peft_model.train()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "adapter" / "fedlora.json").read_text().count("positive") >= 1


def test_model_spec_travels_as_flat_config(tiny_model: Path) -> None:
    cfg = config_from_dict({"model": {"source": str(tiny_model)}, "lora": {"target_modules": ["query"]}})
    spec = ModelSpec.from_config(cfg)
    assert ModelSpec.from_flat(spec.to_flat() | {"round": 3}) == spec
    with pytest.raises(ModelError, match="incomplete"):
        ModelSpec.from_flat({"model.source": "x"})
