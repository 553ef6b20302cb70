from __future__ import annotations

import pytest
import torch

from nn_core.errors import NNError
from nn_core.intervene.hooks import hooked
from nn_core.model.sites import SiteRef
from nn_core.numerics.integrated_gradients import (
    integrated_gradients,
    packed_layout_applies,
    target_positions,
)

captum_methods = pytest.importorskip("captum.attr._utils.approximation_methods")
captum_attr = pytest.importorskip("captum.attr")

TEXTS = ["hello world, this is nn", "short one", "abc"]
TARGETS = [101, 32, 7]


def quadrature(method: str, n: int):
    step_sizes, alphas = captum_methods.approximation_parameters(method)
    return alphas(n), step_sizes(n)


def target_prob(model, ids, mask, pos, layer, site, target, value=None):
    """F with the site's activation at (row, pos) replaced by ``value`` (None: clean)."""
    fns = {}
    if value is not None:
        def fn(x):
            out = x.clone()
            view = out.view(ids.shape[0], -1, x.shape[-1])
            view[:, pos] = value.to(x.dtype)
            return out
        fns = {SiteRef(layer, site): fn}
    with hooked(model, fns):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, pos]
    return torch.softmax(logits.float(), -1)[:, target]


def captum_reference(model, ids, mask, pos, layer, site, target, method, n):
    """Captum IG of F(x) for one row (ids [1, T]), x the target-position activation."""
    store = {}

    def read(x):
        store["a"] = x.reshape(1, -1, x.shape[-1])[0, pos].detach().clone()

    with torch.no_grad(), hooked(model, {SiteRef(layer, site): read}):
        model(input_ids=ids, attention_mask=mask)
    a = store["a"][None]

    def forward(x):
        k = x.shape[0]
        return target_prob(model, ids.expand(k, -1), mask.expand(k, -1), pos, layer, site,
                           target, value=x)

    ig = captum_attr.IntegratedGradients(forward)
    return ig.attribute(a, baselines=torch.zeros_like(a), n_steps=n, method=method)[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["riemann_trapezoid", "gausslegendre"])
def test_matches_captum_per_layer(tiny_models, encode, arch, method):
    model, tok = tiny_models(arch)
    enc = encode(tok, TEXTS[:2], padding_side="right")
    alphas, weights = quadrature(method, 7)
    ours = integrated_gradients(model, enc["input_ids"], enc["attention_mask"], alphas=alphas,
                                weights=weights, target_ids=TARGETS[:2], max_batch=5)
    assert ours.shape == (2, 2, 64) and ours.dtype == torch.float32
    for b in range(2):
        n = int(enc["attention_mask"][b].sum())
        ids, mask = enc["input_ids"][b:b + 1, :n], enc["attention_mask"][b:b + 1, :n]
        for layer in range(2):
            ref = captum_reference(model, ids, mask, n - 1, layer, "mlp_out", TARGETS[b], method, 7)
            torch.testing.assert_close(ours[b, layer], ref.float(), rtol=1e-5,
                                       atol=1e-5 * float(ref.abs().max()))
            assert float(ref.abs().max()) > 0


@pytest.mark.parametrize("site,width", [("mlp_act", 128), ("resid", 64)])
def test_other_sites_match_captum(tiny_models, site, width):
    model, tok = tiny_models("gpt2")
    enc = tok(["hello world"], return_tensors="pt")
    alphas, weights = quadrature("gausslegendre", 5)
    ours = integrated_gradients(model, enc["input_ids"], alphas=alphas, weights=weights,
                                layers=[1], site=site, target_ids=[40], positions=4)
    assert ours.shape == (1, 1, width)
    ref = captum_reference(model, enc["input_ids"], enc["attention_mask"], 4, 1, site, 40,
                           "gausslegendre", 5)
    torch.testing.assert_close(ours[0, 0], ref.float(), rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


# OPT's ReLU MLP makes F only piecewise smooth along the path, so quadrature converges slower
@pytest.mark.parametrize("arch,rel", [("llama", 1e-4), ("gpt2", 1e-4), ("opt", 1e-3)])
def test_completeness(tiny_models, arch, rel):
    model, tok = tiny_models(arch)
    enc = tok(["completeness check"], return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pos = ids.shape[1] - 1
    alphas, weights = quadrature("gausslegendre", 48)
    ig = integrated_gradients(model, ids, mask, alphas=alphas, weights=weights, target_ids=[65])
    for layer in range(2):
        with torch.no_grad():
            f_a = target_prob(model, ids, mask, pos, layer, "mlp_out", 65)
            f_0 = target_prob(model, ids, mask, pos, layer, "mlp_out", 65,
                              value=torch.zeros(64))
        delta = float(f_a - f_0)
        assert abs(delta) > 1e-7
        assert float(ig[0, layer].double().sum()) == pytest.approx(delta, rel=rel)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_single_rows(tiny_models, encode, arch, side):
    model, tok = tiny_models(arch)
    enc = encode(tok, TEXTS, padding_side=side)
    assert int(enc["attention_mask"].sum()) < enc["attention_mask"].numel()  # really padded
    alphas, weights = quadrature("riemann_trapezoid", 4)
    batched = integrated_gradients(model, enc["input_ids"], enc["attention_mask"], alphas=alphas,
                                   weights=weights, target_ids=TARGETS, max_batch=5)
    for b, text in enumerate(TEXTS):
        one = tok([text], return_tensors="pt")
        single = integrated_gradients(model, one["input_ids"], alphas=alphas, weights=weights,
                                      target_ids=[TARGETS[b]])
        torch.testing.assert_close(batched[b], single[0], rtol=1e-5,
                                   atol=1e-5 * float(single.abs().max()))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "opt"])
