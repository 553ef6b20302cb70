from __future__ import annotations

import pytest
import torch

from nn_core.errors import NNError
from nn_core.intervene.hooks import hooked
from nn_core.intervene.masks import WeightMask, down_proj_weight_mask, mask_neurons
from nn_core.model.adapters import get_adapter
from nn_core.select.neuronset import NeuronSet


def _logits(model, b):
    with torch.no_grad():
        return model(**b).logits


def _all_of(model, site):
    ad = get_adapter(model)
    return NeuronSet.for_model(model, {(i, site): range(ad.width(site)) for i in range(ad.num_layers)})


@pytest.mark.parametrize("site", ["mlp_act", "mlp_out", "resid"])
def test_identity_masks_are_bit_identical(tiny_models, batch, arch, site):
    model, _ = tiny_models(arch)
    b = batch(arch)
    base = _logits(model, b)
    with mask_neurons(model, _all_of(model, site), "preserve"):
        assert torch.equal(_logits(model, b), base)
    nothing = NeuronSet.for_model(model, {}, sites=[site])
    with mask_neurons(model, nothing, "lesion"):
        assert torch.equal(_logits(model, b), base)
    assert torch.equal(_logits(model, b), base)


def test_lesion_equals_preserve_of_complement(tiny_models, batch, arch):
    model, _ = tiny_models(arch)
    b = batch(arch)
    ns = NeuronSet.for_model(model, {(0, "mlp_act"): [0, 5, 77], (1, "mlp_act"): range(0, 128, 3)})
    with mask_neurons(model, ns, "lesion"):
        lesioned = _logits(model, b)
    with mask_neurons(model, ns.complement(), "preserve"):
        preserved = _logits(model, b)
    assert torch.equal(lesioned, preserved)
    assert not torch.equal(lesioned, _logits(model, b))


def test_preserve_zeroes_layers_without_selection(tiny_models, batch):
    model, _ = tiny_models("llama")
    b = batch("llama")
    ns = NeuronSet.for_model(model, {(0, "mlp_act"): [1, 2]})
    seen = {}
    with mask_neurons(model, ns, "preserve"), hooked(model, {(1, "mlp_out"): lambda x: seen.setdefault("out", x.clone())}):
        _logits(model, b)
    # layer 1 has no selected channel: its whole MLP input is zero, so its output is the bias (none) = 0
    assert torch.count_nonzero(seen["out"]) == 0


def test_gpt2_mlp_out_channel_mask_zeroes_that_channel(tiny_models, batch):
    model, _ = tiny_models("gpt2")
    b = batch("gpt2")
    seen = {}
    ns = NeuronSet.for_model(model, {(1, "mlp_out"): [7]})
    with mask_neurons(model, ns, "lesion"):
        mlp = get_adapter(model).layer(1).mlp
        h = mlp.register_forward_hook(lambda m, a, o: seen.setdefault("mlp", o.clone()))
        try:
            _logits(model, b)
        finally:
            h.remove()
    out = seen["mlp"]
    assert torch.count_nonzero(out[..., 7]) == 0
    assert torch.count_nonzero(out[..., 6]) > 0


def test_mask_handle_attach_remove_and_no_leak(tiny_models, batch):
    model, _ = tiny_models("qwen3")
    b = batch("qwen3")
    base = _logits(model, b)
    ns = NeuronSet.for_model(model, {(0, "mlp_act"): range(40)})
    handle = mask_neurons(model, ns, "lesion")
    assert not handle.attached
    assert torch.equal(_logits(model, b), base)  # nothing registered before attach
    handle.attach()
    changed = _logits(model, b)
    assert not torch.equal(changed, base)
    handle.remove()
    assert torch.equal(_logits(model, b), base)
    with pytest.raises(RuntimeError), handle:
        assert torch.equal(_logits(model, b), changed)
        raise RuntimeError
    assert torch.equal(_logits(model, b), base)


def test_mask_validates_selection(tiny_models):
    model, _ = tiny_models("llama")
    other, _ = tiny_models("gpt_neox")
    ns = NeuronSet.for_model(other, {(0, "mlp_act"): [1]})
    with pytest.raises(NNError, match="made for"):
        mask_neurons(model, ns, "lesion")
    bad = NeuronSet({(5, "mlp_act"): [1]})
    with pytest.raises(NNError, match="out of range"):
        mask_neurons(model, bad, "lesion")
    with pytest.raises(NNError, match="lesion or preserve"):
        mask_neurons(model, NeuronSet.for_model(model, {}), "keep")


def test_masked_channels_get_zero_gradient(tiny_models, batch):
    model, _ = tiny_models("llama")
    b = batch("llama")
    ns = NeuronSet.for_model(model, {(0, "mlp_act"): [3, 4]})
    w = get_adapter(model).down_weight(0)
    model.zero_grad()
    with mask_neurons(model, ns, "lesion"):
        model(**b, labels=b["input_ids"]).loss.backward()
    assert torch.count_nonzero(w.grad[:, [3, 4]]) == 0
    assert torch.count_nonzero(w.grad[:, 5]) > 0
    model.zero_grad()


