"""Effective weights of PEFT LoRA layers, slice by slice, and PEFT names -> plain names."""

from __future__ import annotations

import copy

import pytest
import torch

from nn_core.errors import NNError
from nn_core.intervene.lora_views import effective_values, effective_weight, original_param_name
from nn_core.model.loading import load_model

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["mlp.down_proj", "q_proj"], "gpt2": ["mlp.c_proj", "attn.c_attn"]}


def _trained_peft(arch: str, *, lora_bias: bool = False):
    model, tok = load_model(f"tiny-{arch}")
    plain_names = [n for n, _ in model.named_parameters()]
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS[arch],
                          fan_in_fan_out=arch == "gpt2", bias="none", lora_bias=lora_bias)
    pm = peft.get_peft_model(model, cfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = tok(["hello world, this is nn", "another line of text!"], return_tensors="pt", padding=True)
    for _ in range(3):
        opt.zero_grad()
        pm(**ids, labels=ids["input_ids"]).loss.backward()
        opt.step()
    lora_b = [p for n, p in pm.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B moved off its zero init
    merged = copy.deepcopy(pm).merge_and_unload()
    return pm, merged, plain_names


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def trained(request):
    return request.param, *_trained_peft(request.param)


def test_original_param_name_maps_every_peft_name_to_a_plain_one(trained):
    _, pm, merged, plain_names = trained
    mapped = {original_param_name(n) for n, _ in pm.named_parameters()}
    assert mapped == set(plain_names) == {n for n, _ in merged.named_parameters()}
    assert original_param_name("base_model.model.model.layers.0.mlp.down_proj.base_layer.weight") \
        == "model.layers.0.mlp.down_proj.weight"
    assert original_param_name("base_model.model.model.layers.0.mlp.down_proj.lora_A.default.weight") \
        == "model.layers.0.mlp.down_proj.weight"
    assert original_param_name("base_model.model.transformer.h.1.mlp.c_proj.lora_B.other.bias") \
        == "transformer.h.1.mlp.c_proj.bias"
    assert original_param_name("base_model.model.lm_head.modules_to_save.default.weight") == "lm_head.weight"
    assert original_param_name("base_model.model.lm_head.original_module.weight") == "lm_head.weight"
    assert original_param_name("model.layers.0.mlp.down_proj.weight") == "model.layers.0.mlp.down_proj.weight"


def test_effective_weight_slices_equal_merge_and_unload(trained):
    arch, pm, merged, _ = trained
    ref = dict(merged.named_parameters())
    wrapped = [original_param_name(n) for n, _ in pm.named_parameters() if n.endswith("base_layer.weight")]
    assert len(wrapped) == 2 * len(TARGETS[arch])
    g = torch.Generator().manual_seed(1)
    for name in wrapped:
        w = ref[name].detach()
        rows = torch.randperm(w.shape[0], generator=g)[:5]
        cols = torch.randperm(w.shape[1], generator=g)[:7]
        mask = torch.rand(w.shape[0], generator=g) > 0.5
        torch.testing.assert_close(effective_weight(pm, name), w, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(effective_weight(pm, name, rows=rows), w[rows], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(effective_weight(pm, name, cols=cols), w[:, cols], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(effective_weight(pm, name, rows=rows, cols=cols), w[rows][:, cols],
                                   rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(effective_weight(pm, name, rows=mask), w[mask], rtol=1e-6, atol=1e-6)
        # the LoRA part matters: the frozen base alone is measurably different
        base = pm.get_base_model().get_submodule(name.rsplit(".", 1)[0]).base_layer.weight
        assert not torch.allclose(base[rows], w[rows], atol=1e-6)
        flat = torch.randint(0, w.numel(), (50,), generator=g)
        torch.testing.assert_close(effective_values(pm, name, flat), w.flatten()[flat], rtol=1e-6, atol=1e-6)
    # PEFT names are accepted too; a layer PEFT did not wrap reads through
    first = wrapped[0]
    peft_name = "base_model.model." + first.rsplit(".", 1)[0] + ".lora_A.default.weight"
    torch.testing.assert_close(effective_weight(pm, peft_name, rows=[0]), ref[first][[0]].detach(),
                               rtol=1e-6, atol=1e-6)
    other = next(n for n in ref if n not in wrapped and ref[n].dim() == 2)
    assert torch.equal(effective_weight(pm, other, rows=[1, 2]), ref[other][[1, 2]].detach())


def test_disabled_and_merged_adapters(trained):
    _, pm, merged, _ = trained
    name = next(original_param_name(n) for n, _ in pm.named_parameters() if n.endswith("base_layer.weight"))
    layer = pm.get_base_model().get_submodule(name.rsplit(".", 1)[0])
    w0 = layer.base_layer.weight.detach().clone()
    want = merged.get_parameter(name).detach()
    with pm.disable_adapter():
        assert torch.equal(effective_weight(pm, name, rows=[0, 3]), w0[[0, 3]])
    layer.merge()
    try:
        # merged into the base weight: not added a second time
        torch.testing.assert_close(effective_weight(pm, name, cols=[1]), want[:, [1]], rtol=1e-6, atol=1e-6)
        with pm.disable_adapter():  # PEFT unmerges before a disabled forward: the view agrees
            torch.testing.assert_close(effective_weight(pm, name, rows=[2]), w0[[2]], rtol=1e-5, atol=1e-6)
    finally:
        if layer.merged:
            layer.unmerge()


def test_lora_bias_on_conv1d():
    pm, merged, _ = _trained_peft("gpt2", lora_bias=True)
    name = "transformer.h.0.mlp.c_proj.bias"
    want = merged.get_parameter(name).detach()
    base = pm.get_base_model().get_submodule("transformer.h.0.mlp.c_proj").base_layer.bias
    assert not torch.allclose(base, want, atol=1e-6)
    torch.testing.assert_close(effective_weight(pm, name), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(effective_weight(pm, name, rows=[4, 9]), want[[4, 9]], rtol=1e-6, atol=1e-6)


def test_plain_model_and_errors(tiny_models):
    model, _ = tiny_models("llama")
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(effective_weight(model, name, cols=[5]), model.get_parameter(name)[:, [5]].detach())
    with pytest.raises(NNError, match="no module"):
        effective_weight(model, "model.nope.weight")
    with pytest.raises(NNError, match="not a parameter"):
        effective_weight(model, "model.layers.1.mlp.down_proj.scale")
    with pytest.raises(NNError, match="out of range"):
        effective_weight(model, name, rows=[64])
    with pytest.raises(NNError, match="1-D"):
        effective_weight(model, "model.norm.weight", cols=[0])
