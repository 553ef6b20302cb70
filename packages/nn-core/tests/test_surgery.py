"""Split Linear / Conv1D layers into trainable rows or columns and a frozen rest."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from nn_core import capture
from nn_core.errors import NNError
from nn_core.intervene.masks import mask_neurons
from nn_core.intervene.surgery import (
    SplitLinear,
    merge,
    merge_all,
    split_down_proj,
    split_linear,
    split_modules,
)
from nn_core.model.adapters import get_adapter, is_conv1d, linear_in_out
from nn_core.model.loading import load_model
from nn_core.select.neuronset import NeuronSet

N_IN, N_OUT = 12, 8


def _layer(kind: str, bias: bool) -> nn.Module:
    if kind == "linear":
        return nn.Linear(N_IN, N_OUT, bias=bias)
    layer = Conv1D(N_OUT, N_IN)  # Conv1D(nf=out, nx=in), weight stored (in, out)
    with torch.no_grad():
        layer.bias.normal_()
    return layer


def _split(kind, bias, split, idx):
    holder = nn.Sequential(_layer(kind, bias))
    original = copy.deepcopy(holder[0])
    mod = split_linear(holder, "0", **{split: idx})
    return holder, original, mod


CASES = [("linear", True), ("linear", False), ("conv1d", True)]


@pytest.mark.parametrize("kind,bias", CASES)
@pytest.mark.parametrize("split", ["rows", "cols"])
@pytest.mark.parametrize("shape", [(5, N_IN), (2, 5, N_IN), (2, 3, 4, N_IN)])
def test_forward_is_bit_identical_and_gradients_match(kind, bias, split, shape):
    _, original, mod = _split(kind, bias, split, [6, 1, 5, 1])
    assert mod.index.tolist() == [1, 5, 6]  # sorted, unique
    x = torch.randn(*shape, requires_grad=True)
    y, y0 = mod(x), original(x)
    assert y.shape == y0.shape and torch.equal(y, y0)
    g = torch.randn_like(y)
    gx, gt = torch.autograd.grad(y, (x, mod.trainable), g)
    gx0, gw0 = torch.autograd.grad(y0, (x, original.weight), g)
    torch.testing.assert_close(gx, gx0)
    torch.testing.assert_close(gt, gw0.index_select(mod.dim, mod.index))
    # rows are output channels: the trainable slice shapes say which dimension was taken
    out_dim = 1 if kind == "conv1d" else 0
    assert mod.dim == (out_dim if split == "rows" else 1 - out_dim)
    if bias and split == "rows":
        (gb,) = torch.autograd.grad(mod(x), (mod.bias_trainable,), g)
        (gb0,) = torch.autograd.grad(original(x), (original.bias,), g)
        torch.testing.assert_close(gb, gb0[mod.index])
    else:
        assert mod.bias_trainable is None


@pytest.mark.parametrize("kind,bias", CASES)
@pytest.mark.parametrize("split", ["rows", "cols"])
def test_merge_untrained_is_bit_identical(kind, bias, split):
    holder, original, _ = _split(kind, bias, split, [0, 3])
    merged = merge(holder, "0")
    assert type(merged) is type(original) and holder[0] is merged
    sd, sd0 = merged.state_dict(), original.state_dict()
    assert list(sd) == list(sd0)
    for k in sd0:
        assert torch.equal(sd[k], sd0[k]), k
    assert merged.weight.requires_grad


@pytest.mark.parametrize("kind,bias", CASES)
@pytest.mark.parametrize("split", ["rows", "cols"])
def test_adamw_keeps_state_only_for_the_trainable_slice(kind, bias, split):
    holder, original, mod = _split(kind, bias, split, [2, 4])
    active = [p for p in holder.parameters() if p.requires_grad]
    n_active = sum(p.numel() for p in active)
    # an output row holds one weight per input channel, an input column one per output
    expect = 2 * (N_IN if split == "rows" else N_OUT)
    if split == "rows" and bias:
        expect += 2
    assert n_active == mod.n_trainable == expect
    opt = torch.optim.AdamW(active, lr=0.1, weight_decay=0.5)
    for _ in range(3):
        opt.zero_grad()
        holder(torch.randn(3, 5, N_IN)).square().mean().backward()
        opt.step()
    state = sum(t.numel() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert state == 2 * n_active
    merged = merge(holder, "0")
    trained = torch.zeros_like(original.weight, dtype=torch.bool).index_fill_(mod.dim, mod.index, True)
    # frozen entries bit-identical after AdamW with weight decay, trained ones moved
    assert torch.equal(merged.weight[~trained], original.weight[~trained])
    assert not torch.equal(merged.weight[trained], original.weight[trained])
    if bias:
        btrained = torch.zeros(N_OUT, dtype=torch.bool)
        if split == "rows":
            btrained[mod.index] = True
        assert torch.equal(merged.bias[~btrained], original.bias[~btrained].detach())
        assert torch.equal(merged.bias[btrained], mod.bias_trainable.detach() if split == "rows" else merged.bias[btrained])


def test_bad_splits_raise():
    holder = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    with pytest.raises(NNError, match="exactly one"):
        split_linear(holder, "0", rows=[0], cols=[1])
    with pytest.raises(NNError, match="out of range"):
        split_linear(holder, "0", rows=[3])
    with pytest.raises(NNError, match="only nn.Linear"):
        split_linear(holder, "1", rows=[0])
    with pytest.raises(NNError, match="no module"):
        split_linear(holder, "7", rows=[0])
    split_linear(holder, "0", rows=torch.tensor([True, False, True]))
    assert holder[0].index.tolist() == [0, 2]
    with pytest.raises(NNError, match="already split"):
        split_linear(holder, "0", cols=[0])
    with pytest.raises(NNError, match="not a split layer"):
        merge(holder, "1")


def test_forward_hooks_survive_split_and_merge():
    holder = nn.Sequential(nn.Linear(N_IN, N_OUT))
    calls = []
    handle = holder[0].register_forward_hook(lambda m, a, o: calls.append(type(m).__name__))
    x = torch.randn(2, N_IN)
    split_linear(holder, "0", rows=[1])
    holder(x)
    merge(holder, "0")
    holder(x)
    assert calls == ["SplitLinear", "Linear"]
    handle.remove()
    holder(x)
    assert len(calls) == 2


# ------------------------------------------------------------------ whole model
def _down_ns(model, site):
    width = get_adapter(model).width(site)
    return NeuronSet.for_model(model, {(0, site): [1, 7, width - 1], (1, site): list(range(0, width, 5))})


@pytest.mark.parametrize("arch_name", ["llama", "gpt2"])
@pytest.mark.parametrize("site", ["mlp_out", "mlp_act"])
def test_split_model_behaves_like_the_original(arch_name, site, batch):
    model, _ = load_model(f"tiny-{arch_name}")
    reference = copy.deepcopy(model)
    ref_sd = {k: v.clone() for k, v in model.state_dict().items()}
    b = batch(arch_name)
    old_adapter = get_adapter(model)
    ns = _down_ns(model, site)
    splits = split_down_proj(model, ns)
    ad = get_adapter(model)
    assert ad is not old_adapter  # the cached resolution was refreshed
    for layer, mod in splits.items():
        assert ad.down_proj(layer) is mod and isinstance(mod, SplitLinear)
        assert mod.split == ("rows" if site == "mlp_out" else "cols")
        assert mod.index.tolist() == ns.indices(layer, site).tolist()
        assert linear_in_out(mod) == (128, 64)
        assert is_conv1d(mod) == (arch_name == "gpt2")
        assert torch.equal(ad.down_weight(layer), get_adapter(reference).down_weight(layer))
    with torch.no_grad():
        assert torch.equal(model(**b).logits, reference(**b).logits)
    sites = [(0, "mlp_act"), (1, "mlp_out"), (1, "resid")]
    cap, cap0 = capture(model, sites, [b]), capture(reference, sites, [b])
    for s in sites:
        assert torch.equal(cap[s], cap0[s])
    lesion = NeuronSet.for_model(model, {(1, "mlp_act"): [3, 4, 90]})
    with torch.no_grad(), mask_neurons(model, lesion), mask_neurons(reference, lesion):
        assert torch.equal(model(**b).logits, reference(**b).logits)
    assert sorted(merge_all(model)) == sorted(ad.down_proj_path(i) for i in splits)
    assert not split_modules(model)
    sd = model.state_dict()
    assert list(sd) == list(ref_sd)
    assert all(torch.equal(sd[k], ref_sd[k]) for k in ref_sd)


def test_split_down_proj_trains_only_the_selection(batch):
    model, _ = load_model("tiny-llama")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.requires_grad_(False)
    positions = [[0, 10, 100], []]  # LoKI-style positions: mlp_act channels per layer
    splits = split_down_proj(model, positions, by="cols")
    assert splits[1].n_trainable == 0
    active = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in active) == 3 * 64
    opt = torch.optim.AdamW(active, lr=1e-2, weight_decay=0.1)
    b = batch("llama")
    for _ in range(3):
        opt.zero_grad()
        model(**b, labels=b["input_ids"]).loss.backward()
        opt.step()
    assert sum(t.numel() for s in opt.state.values() for k, t in s.items() if k != "step") == 2 * 3 * 64
    merge_all(model)
    sd = model.state_dict()
    name = get_adapter(model).down_weight_name(0)
    for k in original:
        if k != name:
            assert torch.equal(sd[k], original[k]), k
    keep = torch.ones(128, dtype=torch.bool)
    keep[[0, 10, 100]] = False
    assert torch.equal(sd[name][:, keep], original[name][:, keep])
    assert not torch.equal(sd[name][:, ~keep], original[name][:, ~keep])


def test_split_down_proj_input_errors(tiny_models):
    model, _ = load_model("tiny-llama")
    with pytest.raises(NNError, match="by='rows'"):
        split_down_proj(model, [[0], [1]])
    with pytest.raises(NNError, match="one list per layer"):
        split_down_proj(model, [[0]], by="rows")
    with pytest.raises(NNError, match="out of range"):
        split_down_proj(model, {5: [0]}, by="rows")
    both = NeuronSet.for_model(model, {(0, "mlp_act"): [1], (0, "mlp_out"): [2]})
    with pytest.raises(NNError, match="both"):
        split_down_proj(model, both)
    with pytest.raises(NNError, match="has only"):
        split_down_proj(model, NeuronSet.for_model(model, {(0, "mlp_act"): [1]}), by="rows")
    assert not split_modules(model)
    # layers outside meta["layers"] are left alone
    scoped = NeuronSet.for_model(model, {(1, "mlp_out"): [2]}, layers=[1])
    assert list(split_down_proj(model, scoped)) == [1]
