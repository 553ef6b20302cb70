from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from nn_core.errors import NNError
from nn_core.model.loading import load_model
from nn_core.select.weightset import WeightSet
from nn_sensitivity.perturb import PERTURBATIONS, bit_flip_values, perturbed, perturbed_tensors

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]
_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
         torch.int8: torch.uint8}


class Toy(nn.Module):
    """One weight of the given dtype (int8 weights cannot train)."""

    def __init__(self, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        if dtype == torch.int8:
            w = torch.randint(-128, 128, (6, 8), generator=g, dtype=torch.int8)
        else:
            w = (torch.randn(6, 8, generator=g) * 3).to(dtype)
        self.weight = nn.Parameter(w, requires_grad=dtype != torch.int8)


@contextlib.contextmanager
def _perturbed(m, idx, kind, **kw):
    with perturbed_tensors({"weight": m.weight}, {"weight": idx}, kind, **kw) as info:
        yield info


def _bits(t):
    return t.detach().view(_VIEW[t.dtype]).clone()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_every_kind_and_dtype_restores_bit_identically(kind, dtype):
    m = Toy(dtype)
    before = _bits(m.weight)
    idx = torch.tensor([0, 5, 17, 47])
    opts = {"bit": 3} if kind == "bit_flip" else {"scale": 0.5} if kind == "gauss_noise" else {}
    with _perturbed(m, idx, kind, seed=1, **opts) as info:
        inside = _bits(m.weight)
        flat_in, flat_before = inside.reshape(-1), before.reshape(-1)
        untouched = torch.ones(48, dtype=torch.bool)
        untouched[idx] = False
        assert torch.equal(flat_in[untouched], flat_before[untouched])
        assert info["n_weights"] == 4
        # every kind changes the selected weights (zero too: they are nonzero before)
        assert torch.all(flat_before[idx] != 0)
        assert info["n_changed"] >= 1
        assert not torch.equal(flat_in[idx], flat_before[idx])
        if kind == "zero":
            assert torch.all(flat_in[idx] == 0)
    assert torch.equal(_bits(m.weight), before)


@pytest.mark.parametrize("dtype", DTYPES[:3], ids=lambda d: str(d).removeprefix("torch."))
def test_values_of_each_kind(dtype):
    m = Toy(dtype)
    idx = torch.tensor([1, 2, 3])
    w0 = m.weight.detach().reshape(-1)[idx].clone()
    ws = idx
    with _perturbed(m, ws, "zero"):
        assert torch.all(m.weight.reshape(-1)[idx] == 0)
    with _perturbed(m, ws, "sign_flip"):
        assert torch.equal(m.weight.reshape(-1)[idx], -w0)
    with _perturbed(m, ws, "gauss_noise", scale=0.0):
        assert torch.equal(m.weight.reshape(-1)[idx], w0)
    with _perturbed(m, ws, "gauss_noise", scale=1.0, seed=5):
        a = m.weight.reshape(-1)[idx].clone()
    with _perturbed(m, ws, "gauss_noise", scale=1.0, seed=5):
        assert torch.equal(m.weight.reshape(-1)[idx], a)
    assert not torch.equal(a, w0)


def test_gauss_noise_sigma_relative_and_absolute():
    m = Toy(torch.float32)
    with torch.no_grad():
        m.weight.fill_(2.0)
    ws = torch.arange(48)
    with _perturbed(m, ws, "gauss_noise", scale=0.1, seed=0):
        rel = float((m.weight.detach() - 2.0).std())
    with _perturbed(m, ws, "gauss_noise", scale=0.1, absolute=True, seed=0):
        ab = float((m.weight.detach() - 2.0).std())
    # relative: sigma = 0.1 * |w| = 0.2; absolute: sigma = 0.1 (same normal draws)
    assert rel == pytest.approx(2 * ab, rel=1e-5)
    assert 0.1 < float(rel) < 0.3


def test_bit_flip_is_a_real_ieee754_flip():
    x = torch.tensor([1.0, -2.5, 3.0])
    assert bit_flip_values(x, torch.full((3,), 31)).tolist() == [-1.0, 2.5, -3.0]
    # bit 23 is the lowest exponent bit: 1.0 (exp 127) -> 0.5 (exp 126)
    assert bit_flip_values(x, torch.full((3,), 23)).tolist() == [0.5, -5.0, 6.0]
    assert bit_flip_values(x, torch.full((3,), 30))[0] == float("inf")
    assert bit_flip_values(x.half(), torch.full((3,), 15)).tolist() == [-1.0, 2.5, -3.0]
    assert bit_flip_values(x.half(), torch.full((3,), 10)).tolist() == [0.5, -5.0, 6.0]
    assert bit_flip_values(x.bfloat16(), torch.full((3,), 7)).tolist() == [0.5, -5.0, 6.0]
    raw = x.view(torch.int32)
    flipped = bit_flip_values(x, torch.tensor([0, 12, -1])).view(torch.int32)
    assert (raw ^ flipped).tolist() == [1, 1 << 12, 0]
    i8 = torch.tensor([1, -128, 127], dtype=torch.int8)
    assert bit_flip_values(i8, torch.tensor([7, 7, 0])).tolist() == [-127, 0, 126]


def test_random_bit_flips_with_probability():
    m = Toy(torch.float32)
    with torch.no_grad():
        m.weight.copy_(torch.arange(48.0).reshape(6, 8) + 1)
    before = _bits(m.weight).reshape(-1)
    ws = torch.arange(48)
    with _perturbed(m, ws, "bit_flip", prob=1.0, seed=0):
        diff = before ^ _bits(m.weight).reshape(-1)
        # every weight differs in exactly one bit
        assert all(bin(int(d) & 0xFFFFFFFF).count("1") == 1 for d in diff)
        positions = {(int(d) & 0xFFFFFFFF).bit_length() - 1 for d in diff}
        assert len(positions) > 10
    with _perturbed(m, ws, "bit_flip", prob=0.0, seed=0) as info:
        assert info["n_changed"] == 0
    with _perturbed(m, ws, "bit_flip", prob=0.5, seed=0) as info:
        assert 10 < info["n_changed"] < 38
    assert torch.equal(_bits(m.weight).reshape(-1), before)


@pytest.mark.parametrize("dtype", DTYPES[:3], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_model_weights_restore_bit_identically(kind, dtype):
    model, _ = load_model("tiny-llama", device="cpu", dtype=dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ws = WeightSet.for_model(model, {"model.layers.1.mlp.down_proj.weight": [0, 7, 99, 8000],
                                     "model.layers.0.self_attn.q_proj.weight": [3]})
    with perturbed(model, ws, kind, bit=None, prob=1.0, scale=2.0, seed=3) as info:
        assert info["n_weights"] == 5
        now = dict(model.named_parameters())
        assert any(not torch.equal(before[n], now[n]) for n in ws.names())
        if kind == "zero":  # the selected weights were nonzero and are now exactly 0
            for n in ws.names():
                idx = ws.indices(n)
                assert torch.all(before[n].reshape(-1)[idx] != 0)
                assert torch.all(now[n].detach().reshape(-1)[idx] == 0)
    assert all(torch.equal(_bits(before[n]), _bits(p)) for n, p in model.named_parameters())


def test_restore_also_on_error_and_on_real_model(llama):
    model, _ = llama
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    name = "model.layers.1.mlp.down_proj.weight"
    ws = WeightSet.for_model(model, {name: [0, 7, 99], "model.layers.0.self_attn.q_proj.weight": [3]})
    with pytest.raises(RuntimeError), perturbed(model, ws, "bit_flip", bit=30):
        assert not torch.equal(dict(model.named_parameters())[name], before[name])
        raise RuntimeError("boom")
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_bad_input(llama):
    model, _ = llama
    before = {n: _bits(p) for n, p in model.named_parameters()}
    ws = WeightSet.for_model(model, {"model.layers.1.mlp.down_proj.weight": [0]})
    with pytest.raises(NNError, match="unknown perturbation 'flip'.*zero, sign_flip, gauss_noise, bit_flip"):
        with perturbed(model, ws, "flip"):
            pass
    with pytest.raises(NNError, match="bit 32 is out of range"):
        with perturbed(model, ws, "bit_flip", bit=32):
            pass
    with pytest.raises(NNError, match="probability"):
        with perturbed(model, ws, "bit_flip", prob=1.5):
            pass
    other, _ = load_model("tiny-gpt2", device="cpu")
    with pytest.raises(NNError, match="made for"):
        with perturbed(other, ws, "zero"):
            pass
    # none of the rejected calls touched a weight
    assert all(torch.equal(before[n], _bits(p)) for n, p in model.named_parameters())
