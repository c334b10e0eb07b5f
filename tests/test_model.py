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


@pytest.mark.parametrize("mode,pooling", [("standard", "mean"), ("frozen_a", "mean"), ("standard", "cls")])
def test_saved_adapter_loads_with_peft_and_gives_the_same_logits(tiny_model: Path, tmp_path: Path, mode: str, pooling: str) -> None:
    """The README's recipe (PeftModel on AutoModel, the head file, the pooling formula) reproduces fedlora's logits."""
    import json

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    from fedlora.inference import load_classifier

    rt = get_runtime(_spec(tiny_model, lora_mode=mode, pooling=pooling), "cpu")
    rng = np.random.default_rng(0)
    state = {k: (v + rng.normal(scale=0.05, size=v.shape)).astype(np.float32) for k, v in rt.initial_adapter(1, "finance", 3).items()}
    labels = ["negative", "neutral", "positive"]
    out = tmp_path / "adapter"
    rt.save_peft(out, state, 1, "finance", labels)
    rt.load_adapter(state, 1, "finance", 3)
    rt.model.eval()
    texts = ["profit rose sharply in the third quarter", "shares fell"]  # different lengths: padding must not count
    batch = rt.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = rt.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rt.model.train()
    meta = json.loads((out / "fedlora.json").read_text())
    assert meta["pooling"] == pooling and meta["labels"] == labels
    body = PeftModel.from_pretrained(AutoModel.from_pretrained(str(tiny_model)), str(out)).eval()
    head = load_file(str(out / "head.safetensors"))
    with torch.no_grad():
        h = body(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (h * m).sum(1) / m.sum(1) if pooling == "mean" else h[:, 0]
    theirs = pooled @ head["classifier.weight"].T + head["classifier.bias"]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, load_classifier(out).logits(texts), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours[0], ours[1])  # a head on the example, not a constant


def test_mean_pooling_is_the_masked_mean_computed_by_hand() -> None:
    from fedlora.pooling import pool

    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    by_hand = torch.stack([h[0].mean(0), h[1, :2].mean(0), h[2, 0]])
    torch.testing.assert_close(pool(h, mask, "mean"), by_hand)
    torch.testing.assert_close(pool(h, mask, "last"), torch.stack([h[0, 4], h[1, 1], h[2, 0]]))
    torch.testing.assert_close(pool(h, mask, "cls"), h[:, 0])
    h2 = h.clone()
    h2[1, 2:] = 1e6  # what sits under padding never reaches the pooled vector
    torch.testing.assert_close(pool(h2, mask, "mean"), by_hand)
    torch.testing.assert_close(pool(h2, mask, "last"), pool(h, mask, "last"))


def test_auto_pooling_reads_the_model_folder(tmp_path: Path, tiny_model: Path) -> None:
    import json

    from fedlora.pooling import resolve_pooling

    assert resolve_pooling("auto", resolve_model_path("packaged:all-MiniLM-L6-v2")) == "mean"  # its 1_Pooling/config.json
    assert resolve_pooling("auto", tiny_model) == "mean"  # an encoder without a pooling config
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert resolve_pooling("auto", tmp_path) == "last"
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert resolve_pooling("auto", tmp_path) == "cls"
    assert resolve_pooling("mean", tmp_path) == "mean"


def test_model_spec_travels_as_flat_config(tiny_model: Path) -> None:
    cfg = config_from_dict({"model": {"source": str(tiny_model)}, "lora": {"target_modules": ["query"]}})
    spec = ModelSpec.from_config(cfg)
    assert ModelSpec.from_flat(spec.to_flat() | {"round": 3}) == spec
    with pytest.raises(ModelError, match="incomplete"):
        ModelSpec.from_flat({"model.source": "x"})


def test_probe_mode_trains_and_sends_only_the_head(tiny_model: Path, tmp_path: Path) -> None:
    """``lora.mode = "probe"``: a linear probe of the pooled features; LoRA stays at its start (B = 0)."""
    from fedlora.inference import load_classifier

    rt = get_runtime(_spec(tiny_model, lora_mode="probe"), "cpu")
    assert set(rt.adapter_shapes(3)) == {"classifier.weight", "classifier.bias"}
    state = {k: v + 0.1 for k, v in rt.initial_adapter(0, "retail", 3).items()}
    rt.load_adapter(state, 0, "retail", 3)
    assert all(not p.requires_grad for p in rt.lora_params.values())
    assert [id(p) for p in rt.trainable_parameters()] == [id(p) for p in rt.model.classifier.parameters()]
    rt.save_peft(tmp_path / "a", state, 0, "retail", ["a", "b", "c"])
    rt.model.eval()
    batch = rt.tokenizer(["a short review", "another one, longer than the first"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = rt.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rt.model.train()
    torch.testing.assert_close(ours, load_classifier(tmp_path / "a").logits(["a short review", "another one, longer than the first"]),
                               rtol=1e-5, atol=1e-5)
