from __future__ import annotations

import pytest
import torch
from torch import nn

from nn_core.errors import NNError
from nn_core.intervene.hooks import hooked
from nn_core.model.adapters import ARCHITECTURES, get_adapter, model_signature
from nn_core.model.loading import TINY_ARCHS, load_model


def test_every_arch_resolves_with_right_widths(tiny_models, arch):
    model, _ = tiny_models(arch)
    ad = get_adapter(model)
    assert ad.source == "registry"
    assert ad.num_layers == 2
    assert ad.widths() == {"mlp_act": 128, "mlp_out": 64, "resid": 64}
    for i in range(ad.num_layers):
        w = ad.down_weight(i)
        # the seed rule: out == hidden, in > hidden; Conv1D stores (in, out)
        out_in = tuple(w.shape[::-1]) if ad.conv1d else tuple(w.shape)
        assert out_in == (64, 128)
        assert ad.down_proj_path(i).startswith(ad.layer_path(i))
    assert ad.conv1d == (arch == "gpt2")


def test_down_proj_names_per_architecture(tiny_models):
    names = {a: get_adapter(tiny_models(a)[0]).down_proj_name for a in TINY_ARCHS}
    assert names["gpt2"] == "c_proj"
    assert names["gpt_neox"] == "dense_4h_to_h"
    assert names["opt"] == "fc2"
    assert {names[a] for a in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")} == {"down_proj"}


def test_site_hooks_see_the_right_tensor(tiny_models, batch, arch):
    model, _ = tiny_models(arch)
    ad = get_adapter(model)
    seen = {}

    def grab(name):
        def fn(x):
            seen[name] = x.detach().clone()
        return fn

    b = batch(arch)
    with hooked(model, {(1, "mlp_act"): grab("act"), (1, "mlp_out"): grab("out"), (1, "resid"): grab("resid")}):
        with torch.no_grad():
            model(**b)
    assert seen["act"].shape[-1] == 128 and seen["out"].shape[-1] == 64 and seen["resid"].shape[-1] == 64
    # mlp_out is the down-projection applied to mlp_act
    down = ad.down_proj(1)
    with torch.no_grad():
        torch.testing.assert_close(down(seen["act"]), seen["out"])


def test_structural_fallback_finds_down_proj():
    ARCHITECTURES_backup = dict(ARCHITECTURES)
    try:
        ARCHITECTURES.pop("llama")
        fresh, _ = load_model("tiny-llama")
        ad = get_adapter(fresh)
        assert ad.source == "structural"
        assert ad.down_proj_path(0) == "model.layers.0.mlp.down_proj"
        assert ad.widths()["mlp_act"] == 128
    finally:
        ARCHITECTURES.clear()
        ARCHITECTURES.update(ARCHITECTURES_backup)


def test_unsupported_architecture_lists_supported_types():
    class Cfg:
        model_type = "mystery"
        hidden_size = 8
        num_hidden_layers = 1

    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = Cfg()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8))])

    with pytest.raises(NNError, match="supported types are .*llama"):
        get_adapter(Weird())


def test_layer_out_of_range_is_clear(tiny_models):
    ad = get_adapter(tiny_models("llama")[0])
    with pytest.raises(NNError, match=r"layer 5 is out of range: this model has layers 0\.\.1"):
        ad.down_proj(5)


def test_signature(tiny_models):
    sig = model_signature(tiny_models("qwen2")[0])
    assert sig == {"model_id": "tiny-qwen2", "model_type": "qwen2", "num_layers": 2,
                   "widths": {"mlp_act": 128, "mlp_out": 64, "resid": 64}}


def test_resid_is_the_block_output(tiny_models, batch, arch):
    model, _ = tiny_models(arch)
    b = batch(arch)
    seen = {}
    with hooked(model, {(0, "resid"): lambda x: seen.setdefault("r", x.clone())}), torch.no_grad():
        hidden = model(**b, output_hidden_states=True).hidden_states
    # hidden_states[0] is the embedding output, [i + 1] the output of block i
    torch.testing.assert_close(seen["r"], hidden[1])


def test_mlp_act_is_gate_times_up_computed_independently(tiny_models, batch):
    model, _ = tiny_models("llama")
    b = batch("llama")
    mlp = model.model.layers[1].mlp
    seen = {}
    grab = mlp.register_forward_hook(lambda m, a, o: seen.setdefault("in", a[0].clone()))
    try:
        with hooked(model, {(1, "mlp_act"): lambda x: seen.setdefault("act", x.clone())}), torch.no_grad():
            model(**b)
    finally:
        grab.remove()
    x = seen["in"]
    with torch.no_grad():
        expected = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    torch.testing.assert_close(seen["act"], expected)


def test_gpt2_mlp_act_is_activation_of_c_fc(tiny_models, batch):
    model, _ = tiny_models("gpt2")
    b = batch("gpt2")
    mlp = model.transformer.h[0].mlp
    seen = {}
    grab = mlp.register_forward_hook(lambda m, a, o: seen.setdefault("in", a[0].clone()))
    try:
        with hooked(model, {(0, "mlp_act"): lambda x: seen.setdefault("act", x.clone())}), torch.no_grad():
            model(**b)
    finally:
        grab.remove()
    with torch.no_grad():
        expected = mlp.act(mlp.c_fc(seen["in"]))
    torch.testing.assert_close(seen["act"], expected)