def test_kv_cache_engine_equals_full(tiny_models, encode, arch):
    model, tok = tiny_models(arch)
    enc = encode(tok, TEXTS, padding_side="right")
    alphas, weights = quadrature("gausslegendre", 5)
    kw = dict(alphas=alphas, weights=weights, target_ids=TARGETS, max_batch=4, site="mlp_act")
    full = integrated_gradients(model, enc["input_ids"], enc["attention_mask"], **kw)
    kv = integrated_gradients(model, enc["input_ids"], enc["attention_mask"], engine="kv_cache", **kw)
    assert float(full.abs().max()) > 0
    torch.testing.assert_close(kv, full, rtol=1e-5, atol=1e-5 * float(full.abs().max()))
    # targets given explicitly: mid-row, and a first token (empty prefix in the cache)
    mid = integrated_gradients(model, enc["input_ids"], enc["attention_mask"], positions=[5, 3, 0],
                               **kw)
    mid_kv = integrated_gradients(model, enc["input_ids"], enc["attention_mask"], positions=[5, 3, 0],
                                  engine="kv_cache", **kw)
    torch.testing.assert_close(mid_kv, mid, rtol=1e-5, atol=1e-5 * float(mid.abs().max()))
    assert not torch.allclose(mid[0], full[0])


def test_target_fn_and_layer_order(tiny_models):
    model, tok = tiny_models("llama")
    enc = tok(["target function"], return_tensors="pt")
    alphas, weights = quadrature("gausslegendre", 6)
    prob = integrated_gradients(model, enc["input_ids"], alphas=alphas, weights=weights,
                                target_ids=[9], layers=[1, 0])
    same = integrated_gradients(
        model, enc["input_ids"], alphas=alphas, weights=weights, layers=[0, 1],
        target_fn=lambda logits, rows: torch.softmax(logits.float(), -1)[:, 9])
    torch.testing.assert_close(prob[:, 0], same[:, 1])
    torch.testing.assert_close(prob[:, 1], same[:, 0])
    # a logit target is linear in the logits: completeness against the logit difference
    logit = integrated_gradients(
        model, enc["input_ids"], alphas=quadrature("gausslegendre", 48)[0],
        weights=quadrature("gausslegendre", 48)[1], layers=[0],
        target_fn=lambda logits, rows: logits[:, 9].float())
    ids = enc["input_ids"]
    pos = ids.shape[1] - 1

    def zero(x):
        out = x.clone()
        out[:, pos] = 0
        return out

    with torch.no_grad():
        clean = model(input_ids=ids).logits[0, pos, 9]
        with hooked(model, {SiteRef(0, "mlp_out"): zero}):
            ablated = model(input_ids=ids).logits[0, pos, 9]
    assert float(logit.double().sum()) == pytest.approx(float(clean - ablated), rel=1e-4)


def test_model_state_restored(tiny_models):
    model, tok = tiny_models("llama")
    model.train()
    enc = tok(["state"], return_tensors="pt")
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    integrated_gradients(model, enc["input_ids"], alphas=[0.5], weights=[1.0], target_ids=[3])
    assert model.training
    model.eval()
    assert all(p.requires_grad for p in model.parameters())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == n_hooks


