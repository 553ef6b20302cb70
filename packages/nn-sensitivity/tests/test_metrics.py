from __future__ import annotations

import pytest
import torch

from nn_core.errors import NNError
from nn_core.intervene.hooks import capture
from nn_sensitivity.batching import summed_nll
from nn_sensitivity.metrics import METRICS, score
from nn_sensitivity.params import eligible_params


def _full_loss_grad(model, batches, names):
    """Reference: the gradient of (sum of all token NLLs) / (token count), one graph."""
    params = dict(model.named_parameters())
    total, n = 0.0, 0
    for b in batches:
        loss, k = summed_nll(model, b)
        total = total + loss
        n += k
    grads = torch.autograd.grad(total / n, [params[x] for x in names])
    return dict(zip(names, grads, strict=True))


@pytest.mark.parametrize("metric", list(METRICS))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_metric_scores_every_weight(metric, arch, request, batches):
    model, _ = request.getfixturevalue(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = score(model, batches, metric, probes=2) if metric == "hutchinson_diag" else \
        score(model, batches, metric)
    assert [p.name for p in s.params] == [i.name for i in eligible_params(model)]
    params = dict(model.named_parameters())
    for info in s.params:
        v = s[info.name]
        assert v.shape == params[info.name].shape and v.dtype == torch.float32
        assert torch.isfinite(v).all() and (v >= 0).all()
        assert v.abs().sum() > 0
    # scoring never changes the model and leaves no gradients behind
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_grad_x_weight_is_token_weighted_mean_loss_gradient(llama):
    model, _ = llama
    # uneven batches: a mean of batch means would weight these differently
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 256, (3, 40), generator=g)},
               {"input_ids": torch.randint(0, 256, (1, 9), generator=g)}]
    s = score(model, batches, "grad_x_weight")
    names = [p.name for p in s.params]
    ref = _full_loss_grad(model, batches, names)
    params = dict(model.named_parameters())
    for n in names:
        torch.testing.assert_close(s[n], (ref[n] * params[n]).abs(), rtol=1e-4, atol=1e-9)
    # the same tokens batched differently give the same scores
    regrouped = [{"input_ids": batches[0]["input_ids"][:1]},
                 {"input_ids": batches[0]["input_ids"][1:]}, batches[1]]
    s2 = score(model, regrouped, "grad_x_weight")
    for n in names:
        torch.testing.assert_close(s2[n], s[n], rtol=1e-4, atol=1e-9)
    assert s.info["n_tokens"] == 3 * 39 + 8


def test_padding_and_prompt_tokens_carry_no_loss(llama):
    model, _ = llama
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 256, (2, 20), generator=g)
    plain = [{"input_ids": ids}]
    # right padding with junk tokens, masked out
    padded_ids = torch.cat([ids, torch.randint(0, 256, (2, 6), generator=g)], 1)
    mask = torch.cat([torch.ones(2, 20), torch.zeros(2, 6)], 1).long()
    padded = [{"input_ids": padded_ids, "attention_mask": mask}]
    a, b = score(model, plain, "grad_x_weight"), score(model, padded, "grad_x_weight")
    for n in a.values:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-9)
    # prompt tokens (labels -100) are excluded from the loss
    labels = ids.clone()
    labels[:, :10] = -100
    c = score(model, [{"input_ids": ids, "labels": labels}], "grad_x_weight")
    assert c.info["n_tokens"] == 2 * 10
    names = [p.name for p in c.params]
    params = dict(model.named_parameters())
    loss, n = summed_nll(model, {"input_ids": ids, "labels": labels})
    ref = torch.autograd.grad(loss / n, [params[x] for x in names])
    for x, r in zip(names, ref, strict=True):
        torch.testing.assert_close(c[x], (r * params[x]).abs(), rtol=1e-4, atol=1e-9)


def test_grad_squared_is_mean_of_squared_gradients_per_sequence_by_default(llama, batches):
    model, _ = llama
    names = [i.name for i in eligible_params(model, modules="down_proj")]
    sp = score(model, batches, "grad_squared", modules="down_proj")
    assert sp.info["per_sample"] is True and sp.info["n_sequences"] == 6
    rows = [{"input_ids": b["input_ids"][i:i + 1]} for b in batches for i in range(2)]
    per_row = [_full_loss_grad(model, [r], names) for r in rows]
    for n in names:
        expect = torch.stack([g[n] ** 2 for g in per_row]).mean(0)
        torch.testing.assert_close(sp[n], expect, rtol=1e-4, atol=1e-12)
        square_of_sum = torch.stack([g[n] for g in per_row]).mean(0) ** 2
        assert not torch.allclose(sp[n], square_of_sum, rtol=1e-2)
    # per batch on request: the squared gradient of each batch's token-mean loss
    s = score(model, batches, "grad_squared", modules="down_proj", per_sample=False)
    per_batch = [_full_loss_grad(model, [b], names) for b in batches]
    for n in names:
        expect = torch.stack([g[n] ** 2 for g in per_batch]).mean(0)
        torch.testing.assert_close(s[n], expect, rtol=1e-4, atol=1e-12)
    assert s.info["n_batches"] == 3 and s.info["per_sample"] is False


