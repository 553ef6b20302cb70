"""SiteHooks (one handle for masks, capture sinks, injections), inject, stream/padded capture,
and WeightMask's NaN-safe gradient masking."""

from __future__ import annotations

import pytest
import torch

from nn_core.errors import NNError
from nn_core.intervene.capture import capture, capture_padded, stream_tokens
from nn_core.intervene.hooks import ModuleTap, SiteHooks, hooked, register_site_hooks
from nn_core.intervene.inject import inject
from nn_core.intervene.masks import WeightMask, mask_neurons
from nn_core.model.adapters import get_adapter
from nn_core.select.neuronset import NeuronSet

TEXTS = ["the quick brown fox jumps", "hi", "padding must not leak in"]


def _hook_count(model):
    # transformers may keep hooks of its own: count all and compare with the count before
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _logits(model, b):
    with torch.no_grad():
        return model(**b).logits


def _handles(model, kind):
    """One fresh handle of every hook kind, each touching 2 points."""
    ns = NeuronSet.for_model(model, {(0, "mlp_act"): [1, 2], (1, "mlp_act"): [3]})
    width = get_adapter(model).hidden_size
    return {
        "hooked": lambda: hooked(model, {(0, "mlp_out"): lambda x: x * 2, (1, "resid"): lambda x: x + 1}),
        "site_hooks": lambda: SiteHooks(model, {(0, "mlp_act"): lambda x: x * 0,
                                                ModuleTap(get_adapter(model).layer_path(1), "output"): lambda x: -x}),
        "mask": lambda: mask_neurons(model, ns, "lesion"),
        "inject": lambda: inject(model, {(0, "resid"): torch.ones(width), (1, "mlp_out"): lambda x: 0.5 * x}),
    }[kind]()


KINDS = ["hooked", "site_hooks", "mask", "inject"]


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_registered_until_used_and_nothing_leaks(tiny_models, batch, kind):
    model, _ = tiny_models("llama")
    b = batch("llama")
    base, n0 = _logits(model, b), _hook_count(model)
    h = _handles(model, kind)
    assert _hook_count(model) == n0 and not h.attached
    assert torch.equal(_logits(model, b), base)
    with h:
        assert _hook_count(model) == n0 + 2 and h.n_hooks == 2
        edited = _logits(model, b)
    assert not torch.equal(edited, base)
    assert _hook_count(model) == n0 and not h.attached
    # attach/remove are idempotent
    h.attach()
    h.attach()
    assert _hook_count(model) == n0 + 2
    assert torch.equal(_logits(model, b), edited)
    with h:  # a with-block on an attached handle leaves it attached
        pass
    assert h.attached and _hook_count(model) == n0 + 2
    h.remove()
    h.remove()
    assert _hook_count(model) == n0
    assert torch.equal(_logits(model, b), base)


@pytest.mark.parametrize("kind", KINDS)
def test_removed_in_finally_when_the_forward_raises(tiny_models, batch, kind):
    model, _ = tiny_models("gpt2")
    b = batch("gpt2")
    base, n0 = _logits(model, b), _hook_count(model)

    def boom(x):
        raise RuntimeError("inside hook")

    with pytest.raises(RuntimeError, match="inside hook"), _handles(model, kind), hooked(model, {(1, "mlp_act"): boom}):
        model(**b)
    assert _hook_count(model) == n0
    assert torch.equal(_logits(model, b), base)


def test_capture_sink_raising_leaves_no_hook(tiny_models, encode):
    model, tok = tiny_models("llama")
    n0 = _hook_count(model)
    seen = []

    def sink(point, rows, batch):
        seen.append(_hook_count(model))
        raise ValueError("sink failed")

    with pytest.raises(ValueError, match="sink failed"):
        stream_tokens(model, [(0, "mlp_act"), (1, "resid")], [dict(encode(tok, TEXTS))], sink)
    assert seen == [n0 + 2]  # registered only while streaming
    assert _hook_count(model) == n0


@pytest.mark.parametrize("kind", KINDS)
def test_disabled_gives_clean_output_bit_identically(tiny_models, batch, arch, kind):
    model, _ = tiny_models(arch)
    b = batch(arch)
    base, n0 = _logits(model, b), _hook_count(model)
    h = _handles(model, kind)
    with h:
        edited = _logits(model, b)
        with h.disabled():
            assert not h.enabled
            assert _hook_count(model) == n0 + 2  # still registered
            assert torch.equal(_logits(model, b), base)
        assert h.enabled
        assert torch.equal(_logits(model, b), edited)
    assert not torch.equal(edited, base)