def test_target_positions_default_and_validation():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0]])
    assert target_positions(mask).tolist() == [2, 3, 0]
    assert target_positions(mask, [0, 1, 0]).tolist() == [0, 1, 0]
    with pytest.raises(NNError, match="padding"):
        target_positions(mask, [3, 3, 0])
    with pytest.raises(NNError, match="out of range"):
        target_positions(mask, 4)
    with pytest.raises(NNError, match="all padding"):
        target_positions(torch.tensor([[1, 1], [0, 0]]))


def test_bad_arguments(tiny_models):
    model, tok = tiny_models("llama")
    ids = tok(["bad"], return_tensors="pt")["input_ids"]
    with pytest.raises(NNError, match="equal length"):
        integrated_gradients(model, ids, alphas=[0.5, 1.0], weights=[1.0], target_ids=[1])
    with pytest.raises(NNError, match="target_ids"):
        integrated_gradients(model, ids, alphas=[0.5], weights=[1.0])
    with pytest.raises(NNError, match="out of range"):
        integrated_gradients(model, ids, alphas=[0.5], weights=[1.0], target_ids=[10**6])
    with pytest.raises(NNError, match="layer"):
        integrated_gradients(model, ids, alphas=[0.5], weights=[1.0], target_ids=[1], layers=[5])
    with pytest.raises(NNError, match="site"):
        integrated_gradients(model, ids, alphas=[0.5], weights=[1.0], target_ids=[1], site="attn")
    with pytest.raises(NNError, match="engine"):
        integrated_gradients(model, ids, alphas=[0.5], weights=[1.0], target_ids=[1], engine="x")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "opt"])
def test_kv_cache_all_layers_in_one_batch_equal_per_layer(tiny_models, encode, arch):
    """kv_cache batches (row, layer, step) triples of every layer together, each layer's
    hook substituting only its own rows: the same as one layer at a time, for any chunking
    (a chunk mixing layers and rows, and one triple per forward)."""
    model, tok = tiny_models(arch)
    enc = encode(tok, TEXTS, padding_side="left")
    alphas, weights = quadrature("riemann_trapezoid", 3)
    kw = dict(alphas=alphas, weights=weights, target_ids=TARGETS)
    per_layer = torch.cat([integrated_gradients(model, enc["input_ids"], enc["attention_mask"],
                                                layers=[la], engine="kv_cache", max_batch=3, **kw)
                           for la in range(2)], dim=1)
    full = integrated_gradients(model, enc["input_ids"], enc["attention_mask"], max_batch=4, **kw)
    assert float(per_layer.abs().max()) > 0
    for max_batch in (18, 7, 1):
        joint = integrated_gradients(model, enc["input_ids"], enc["attention_mask"],
                                     engine="kv_cache", max_batch=max_batch, **kw)
        torch.testing.assert_close(joint, per_layer, rtol=1e-5, atol=1e-5 * float(per_layer.abs().max()))
        torch.testing.assert_close(joint, full, rtol=1e-5, atol=1e-5 * float(full.abs().max()))
    # repeated and reordered layers: each output column is its own layer's attribution
    again = integrated_gradients(model, enc["input_ids"], enc["attention_mask"], layers=[1, 0, 1],
                                 engine="kv_cache", max_batch=5, **kw)
    torch.testing.assert_close(again, per_layer[:, [1, 0, 1]], rtol=1e-5,
                               atol=1e-5 * float(per_layer.abs().max()))