def test_grad_squared_default_does_not_depend_on_the_batch_size(llama, batch_maker):
    model, _ = llama
    ids = torch.cat([b["input_ids"] for b in batch_maker(2, 4, 24, seed=6)])
    by = {bs: [{"input_ids": ids[i:i + bs]} for i in range(0, 8, bs)] for bs in (1, 4)}
    one = score(model, by[1], "grad_squared", modules="down_proj")
    four = score(model, by[4], "grad_squared", modules="down_proj")
    for n in one.values:
        torch.testing.assert_close(four[n], one[n], rtol=1e-4, atol=1e-12)
    # the per-batch variant shrinks as batches grow (why it is no longer the default)
    pb1 = score(model, by[1], "grad_squared", modules="down_proj", per_sample=False)
    pb4 = score(model, by[4], "grad_squared", modules="down_proj", per_sample=False)
    n = next(iter(one.values))
    assert float(pb4[n].sum()) < 0.6 * float(pb1[n].sum())


def test_snip_sums_absolute_per_sequence_gradients_on_label_tokens(llama):
    model, _ = llama
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 256, (3, 20), generator=g)
    labels = ids.clone()
    labels[:, :8] = -100  # prompt: no loss
    batches = [{"input_ids": ids, "labels": labels},
               {"input_ids": torch.randint(0, 256, (2, 12), generator=g)}]
    s = score(model, batches, "snip", modules="mlp")
    names = [p.name for p in s.params]
    params = dict(model.named_parameters())
    rows = [{k: v[i:i + 1] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]
    per_row = []
    for r in rows:
        loss, n = summed_nll(model, r)
        per_row.append(dict(zip(names, torch.autograd.grad(loss / n, [params[x] for x in names]),
                                strict=True)))
    assert s.info["n_sequences"] == 5 and s.info["n_tokens"] == 3 * 12 + 2 * 11
    gx = score(model, batches, "grad_x_weight", modules="mlp")
    for n in names:
        w = params[n].detach().abs()
        expect = w * torch.stack([r[n].abs() for r in per_row]).sum(0)
        torch.testing.assert_close(s[n], expect, rtol=1e-4, atol=1e-10)
        # not grad_x_weight's |W ⊙ mean g| scaled: the rankings differ
        ratio = s[n] / gx[n].clamp_min(1e-30)
        assert float(ratio.std() / ratio.mean()) > 0.1
    # prompt tokens really are excluded: scoring them too changes the scores
    full = score(model, [{"input_ids": ids}, batches[1]], "snip", modules="mlp")
    assert not torch.allclose(full[names[0]], s[names[0]], rtol=1e-2)


def test_scores_of_a_bf16_model_are_finite_and_rank_like_fp32(batch_maker):
    from nn_core.model.loading import load_model

    hi, _ = load_model("tiny-llama", device="cpu", dtype="float32")
    lo, _ = load_model("tiny-llama", device="cpu", dtype="bfloat16")
    batches = batch_maker(2, 2, 24, seed=4)

    def ranks(v):
        r = torch.empty(v.numel())
        r[v.reshape(-1).argsort()] = torch.arange(v.numel(), dtype=torch.float32)
        return r

    for metric in ("grad_x_weight", "grad_squared", "snip"):
        a = score(hi, batches, metric, modules="mlp.down_proj")
        b = score(lo, batches, metric, modules="mlp.down_proj")
        for n in a.values:
            assert b[n].dtype == torch.float32 and torch.isfinite(b[n]).all()
            spearman = torch.corrcoef(torch.stack([ranks(a[n]), ranks(b[n])]))[0, 1]
            assert spearman > 0.9, (metric, n, float(spearman))
            top_a = set(a[n].reshape(-1).topk(100).indices.tolist())
            top_b = set(b[n].reshape(-1).topk(100).indices.tolist())
            assert len(top_a & top_b) > 50, (metric, n)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_act_mag_and_wanda_align_with_down_proj_input(arch, request, batches):
    from nn_core.model.adapters import get_adapter

    model, _ = request.getfixturevalue(arch)
    ad = get_adapter(model)
    name = ad.down_weight_name(1)
    w = ad.down_weight(1).detach().abs()
    mean_abs = capture(model, [(1, "mlp_act")], batches, reducer="abs_mean")[1, "mlp_act"].float()
    sumsq = capture(model, [(1, "mlp_act")], batches, reducer="sumsq")[1, "mlp_act"].float()
    # Linear stores (out, in): features on dim 1; GPT-2 Conv1D stores (in, out): dim 0
    shape = (-1, 1) if ad.conv1d else (1, -1)
    a = score(model, batches, "act_mag", modules=name.removesuffix(".weight"))
    torch.testing.assert_close(a[name], w * mean_abs.reshape(shape), rtol=1e-5, atol=1e-8)
    wd = score(model, batches, "wanda", modules=name.removesuffix(".weight"))
    torch.testing.assert_close(wd[name], w * sumsq.sqrt().reshape(shape), rtol=1e-5, atol=1e-8)


def test_act_mag_excludes_padding(llama):
    model, _ = llama
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    junk = torch.full((2, 5), 200)
    mask = torch.cat([torch.ones(2, 16), torch.zeros(2, 5)], 1).long()
    a = score(model, [{"input_ids": ids}], "act_mag")
    b = score(model, [{"input_ids": torch.cat([ids, junk], 1), "attention_mask": mask}], "act_mag")
    for n in a.values:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-8)


