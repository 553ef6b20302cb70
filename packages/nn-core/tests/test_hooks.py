from __future__ import annotations

import pytest
import torch

from nn_core.errors import NNError
from nn_core.intervene.hooks import capture, hooked


def _hook_count(model):
    # transformers may keep hooks of its own (output recording); count, don't expect zero
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooked_removes_hooks_after_an_exception(tiny_models, batch, arch):
    model, _ = tiny_models(arch)
    b = batch(arch)
    with torch.no_grad():
        before = model(**b).logits
    n_hooks = _hook_count(model)

    def boom(x):
        raise RuntimeError("inside hook")

    with pytest.raises(RuntimeError, match="inside hook"), hooked(model, {(0, "mlp_act"): boom}):
        model(**b)
    with pytest.raises(ValueError), hooked(model, {(1, "resid"): lambda x: x * 0}):
        raise ValueError("in block")
    with torch.no_grad():
        after = model(**b).logits
    assert torch.equal(before, after)
    assert _hook_count(model) == n_hooks


def test_hooked_edit_changes_output(tiny_models, batch):
    model, _ = tiny_models("llama")
    b = batch("llama")
    with torch.no_grad():
        base = model(**b).logits
        with hooked(model, {(0, "mlp_out"): lambda x: x + 1.0}):
            edited = model(**b).logits
    assert not torch.allclose(base, edited)


@pytest.mark.parametrize("site", ["mlp_act", "mlp_out", "resid"])
def test_capture_padded_equals_one_at_a_time(tiny_models, arch, site, encode):
    model, tok = tiny_models(arch)
    texts = ["the quick brown fox jumps", "hi", "padding must not leak in"]
    padded = dict(encode(tok, texts, "right"))
    ref = (1, site)
    together = capture(model, [ref], [padded])
    singles = [capture(model, [ref], [dict(encode(tok, [t]))]) for t in texts]
    expected = torch.cat([s[ref] for s in singles])
    assert together.n_tokens == sum(len(tok(t).input_ids) for t in texts)
    assert together[ref].shape == expected.shape
    torch.testing.assert_close(together[ref], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("site", ["mlp_act", "resid"])
def test_capture_left_padded_equals_one_at_a_time(tiny_models, arch, site, encode):
    model, tok = tiny_models(arch)
    texts = ["a longer sentence here", "tiny"]
    ref = (1, site)
    left = capture(model, [ref], [dict(encode(tok, texts, "left"))])
    expected = torch.cat([capture(model, [ref], [dict(encode(tok, [t]))])[ref] for t in texts])
    assert left.n_tokens == sum(len(tok(t).input_ids) for t in texts)
    torch.testing.assert_close(left[ref], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("reducer", ["mean", "abs_mean", "sumsq"])
def test_reducers_match_full_capture(tiny_models, reducer, encode):
    model, tok = tiny_models("gpt2")
    texts = ["one two three", "four", "five six seven eight"]
    batches = [dict(encode(tok, texts[:2])), dict(encode(tok, texts[2:]))]
    full = capture(model, [(0, "mlp_act")], batches)[(0, "mlp_act")].double()
    red = capture(model, [(0, "mlp_act")], batches, reducer=reducer)[(0, "mlp_act")]
    expected = {"mean": full.mean(0), "abs_mean": full.abs().mean(0), "sumsq": (full**2).sum(0)}[reducer]
    assert red.dtype == torch.float64 and red.shape == (128,)
    torch.testing.assert_close(red, expected, atol=1e-5, rtol=1e-5)


def test_capture_rejects_non_finite(tiny_models, encode):
    model, tok = tiny_models("llama")
    b = dict(encode(tok, ["abc"]))
    n_hooks = _hook_count(model)
    with hooked(model, {(0, "mlp_act"): lambda x: x * float("nan")}), \
            pytest.raises(NNError, match="non-finite activations at 0.mlp_act in batch 0"):
        capture(model, [(0, "mlp_act")], [b])
    assert _hook_count(model) == n_hooks


def test_capture_empty_data_and_bad_reducer(tiny_models):
    model, _ = tiny_models("llama")
    with pytest.raises(NNError, match="no tokens"):
        capture(model, [(0, "mlp_act")], [])
    with pytest.raises(NNError, match="unknown reducer"):
        capture(model, [(0, "mlp_act")], [], reducer="median")
    with pytest.raises(NNError, match="unknown site"):
        capture(model, [(0, "attn")], [])
