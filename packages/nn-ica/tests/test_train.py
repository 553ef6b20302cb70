from __future__ import annotations

import numpy as np
import pytest
import torch

from nn_core.adapters import get_adapter
from nn_core.data import Example
from nn_core.models import load_model
from nn_core.sft import SFTConfig, base_model
from nn_core.sites import model_signature
from nn_ica.templates import Component, Templates
from nn_ica.train import masked_finetune

EXAMPLES = [Example(f"Add {i} and {i + 1}.", f"The sum is {2 * i + 1}.") for i in range(12)]
NET = {0: np.array([0, 3, 7, 50]), 1: np.array([10, 11])}


def templates_for(model):
    return Templates({**model_signature(model), "site": "mlp_act"}, [Component(0, NET, variance=0.1)])


def channel_mask(width: int, layer: int, mode: str) -> torch.Tensor:
    """True where a channel passes the forward mask."""
    sel = torch.zeros(width, dtype=torch.bool)
    sel[torch.as_tensor(NET[layer])] = True
    return ~sel if mode == "lesion" else sel


def cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=3, batch_size=4, learning_rate=5e-2,
                weight_decay=0.5, save_steps=100, logging_steps=1)
    return SFTConfig(**{**base, **kw})


@pytest.mark.parametrize("mode", ["lesion", "preserve"])
def test_lora_freeze_keeps_masked_slices_bit_identical(tmp_path, mode):
    model, tok = load_model("tiny-llama")
    before = [get_adapter(model).down_weight(i).detach().clone() for i in range(2)]
    res = masked_finetune(model, tok, EXAMPLES, templates_for(model), [0], cfg(tmp_path, method="lora"),
                          mode=mode, freeze_masked=True)
    ad = get_adapter(base_model(res.model))
    for layer in range(2):
        mod = ad.down_proj(layer)
        passes = channel_mask(128, layer, mode)
        delta = mod.get_delta_weight("default")  # (out, in) = scale * B @ A
        merged = mod.base_layer.weight + delta
        assert torch.equal(mod.base_layer.weight, before[layer])
        # masked channels: the merged weight column equals the original bit for bit
        assert torch.equal(merged[:, ~passes], before[layer][:, ~passes])
        if passes.any():
            assert not torch.equal(merged[:, passes], before[layer][:, passes])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "mask.json").is_file() and (tmp_path / "manifest.json").is_file()


def test_lora_without_freeze_changes_masked_columns(tmp_path):
    """Why --freeze-masked exists: zero gradient on A[:, j] does not keep ΔW[:, j] zero."""
    model, tok = load_model("tiny-llama")
    res = masked_finetune(model, tok, EXAMPLES, templates_for(model), [0], cfg(tmp_path, method="lora"),
                          mode="lesion", freeze_masked=False)
    mod = get_adapter(base_model(res.model)).down_proj(0)
    lesioned = torch.as_tensor(NET[0])
    assert mod.get_delta_weight("default")[:, lesioned].abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_down_proj_freeze_keeps_rows_bit_identical(tmp_path, arch):
    model, tok = load_model(f"tiny-{arch}")
    ad = get_adapter(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = masked_finetune(model, tok, EXAMPLES, templates_for(model), [0], cfg(tmp_path, method="full"),
                          mode="preserve", freeze_masked=True)
    after = dict(res.model.named_parameters())
    for layer in range(2):
        name = ad.down_weight_name(layer)
        w0, w1 = before[name], after[name].detach()
        passes = channel_mask(128, layer, "preserve")
        dim = ad.neuron_dim()
        frozen = w1.index_select(dim, torch.nonzero(~passes).flatten())
        assert torch.equal(frozen, w0.index_select(dim, torch.nonzero(~passes).flatten()))
        assert not torch.equal(w1.index_select(dim, torch.nonzero(passes).flatten()),
                               w0.index_select(dim, torch.nonzero(passes).flatten()))
    # only the down-projections train with method=full
    down = {ad.down_weight_name(i) for i in range(2)}
    for n, p in after.items():
        if n not in down:
            assert torch.equal(p.detach(), before[n]), n


def test_full_without_freeze_weight_decay_moves_masked_rows(tmp_path):
    model, tok = load_model("tiny-llama")
    name = get_adapter(model).down_weight_name(1)
    w0 = dict(model.named_parameters())[name].detach().clone()
    res = masked_finetune(model, tok, EXAMPLES, templates_for(model), [0], cfg(tmp_path, method="full"),
                          mode="preserve", freeze_masked=False)
    w1 = dict(res.model.named_parameters())[name].detach()
    masked = ~channel_mask(128, 1, "preserve")
    assert not torch.equal(w1[:, masked], w0[:, masked])  # zero gradient, but AdamW decay