def test_act_mag_on_embedding_uses_token_frequency(llama):
    model, _ = llama
    ids = torch.tensor([[5, 5, 5, 9]])
    s = score(model, [{"input_ids": ids}], "act_mag", include_embeddings=True,
              modules="embed_tokens")
    w = model.get_input_embeddings().weight.detach().abs()
    expect = torch.zeros_like(w)
    expect[5] = w[5] * 0.75
    expect[9] = w[9] * 0.25
    torch.testing.assert_close(s["model.embed_tokens.weight"], expect)


def test_magnitude_needs_no_data(llama):
    model, _ = llama
    s = score(model, None, "magnitude")
    p = dict(model.named_parameters())
    for n in s.values:
        assert torch.equal(s[n], p[n].detach().abs())


def _exact_hessian_diag(model, batch, params):
    """The diagonal of the joint Hessian of the token-mean loss w.r.t. several tensors,
    coordinate by coordinate (batched Hessian-vector products with basis vectors)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        loss, n = summed_nll(model, batch)
        grads = torch.autograd.grad(loss / n, params, create_graph=True)
        sizes = [p.numel() for p in params]
        total = sum(sizes)
        offsets = [sum(sizes[:j]) for j in range(len(sizes))]
        diag = torch.empty(total)
        for start in range(0, total, 512):
            stop = min(total, start + 512)
            rows = torch.arange(stop - start)
            basis = torch.zeros(stop - start, total)
            basis[rows, rows + start] = 1.0
            outs = [basis[:, o:o + s].reshape(stop - start, *p.shape)
                    for o, s, p in zip(offsets, sizes, params, strict=True)]
            hs = torch.autograd.grad(grads, params, grad_outputs=outs, retain_graph=True,
                                     is_grads_batched=True)
            flat = torch.cat([h.reshape(stop - start, -1) for h in hs], 1)
            diag[start:stop] = flat[rows, rows + start]
    return diag


def test_hutchinson_over_several_tensors_converges_to_exact_hessian_diagonal(llama, batch_maker):
    model, _ = llama
    batch = batch_maker(1, 2, 24, seed=0)
    infos = (eligible_params(model, layers=[1], modules="k_proj")
             + eligible_params(model, layers=[1], modules="v_proj"))
    assert len(infos) == 2
    named = dict(model.named_parameters())
    exact = _exact_hessian_diag(model, batch[0], [named[i.name] for i in infos])
    errors, within = [], None
    for probes in (16, 64, 256):
        s = score(model, batch, "hutchinson_diag", params=infos, probes=probes, seed=1)
        est = torch.cat([s.signed[i.name].reshape(-1) for i in infos])
        assert torch.equal(torch.cat([s[i.name].reshape(-1) for i in infos]), est.abs())
        errors.append(float((est - exact).abs().mean() / exact.abs().mean()))
        se = torch.cat([s.stderr[i.name].reshape(-1) for i in infos])
        within = float(((est - exact).abs() <= 4 * se).float().mean())
    # error falls like 1/sqrt(probes): x16 probes -> about 1/4 of the error
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.4 * errors[0]
    # unbiased at the noise scale: the errors are what the reported standard error says
    # (mean |error| / mean se is about 0.8 for normal errors; a bias would inflate it),
    # and almost no error exceeds 4 se
    assert float((est - exact).abs().mean() / se.mean()) < 1.5
    assert within > 0.98


def test_hutchinson_is_seeded(llama, batches):
    model, _ = llama
    a = score(model, batches, "hutchinson_diag", probes=2, seed=3, modules="down_proj")
    b = score(model, batches, "hutchinson_diag", probes=2, seed=3, modules="down_proj")
    c = score(model, batches, "hutchinson_diag", probes=2, seed=4, modules="down_proj")
    n = a.params[0].name
    assert torch.equal(a[n], b[n]) and not torch.equal(a[n], c[n])
    assert a.info["probes"] == 2 and a.info["relative_stderr"] > 0


def test_bad_input(llama, batches):
    model, _ = llama
    with pytest.raises(NNError, match="unknown metric 'fisher'.*grad_x_weight.*wanda"):
        score(model, batches, "fisher")
    with pytest.raises(NNError, match="takes no option 'probes'"):
        score(model, batches, "grad_x_weight", probes=3)
    with pytest.raises(NNError, match="needs calibration batches"):
        score(model, None, "grad_x_weight")
    empty = [{"input_ids": torch.ones(1, 4, dtype=torch.long),
              "attention_mask": torch.zeros(1, 4, dtype=torch.long)}]
    with pytest.raises(NNError, match="no loss tokens"):
        score(model, empty, "grad_x_weight")