@pytest.mark.parametrize("arch_name", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["preserve", "lesion"])
def test_weight_mask_survives_adamw_weight_decay(arch_name, mode):
    from nn_core.model.loading import load_model

    model, tok = load_model(f"tiny-{arch_name}")
    model.train()
    b = dict(tok(["some training text", "more"], return_tensors="pt", padding=True))
    ns = NeuronSet.for_model(model, {(0, "mlp_act"): [1, 2, 3], (1, "mlp_out"): [4]})
    ad = get_adapter(model)
    before = [ad.down_weight(i).detach().clone() for i in range(2)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    wm = down_proj_weight_mask(model, ns, mode).attach(opt)
    for _ in range(5):
        opt.zero_grad()
        model(**b, labels=b["input_ids"]).loss.backward()
        opt.step()
    wm.remove()
    for layer in range(2):
        sel = torch.zeros_like(before[layer], dtype=torch.bool)
        act_dim = 0 if arch_name == "gpt2" else 1  # Conv1D stores (in, out); Linear (out, in)
        if layer == 0:
            sel.index_fill_(act_dim, torch.tensor([1, 2, 3]), True)
        else:
            sel.index_fill_(1 - act_dim, torch.tensor([4]), True)
        trainable = sel if mode == "preserve" else ~sel
        after = ad.down_weight(layer).detach()
        assert torch.equal(after[~trainable], before[layer][~trainable])
        assert not torch.equal(after[trainable], before[layer][trainable])


def test_weight_mask_rejects_wrong_shape(tiny_models):
    model, _ = tiny_models("llama")
    name = get_adapter(model).down_weight_name(0)
    with pytest.raises(NNError, match="shape"):
        WeightMask(model, {name: torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(NNError, match="no parameter"):
        WeightMask(model, {"nope.weight": torch.ones(3, dtype=torch.bool)})


def test_lesion_of_an_inf_channel_gives_zero_not_nan(tiny_models, batch):
    model, _ = tiny_models("llama")
    b = batch("llama")
    ns = NeuronSet.for_model(model, {(0, "mlp_act"): [5]})

    def blow_up(x):
        x = x.clone()
        x[..., 5] = float("inf")
        return x

    with hooked(model, {(0, "mlp_act"): blow_up}):  # registered first, runs before the mask
        with mask_neurons(model, ns, "lesion"):
            out = _logits(model, b)
    assert torch.isfinite(out).all()


def test_negative_layer_is_rejected():
    with pytest.raises(NNError, match="layers count from 0"):
        NeuronSet({(-1, "mlp_act"): [1]})
    with pytest.raises(NNError, match="layers count from 0"):
        NeuronSet.from_dict({"format": "nn.neuronset/1", "neurons": {"-1.mlp_act": [1]}, "meta": {}})


@pytest.mark.parametrize("bad", [{"neurons": [1, 2]}, {"neurons": {"0.mlp_act": ["a"]}}, {"meta": [1]}])
def test_malformed_neuronset_file_is_one_line_error(bad):
    obj = {"format": "nn.neuronset/1", "neurons": {}, "meta": {}, **bad}
    with pytest.raises(NNError, match="malformed NeuronSet"):
        NeuronSet.from_dict(obj)


def test_preserve_only_touches_covered_layers(tiny_models, batch):
    model, _ = tiny_models("llama")
    b = batch("llama")
    seen = {}
    ns = NeuronSet.for_model(model, {(0, "mlp_act"): [1, 2]}, layers=[0])
    assert ns.covered_layers(2) == [0]
    with mask_neurons(model, ns, "preserve"), \
            hooked(model, {(1, "mlp_act"): lambda x: seen.setdefault("l1", x.clone())}):
        _logits(model, b)
    with hooked(model, {(1, "mlp_act"): lambda x: seen.setdefault("plain", x.clone())}):
        _logits(model, b)
    # layer 1 is outside meta["layers"]: its activations pass (they change only through layer 0)
    assert torch.count_nonzero(seen["l1"]) > 0
    full = NeuronSet.for_model(model, {(0, "mlp_act"): [1, 2]})
    seen.clear()
    with mask_neurons(model, full, "preserve"), \
            hooked(model, {(1, "mlp_out"): lambda x: seen.setdefault("out", x.clone())}):
        _logits(model, b)
    assert torch.count_nonzero(seen["out"]) == 0


def test_covered_layers_must_contain_the_neurons():
    with pytest.raises(NNError, match="outside meta"):
        NeuronSet({(1, "mlp_act"): [3]}, {"layers": [0]})


def test_algebra_keeps_covered_layers(tiny_models):
    model, _ = tiny_models("llama")
    a = NeuronSet.for_model(model, {(0, "mlp_act"): [1]}, layers=[0])
    b = NeuronSet.for_model(model, {(1, "mlp_act"): [2]}, layers=[1])
    assert (a | b).meta["layers"] == [0, 1]
    assert "layers" not in (a | NeuronSet.for_model(model, {(1, "mlp_act"): [2]})).meta
    assert a.complement().layer_counts("mlp_act") == {0: 127}
