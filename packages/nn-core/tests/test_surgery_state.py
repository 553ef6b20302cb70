"""Split layers save and load as the plain module; saved LoKI splits re-apply on load;
nn_core.train's full method trains only split slices."""

from __future__ import annotations

import pytest
import torch

from nn_core.errors import NNError
from nn_core.intervene.surgery import (
    LOKI_FORMAT,
    SplitLinear,
    apply_loki_config,
    check_loki_positions,
    split_down_proj,
    split_modules,
    train_only_splits,
)
from nn_core.model.adapters import get_adapter
from nn_core.model.loading import load_model
from nn_core.train import SFTConfig, prepare_model


@pytest.mark.parametrize("arch_name", ["llama", "gpt2"])
def test_state_dict_is_the_plain_modules(arch_name):
    model, _ = load_model(f"tiny-{arch_name}")
    sd0 = {k: v.clone() for k, v in model.state_dict().items()}
    split_down_proj(model, [[1, 5], [0, 63]], by="rows")
    sd = model.state_dict()
    assert list(sd) == list(sd0)
    assert all(torch.equal(sd[k], sd0[k]) for k in sd0)
    # a plain state dict with other values loads into the split layers, trainable slice in place
    mod = get_adapter(model).down_proj(0)
    param = mod.trainable
    name = get_adapter(model).down_weight_name(0)
    new = {k: v.clone() for k, v in sd0.items()}
    new[name] = torch.randn_like(new[name])
    model.load_state_dict(new)
    assert mod.trainable is param
    assert torch.equal(mod.weight, new[name])
    rows = torch.tensor([1, 5])
    assert torch.equal(param.detach(), new[name].index_select(mod.dim, rows))
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict({**new, name: torch.zeros(3, 3)})
    with pytest.raises(RuntimeError, match="Unexpected"):
        model.load_state_dict({**new, name.replace("weight", "trainable"): torch.zeros(1)})


def test_saved_loki_config_resplits_on_load(tmp_path):
    model, tok = load_model("tiny-gpt2")
    split_down_proj(model, [[2, 3], [7]], by="rows")
    model.config.loki_format = LOKI_FORMAT
    model.config.target_pos = [[2, 3], [7]]
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path), device="cpu", dtype="float32")
    splits = split_modules(loaded)
    assert [m.index.tolist() for m in splits.values()] == [[2, 3], [7]]
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable == ["transformer.h.0.mlp.c_proj.trainable", "transformer.h.0.mlp.c_proj.bias_trainable",
                         "transformer.h.1.mlp.c_proj.trainable", "transformer.h.1.mlp.c_proj.bias_trainable"]
    b = tok(["hello there"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**b).logits, model(**b).logits)
    # the folder is a plain HF folder: transformers alone loads it unsplit
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not split_modules(plain)
    assert apply_loki_config(plain) and split_modules(plain)


def test_apply_loki_config_refuses_bad_configs():
    model, _ = load_model("tiny-llama")
    assert apply_loki_config(model) == {}
    model.config.loki_format = "nn.loki/9"
    with pytest.raises(NNError, match="nn.loki/1"):
        apply_loki_config(model)
    model.config.loki_format = LOKI_FORMAT
    model.config.target_pos = [[1]]
    with pytest.raises(NNError, match="cover 1 layers but the model has 2"):
        apply_loki_config(model)
    assert not split_modules(model)


@pytest.mark.parametrize("positions, match", [
    ([[0, 64], []], "out of range 0..63"),
    ([[3, 3], []], "index 3 twice"),
    ([[1]], "cover 1 layers"),
    ([[1.5], []], "non-integer"),
    ("[[1]]", "one list of channel indices per layer"),
])
def test_check_loki_positions(positions, match):
    with pytest.raises(NNError, match=match):
        check_loki_positions(positions, 2, 64)
    assert check_loki_positions([[5, 1], []], 2, 64) == [[1, 5], []]


def test_prepare_model_full_trains_only_split_slices():
    model, _ = load_model("tiny-llama")
    split_down_proj(model, [[1, 2], [3]], by="rows")
    prepared = prepare_model(model, SFTConfig(method="full"))
    names = [n for n, p in prepared.named_parameters() if p.requires_grad]
    assert names == ["model.layers.0.mlp.down_proj.trainable", "model.layers.1.mlp.down_proj.trainable"]
    assert train_only_splits(model) == 3 * 128
    # a split layer can be named as a trainable module
    prepare_model(model, SFTConfig(method="full", trainable_modules=["layers.1.mlp.down_proj"]))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.layers.1.mlp.down_proj.trainable"]
    with pytest.raises(NNError, match="split layers"):
        prepare_model(model, SFTConfig(method="lora"))
    assert isinstance(get_adapter(model).down_proj(0), SplitLinear)