def test_register_site_hooks_returns_removable_handles(tiny_models, batch):
    model, _ = tiny_models("qwen3")
    b = batch("qwen3")
    base, n0 = _logits(model, b), _hook_count(model)
    handles = register_site_hooks(model, {(0, "mlp_act"): lambda x: x * 0})
    assert len(handles) == 1 and _hook_count(model) == n0 + 1
    assert not torch.equal(_logits(model, b), base)
    for h in handles:
        h.remove()
    assert _hook_count(model) == n0 and torch.equal(_logits(model, b), base)


def test_bad_points_are_rejected_before_registering(tiny_models):
    model, _ = tiny_models("llama")
    n0 = _hook_count(model)
    with pytest.raises(NNError, match="no module named 'model.nope'"):
        SiteHooks(model, {(0, "mlp_act"): print, ModuleTap("model.nope"): print})
    with pytest.raises(NNError, match="'input' or 'output'"):
        ModuleTap("model.norm", "grad")
    with pytest.raises(NNError, match="unknown site"):
        hooked(model, {(0, "attn"): print})
    assert _hook_count(model) == n0


# --------------------------------------------------------------------------- inject
def test_inject_adds_the_delta(tiny_models, batch):
    model, _ = tiny_models("llama")
    b = batch("llama")
    width = get_adapter(model).hidden_size
    d = torch.randn(width, generator=torch.Generator().manual_seed(1))
    with hooked(model, {(1, "resid"): lambda x: x + d}):
        manual = _logits(model, b)
    with inject(model, {(1, "resid"): d}):
        assert torch.equal(_logits(model, b), manual)
    with inject(model, {"1.resid": lambda x: torch.zeros_like(x)}):
        assert torch.equal(_logits(model, b), _logits(model, {**b}))
    with pytest.raises(NNError, match="site width 64"):
        inject(model, {(1, "resid"): torch.ones(5)})
    with pytest.raises(NNError, match="does not broadcast"), \
            inject(model, {(1, "resid"): lambda x: torch.ones(3, 5, 64)}):
        _logits(model, b)
    with pytest.raises(NNError, match="tensor or a function"):
        inject(model, {(1, "resid"): 3.0})


@pytest.mark.parametrize("arch_name", ["llama", "gpt2"])
def test_inject_gradients_reach_the_delta_function(tiny_models, batch, arch_name):
    """A delta module at resid of layer round(L * 0.7) (nn-cls's hippocampal injection point):
    its parameters get the gradient of the loss, equal to a central finite difference."""
    model, _ = tiny_models(arch_name)
    b = batch(arch_name)
    ad = get_adapter(model)
    layer = round(ad.num_layers * 0.7)
    torch.manual_seed(3)
    moe = torch.nn.Linear(ad.hidden_size, ad.hidden_size)
    probe = torch.randn(ad.hidden_size) * 0.1
    model.zero_grad()

    def loss_fn():
        return model(**b, labels=b["input_ids"]).loss

    with inject(model, {(layer, "resid"): moe}):
        loss = loss_fn()
        loss.backward()
        g = moe.bias.grad.clone()
        assert moe.weight.grad is not None and torch.count_nonzero(moe.weight.grad) > 0
        with torch.no_grad():
            eps = 1e-2
            moe.bias += eps * probe
            up = loss_fn()
            moe.bias -= 2 * eps * probe
            down = loss_fn()
            moe.bias += eps * probe
    model.zero_grad()
    fd = float((up - down) / (2 * eps))
    assert abs(float(g @ probe) - fd) <= 2e-2 * abs(fd) + 1e-5


# --------------------------------------------------------------------------- capture
@pytest.mark.parametrize("site", ["mlp_act", "mlp_out", "resid"])
def test_capture_padded_equals_manual_hook_with_padding_zeroed(tiny_models, arch, site, encode):
    model, tok = tiny_models(arch)
    b = dict(encode(tok, TEXTS, "right"))
    seen = {}
    with hooked(model, {(0, site): lambda x: seen.setdefault("x", x.detach().clone())}), torch.no_grad():
        model(**b)
    mask = b["attention_mask"].bool()
    # OPT runs its MLP on (batch * position, width) rows; capture_padded restores [B, T, W]
    expected = seen["x"].float().reshape(*mask.shape, -1).masked_fill(~mask[..., None], 0)
    got = capture_padded(model, [(0, site)], b)
    assert torch.equal(got.mask, mask)
    assert torch.equal(got[0, site], expected)
    assert torch.count_nonzero(got[0, site][~mask]) == 0


def test_capture_padded_resid_equals_output_hidden_states(tiny_models, arch, encode):
    model, tok = tiny_models(arch)
    b = dict(encode(tok, TEXTS, "right"))
    with torch.no_grad():
        hs = model(**b, output_hidden_states=True).hidden_states
    mask = b["attention_mask"].bool()
    got = capture_padded(model, [(0, "resid")], b)
    # hidden_states[1] is the output of block 0 (the last entry has the final norm applied)
    assert torch.equal(got[0, "resid"], hs[1].masked_fill(~mask[..., None], 0))