def test_kv_cache_layouts_equal_full_on_every_architecture(tiny_models, encode, arch):
    """Both layouts of kv_cache (variants as extra tokens over the shared prefix cache, and
    variants as batch rows) give the full engine's attributions on a left-padded batch of
    mixed lengths, for any chunking (all variants of all rows in one forward, a row's
    variants split over forwards, rows grouped), and return the clean logits."""
    model, tok = tiny_models(arch)
    enc = encode(tok, TEXTS, padding_side="left")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert packed_layout_applies(model, ids.shape[1])
    alphas, weights = quadrature("riemann_trapezoid", 3)
    kw = dict(alphas=alphas, weights=weights, target_ids=TARGETS)
    full = integrated_gradients(model, ids, mask, max_batch=4, **kw)
    scale = float(full.abs().max())
    assert scale > 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    for layout, max_batch in (("packed", 64), ("packed", 4), ("packed", 12), ("rows", 7)):
        kv, logits = integrated_gradients(model, ids, mask, engine="kv_cache", layout=layout,
                                          max_batch=max_batch, return_logits=True, **kw)
        torch.testing.assert_close(kv, full, rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(logits, ref.float(), rtol=1e-4, atol=1e-4)


def test_argmax_target_and_layout_caps(tiny_models, encode):
    """target_ids='argmax' is each row's argmax of its clean logits; a callable max_batch
    is asked for the cap of the layouts the engine actually runs."""
    model, tok = tiny_models("llama")
    enc = encode(tok, TEXTS, padding_side="left")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    alphas, weights = quadrature("gausslegendre", 3)
    asked = []

    def cap(layout):
        asked.append(layout)
        return 5

    att, logits = integrated_gradients(model, ids, mask, alphas=alphas, weights=weights, target_ids="argmax",
                                       engine="kv_cache", max_batch=cap, return_logits=True)
    assert set(asked) == {"rows", "packed"}
    explicit = integrated_gradients(model, ids, mask, alphas=alphas, weights=weights,
                                    target_ids=logits.argmax(-1), engine="full", max_batch=cap)
    assert asked[-1] == "full"
    torch.testing.assert_close(att, explicit, rtol=1e-5, atol=1e-5 * float(explicit.abs().max()))
    with pytest.raises(NNError, match="argmax"):
        integrated_gradients(model, ids, mask, alphas=alphas, weights=weights, target_ids="gold")
    with pytest.raises(NNError, match="max_batch"):
        integrated_gradients(model, ids, mask, alphas=alphas, weights=weights, target_ids="argmax",
                             engine="kv_cache", max_batch=lambda layout: 0)
    with pytest.raises(NNError, match="layout"):
        integrated_gradients(model, ids, mask, alphas=alphas, weights=weights, target_ids="argmax",
                             engine="kv_cache", layout="x")


def test_packed_layout_falls_back_when_its_check_fails(tiny_models, encode, monkeypatch):
    """The packed layout's unsubstituted check variant catches an attention that does not
    honour its 4-D mask (here: a plain causal mask, so variants see each other): 'auto'
    then computes by rows (same result as the full engine), 'packed' refuses."""
    import nn_core.numerics.integrated_gradients as ig

    model, tok = tiny_models("llama")
    enc = encode(tok, TEXTS, padding_side="left")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    alphas, weights = quadrature("riemann_trapezoid", 3)
    kw = dict(alphas=alphas, weights=weights, target_ids=TARGETS, max_batch=64)
    full = integrated_gradients(model, ids, mask, **kw)

    def causal(prefix_mask, n, dtype):
        b, p = prefix_mask.shape
        allow = torch.cat([prefix_mask.bool()[:, None, :].expand(b, n, p),
                           torch.ones(n, n, dtype=torch.bool).tril().expand(b, n, n)], dim=-1)
        return torch.zeros(b, 1, n, p + n, dtype=dtype).masked_fill_(~allow[:, None], torch.finfo(dtype).min)

    monkeypatch.setattr(ig, "_variant_mask", causal)
    calls = []
    real_rows = ig._kv_rows
    monkeypatch.setattr(ig, "_kv_rows", lambda *a: calls.append(1) or real_rows(*a))
    auto = integrated_gradients(model, ids, mask, engine="kv_cache", **kw)
    assert calls  # the rows layout did the work
    torch.testing.assert_close(auto, full, rtol=1e-5, atol=1e-5 * float(full.abs().max()))
    with pytest.raises(NNError, match="layout='rows'"):
        integrated_gradients(model, ids, mask, engine="kv_cache", layout="packed", **kw)


def test_packed_layout_not_used_past_a_sliding_window(tiny_models):
    """gemma2's sliding window (64 tokens in the tiny model) is shorter than this sequence:
    the packed layout does not apply ('packed' refuses, 'auto' uses rows) and kv_cache
    still equals the full engine."""
    model, _ = tiny_models("gemma2")
    window = model.config.sliding_window
    ids = torch.randint(5, 200, (1, window + 6), generator=torch.Generator().manual_seed(1))
    assert not packed_layout_applies(model, ids.shape[1]) and packed_layout_applies(model, window)
    alphas, weights = quadrature("gausslegendre", 2)
    kw = dict(alphas=alphas, weights=weights, target_ids=[7], max_batch=8)
    full = integrated_gradients(model, ids, **kw)
    kv = integrated_gradients(model, ids, engine="kv_cache", **kw)
    torch.testing.assert_close(kv, full, rtol=1e-5, atol=1e-5 * float(full.abs().max()))
    with pytest.raises(NNError, match="packed layout needs"):
        integrated_gradients(model, ids, engine="kv_cache", layout="packed", **kw)
