from __future__ import annotations

import numpy as np
import pytest
import torch

from nn_core.data import Example
from nn_core.errors import NNError
from nn_core.model.adapters import get_adapter, model_signature
from nn_core.model.loading import load_model
from nn_core.train import SFTConfig, base_model
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


def test_resume_of_another_run_refused_and_mask_kept(tmp_path):
    model, tok = load_model("tiny-llama")
    t = templates_for(model)
    masked_finetune(model, tok, EXAMPLES, t, [0], cfg(tmp_path, method="lora", save_steps=1), mode="lesion")
    mask_before = (tmp_path / "mask.json").read_bytes()
    model, tok = load_model("tiny-llama")
    with pytest.raises(NNError, match=r"different run \(mode differ\): use a fresh --out or --no-resume"):
        masked_finetune(model, tok, EXAMPLES, t, [0], cfg(tmp_path, method="lora", save_steps=1), mode="preserve")
    # the failed run did not replace the mask that belongs to the adapter in the folder
    assert (tmp_path / "mask.json").read_bytes() == mask_before
    model, tok = load_model("tiny-llama")
    with pytest.raises(NNError, match="freeze_masked differ"):
        masked_finetune(model, tok, EXAMPLES, t, [0], cfg(tmp_path, method="lora", save_steps=1),
                        mode="lesion", freeze_masked=True)


def test_mask_json_written_only_after_a_successful_save(tmp_path, monkeypatch):
    import nn_core.io

    model, tok = load_model("tiny-llama")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(nn_core.io, "atomic_dir", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        masked_finetune(model, tok, EXAMPLES, templates_for(model), [0], cfg(tmp_path, method="lora"))
    assert not (tmp_path / "mask.json").exists()


def test_site_other_than_the_templates_names_both(tmp_path):
    model, tok = load_model("tiny-llama")
    with pytest.raises(NNError, match="site mlp_act, not site mlp_out"):
        masked_finetune(model, tok, EXAMPLES, templates_for(model), [0], cfg(tmp_path), site="mlp_out")
    assert not (tmp_path / "mask.json").exists()


def test_lora_masked_channels_get_zero_gradient(tmp_path):
    """No freeze, no weight decay: A[:, j] of a lesioned channel j never receives a gradient,
    so it stays bit-identical to its (random) initial value while other columns train."""
    from transformers import TrainerCallback

    initial = {}

    class Grab(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            for layer in range(2):
                a = get_adapter(base_model(model)).down_proj(layer).lora_A["default"].weight
                initial[layer] = a.detach().clone()

    model, tok = load_model("tiny-llama")
    res = masked_finetune(model, tok, EXAMPLES, templates_for(model), [0],
                          cfg(tmp_path, method="lora", weight_decay=0.0), mode="lesion", callbacks=[Grab()])
    for layer in range(2):
        a = get_adapter(base_model(res.model)).down_proj(layer).lora_A["default"].weight.detach()
        lesioned = torch.as_tensor(NET[layer])
        assert initial[layer][:, lesioned].abs().sum() > 0  # random init, not trivially zero
        assert torch.equal(a[:, lesioned], initial[layer][:, lesioned])
        others = channel_mask(128, layer, "lesion")
        assert not torch.equal(a[:, others], initial[layer][:, others])


def test_lora_freeze_on_gpt2_conv1d(tmp_path):
    """GPT-2's Conv1D (fan_in_fan_out): the merged delta, in the weight's (in, out) layout,
    is exactly zero on the rows of masked channels."""
    model, tok = load_model("tiny-gpt2")
    ad = get_adapter(model)
    dim = ad.neuron_dim()
    before = [ad.down_weight(i).detach().clone() for i in range(2)]
    res = masked_finetune(model, tok, EXAMPLES, templates_for(model), [0], cfg(tmp_path, method="lora"),
                          mode="preserve", freeze_masked=True)
    ad = get_adapter(base_model(res.model))
    for layer in range(2):
        mod = ad.down_proj(layer)
        delta = mod.get_delta_weight("default")
        assert delta.shape == before[layer].shape
        passes = channel_mask(128, layer, "preserve")
        masked = torch.nonzero(~passes).flatten()
        assert torch.equal(delta.index_select(dim, masked), torch.zeros_like(delta.index_select(dim, masked)))
        kept = torch.nonzero(passes).flatten()
        assert delta.index_select(dim, kept).abs().sum() > 0


def test_lora_preserve_freeze_leaves_layers_outside_the_templates_free(tmp_path):
    """Templates built on layer 0 only say nothing about layer 1: preserve + freeze must not
    zero or freeze layer 1's LoRA (it used to: every layer was looped over)."""
    model, tok = load_model("tiny-llama")
    t = Templates({**model_signature(model), "site": "mlp_act", "layers": [0]},
                  [Component(0, {0: NET[0]}, variance=0.1)])
    res = masked_finetune(model, tok, EXAMPLES, t, [0], cfg(tmp_path, method="lora"),
                          mode="preserve", freeze_masked=True)
    ad = get_adapter(base_model(res.model))
    d0 = ad.down_proj(0).get_delta_weight("default")
    outside0 = channel_mask(128, 0, "lesion")  # layer 0 channels outside the network
    assert torch.all(d0[:, outside0] == 0)  # covered layer: constrained
    d1 = ad.down_proj(1).get_delta_weight("default")
    # layer 1 is not covered: its LoRA trains on every channel
    assert (d1.abs().sum(0) > 0).all()