@pytest.mark.parametrize("site", ["mlp_act", "resid"])
def test_capture_padded_left_equals_right_at_real_tokens(tiny_models, arch, site, encode):
    model, tok = tiny_models(arch)
    right = capture_padded(model, [(1, site)], dict(encode(tok, TEXTS, "right")))
    left = capture_padded(model, [(1, site)], dict(encode(tok, TEXTS, "left")))
    assert int(right.mask.sum()) == int(left.mask.sum())
    assert torch.count_nonzero(left[1, site][~left.mask]) == 0
    torch.testing.assert_close(left[1, site][left.mask], right[1, site][right.mask], atol=1e-5, rtol=1e-4)


def test_module_tap_input_equals_site_and_select_narrows(tiny_models, encode):
    model, tok = tiny_models("gpt2")
    ad = get_adapter(model)
    b = dict(encode(tok, TEXTS, "left"))
    tap = ModuleTap(ad.down_proj_path(1), "input")
    both = capture(model, [(1, "mlp_act"), tap], [b])
    assert torch.equal(both[tap], both[1, "mlp_act"])
    emb = capture(model, [ModuleTap("transformer.wte", "input")], [b])
    assert torch.equal(emb[ModuleTap("transformer.wte")].reshape(-1).long(), b["input_ids"][b["attention_mask"].bool()])
    # select_key keeps the real tokens it marks, row-major; batches without any are not run
    chosen = torch.zeros_like(b["attention_mask"])
    chosen[0, -1] = chosen[2, -3] = 1
    empty = {**b, "chosen": torch.zeros_like(chosen)}
    got = []
    stats = stream_tokens(model, [(1, "mlp_act")], [empty, {**b, "chosen": chosen}],
                          lambda p, rows, batch: got.append((batch.index, rows.clone())), select_key="chosen")
    assert (stats.n_batches, stats.n_forwards, stats.n_tokens) == (2, 1, 2)
    full = capture_padded(model, [(1, "mlp_act")], b)[1, "mlp_act"]
    assert got[0][0] == 1
    torch.testing.assert_close(got[0][1], torch.stack([full[0, -1], full[2, -3]]), atol=1e-6, rtol=1e-5)


def _nan_from_second(model, batches):
    """Yield ``batches``; from the second one on, layer 0's up-projection outputs NaN."""
    h = SiteHooks(model, {ModuleTap("model.layers.0.mlp.up_proj", "output"): lambda x: x * float("nan")})
    try:
        for i, batch in enumerate(batches):
            if i == 1:
                h.attach()
            yield batch
    finally:
        h.remove()


def test_stream_rejects_non_finite_naming_point_and_batch(tiny_models, encode):
    model, tok = tiny_models("llama")
    ok = dict(encode(tok, ["abc"]))
    n0 = _hook_count(model)
    gen = _nan_from_second(model, [ok, ok])
    try:
        with pytest.raises(NNError, match="non-finite activations at model.layers.0.mlp.down_proj:input in batch 1"):
            stream_tokens(model, [ModuleTap("model.layers.0.mlp.down_proj", "input")], gen, lambda *a: None)
    finally:
        gen.close()
    assert _hook_count(model) == n0


def test_stream_rejects_duplicates_and_reshaped_inputs(tiny_models, encode):
    model, tok = tiny_models("llama")
    b = dict(encode(tok, TEXTS))
    with pytest.raises(NNError, match="same site twice"):
        capture(model, [(0, "mlp_act"), "0.mlp_act"], [b])
    flat = SiteHooks(model, {ModuleTap("model.layers.0.mlp", "input"): lambda x: x.reshape(1, -1, x.shape[-1])})
    with flat, pytest.raises(NNError, match="no per-token rows"):
        capture(model, [ModuleTap("model.layers.0.mlp.up_proj", "input")], [b])


# --------------------------------------------------------------------------- WeightMask
def test_weight_mask_zeroes_a_nan_gradient_of_a_frozen_entry(tiny_models):
    model, _ = tiny_models("llama")
    ad = get_adapter(model)
    name, w = ad.down_weight_name(0), ad.down_weight(0)
    trainable = torch.zeros(w.shape, dtype=torch.bool)
    trainable[:, 5] = True
    wm = WeightMask(model, {name: trainable}).attach()
    try:
        upstream = torch.ones_like(w)
        upstream[0, 0] = float("nan")  # frozen entry: g * 0 would stay NaN
        upstream[1, 5] = float("inf")  # trainable entry: passed through untouched
        w.grad = None
        (w * upstream).sum().backward()
        g = w.grad
        assert g[0, 0] == 0 and torch.count_nonzero(g[~trainable]) == 0
        assert torch.isinf(g[1, 5]) and torch.equal(g[2:, 5], upstream[2:, 5])
    finally:
        wm.remove()
        w.grad = None
