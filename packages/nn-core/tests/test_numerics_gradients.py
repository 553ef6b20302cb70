from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nn_core.errors import NNError
from nn_core.model.loading import load_model
from nn_core.numerics.gradients import (
    abs_grad_sum,
    hutchinson_diagonal,
    mean_gradient,
    per_sample_gradients,
    squared_grad_mean,
)
from nn_core.numerics.loss import summed_nll


@pytest.fixture(scope="module")
def llama():
    model, _ = load_model("tiny-llama", device="cpu", dtype="float32")
    return model


def _params(model, *parts):
    return [(n, p) for n, p in model.named_parameters() if any(x in n for x in parts)]


def _batches(seed=0, shapes=((3, 20), (2, 12))):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, s, generator=g)} for s in shapes]


def _row_grads(model, tensors, batches):
    """Reference: one backward per row of its token-mean loss (the definition)."""
    out = []
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            row = {k: v[i:i + 1] for k, v in b.items()}
            loss, n = summed_nll(model, row)
            if n:
                out.append([g / n for g in torch.autograd.grad(loss, tensors)])
    return out


def test_mean_gradient_is_the_token_weighted_mean_loss_gradient(llama):
    named = _params(llama, "layers.1.mlp", "layers.0.self_attn.q_proj")
    tensors = [p for _, p in named]
    batches = _batches()
    s = mean_gradient(llama, named, batches, progress=False)
    total, n = 0.0, 0
    for b in batches:
        loss, k = summed_nll(llama, b)
        total, n = total + loss, n + k
    ref = torch.autograd.grad(total / n, tensors)
    assert s.names == [x for x, _ in named] and s.n_tokens == 3 * 19 + 2 * 11
    for v, r in zip(s.values, ref, strict=True):
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, r, rtol=1e-4, atol=1e-9)
    # the same tokens in other batches: the same mean gradient
    rows = [{"input_ids": b["input_ids"][i:i + 1]} for b in batches for i in range(len(b["input_ids"]))]
    s2 = mean_gradient(llama, tensors, rows, progress=False)
    for a, b in zip(s.values, s2.values, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("method", ["loop", "vmap"])
def test_abs_grad_sum_is_the_sum_of_absolute_per_sample_gradients(llama, method):
    named = _params(llama, "layers.1.mlp.down_proj", "layers.0.self_attn.v_proj")
    tensors = [p for _, p in named]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (4, 16), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100  # prompt tokens carry no loss
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # right padding
    mask[3, 5:] = 0  # padding into the prompt: this row has no loss token and is skipped
    batches = [{"input_ids": ids, "attention_mask": mask, "labels": labels}, *_batches(4, ((2, 10),))]
    s = abs_grad_sum(llama, named, batches, method=method, progress=False)
    per_row = _row_grads(llama, tensors, batches)
    assert s.n_units == len(per_row) == 5 and s.unit == "sample"
    assert s.info["method"] == method
    for j, v in enumerate(s.values):
        expect = torch.stack([r[j].abs() for r in per_row]).sum(0)
        torch.testing.assert_close(v, expect, rtol=1e-4, atol=1e-8)
        # not the absolute value of the summed gradient (signs cancel there) ...
        summed = torch.stack([r[j] for r in per_row]).sum(0).abs()
        assert (summed <= v + 1e-6).all() and (summed < 0.9 * v).float().mean() > 0.2
        # ... nor the sum of absolute running totals Σ_t |Σ_{s<=t} g_s|
        running = torch.stack([r[j] for r in per_row]).cumsum(0).abs().sum(0)
        assert not torch.allclose(v, running, rtol=1e-2)


def test_vmap_and_loop_agree_and_left_padding_falls_back(llama):
    named = _params(llama, "layers.0.mlp.up_proj", "layers.1.self_attn.o_proj")
    ids = torch.randint(0, 256, (3, 14), generator=torch.Generator().manual_seed(5))
    left = torch.ones_like(ids)
    left[0, :4] = 0  # left padding: vmap cannot run it, the loop does
    for batch in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": left}):
        a = squared_grad_mean(llama, named, [batch], method="loop", progress=False)
        b = squared_grad_mean(llama, named, [batch], method="vmap", chunk_size=2, progress=False)
        assert a.n_units == b.n_units == 3
        for x, y in zip(a.values, b.values, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-12)
    # chunks of per-sample gradients: summed losses, leading sample dimension
    chunks = list(per_sample_gradients(llama, named, {"input_ids": ids}, method="vmap",
                                       chunk_size=2))
    assert [c.tolist() for _, c in chunks] == [[13, 13], [13]]
    assert chunks[0][0][0].shape == (2, *named[0][1].shape)


def test_fisher_per_sample_is_the_mean_of_squared_row_gradients_and_batch_size_free(llama):
    named = _params(llama, "layers.1.mlp.gate_proj")
    tensors = [p for _, p in named]
    batches = _batches(7, ((4, 16),))
    fs = squared_grad_mean(llama, named, batches, progress=False)
    per_row = _row_grads(llama, tensors, batches)
    expect = torch.stack([r[0] ** 2 for r in per_row]).mean(0)
    torch.testing.assert_close(fs.values[0], expect, rtol=1e-4, atol=1e-12)
    assert fs.n_units == 4 and fs.info["per_sample"] is True
    # per batch: the squared gradient of the batch's token-mean loss, divided by #batches
    fb = squared_grad_mean(llama, named, batches, per_sample=False, progress=False)
    loss, n = summed_nll(llama, batches[0])
    (gb,) = torch.autograd.grad(loss / n, tensors)
    torch.testing.assert_close(fb.values[0], gb ** 2, rtol=1e-4, atol=1e-12)
    assert fb.n_units == 1 and fb.unit == "batch"
    # per batch is far smaller (averaging before squaring), per sample ignores batching
    assert float(fb.values[0].sum()) < 0.6 * float(fs.values[0].sum())
    singles = [{"input_ids": batches[0]["input_ids"][i:i + 1]} for i in range(4)]
    fs1 = squared_grad_mean(llama, named, singles, progress=False)
    torch.testing.assert_close(fs1.values[0], fs.values[0], rtol=1e-4, atol=1e-12)
    fb1 = squared_grad_mean(llama, named, singles, per_sample=False, progress=False)
    torch.testing.assert_close(fb1.values[0], fs.values[0], rtol=1e-4, atol=1e-12)


class _Tiny(nn.Module):
    """A two-layer net on one-hot tokens: small enough for the exact Hessian."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(5, 6, generator=g))
        self.b1 = nn.Parameter(torch.randn(5, generator=g) * 0.1)
        self.w2 = nn.Parameter(torch.randn(6, 5, generator=g))

    def loss(self, params, ids):
        w1, b1, w2 = params
        x = F.one_hot(ids[:, :-1], 6).double()
        logits = torch.tanh(x @ w1.T + b1) @ w2.T
        return F.cross_entropy(logits.reshape(-1, 6), ids[:, 1:].reshape(-1), reduction="sum")


def _tiny_loss(model, batch):
    ids = batch["input_ids"]
    return model.loss([model.w1, model.b1, model.w2], ids), ids[:, 1:].numel()


def test_hutchinson_over_several_tensors_converges_to_the_exact_diagonal():
    model = _Tiny().double()
    tensors = [model.w1, model.b1, model.w2]
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 6, (3, 9), generator=g)} for _ in range(2)]
    n = sum(b["input_ids"][:, 1:].numel() for b in batches)
    # exact diagonal of the joint Hessian of (1/N) Σ_b L_b, one coordinate at a time
    flat = torch.cat([t.detach().reshape(-1) for t in tensors]).requires_grad_(True)
    sizes = [t.numel() for t in tensors]

    def total(v):
        parts = [p.reshape(t.shape) for p, t in zip(v.split(sizes), tensors, strict=True)]
        return sum(model.loss(parts, b["input_ids"]) for b in batches) / n

    (grad,) = torch.autograd.grad(total(flat), flat, create_graph=True)
    exact = torch.stack([torch.autograd.grad(grad[i], flat, retain_graph=True)[0][i]
                         for i in range(flat.numel())])
    hess = torch.autograd.functional.hessian(total, flat.detach())
    torch.testing.assert_close(torch.diagonal(hess), exact)
    # the tensors interact (cross-tensor Hessian blocks), so a joint probe is not trivial
    assert hess[:30, 35:].abs().max() > 0.01
    errors = []
    for probes in (4, 64, 1024):
        s = hutchinson_diagonal(model, tensors, batches, probes=probes, seed=2,
                                loss_fn=_tiny_loss, progress=False)
        est = torch.cat([v.double().reshape(-1) for v in s.values])
        errors.append(float((est - exact).abs().mean()))
        se = torch.cat([v.double().reshape(-1) for v in s.stderr])
    # error shrinks like 1/sqrt(probes) (x256 probes: about 1/16 of the error)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.15 * errors[0]
    torch.testing.assert_close(est, exact, rtol=0.1, atol=0.02)
    # the reported standard error is honest: the errors are a few se at most
    assert float(((est - exact).abs() <= 4 * se + 1e-9).double().mean()) > 0.97
    assert s.n_tokens == n and s.info["relative_stderr"] > 0


def test_hutchinson_on_the_tiny_llama_is_seeded_and_finite(llama):
    named = _params(llama, "layers.1.mlp.down_proj", "layers.1.input_layernorm")
    a = hutchinson_diagonal(llama, named, _batches(), probes=2, seed=3, progress=False)
    b = hutchinson_diagonal(llama, named, _batches(), probes=2, seed=3, progress=False)
    c = hutchinson_diagonal(llama, named, _batches(), probes=2, seed=4, progress=False)
    assert all(torch.isfinite(v).all() for v in a.values + a.stderr)
    assert torch.equal(a.values[0], b.values[0]) and not torch.equal(a.values[0], c.values[0])
    one = hutchinson_diagonal(llama, named, _batches(), probes=1, progress=False)
    assert one.stderr is None


def test_all_reduce_sums_counts_with_the_statistics(llama):
    """Two identical 'ranks': means are unchanged, sums and counts double."""
    named = _params(llama, "layers.0.mlp.down_proj")

    def twice(tensors):
        for t in tensors:
            t.mul_(2)

    batches = _batches(9, ((2, 12),))
    for fn in (mean_gradient, squared_grad_mean):
        one = fn(llama, named, batches, progress=False)
        two = fn(llama, named, batches, all_reduce=twice, progress=False)
        torch.testing.assert_close(one.values[0], two.values[0])
        assert two.n_tokens == 2 * one.n_tokens
    one = abs_grad_sum(llama, named, batches, progress=False)
    two = abs_grad_sum(llama, named, batches, all_reduce=twice, progress=False)
    torch.testing.assert_close(2 * one.values[0], two.values[0])
    assert two.n_units == 2 * one.n_units == 4


def test_bf16_model_accumulates_in_float32():
    model, _ = load_model("tiny-llama", device="cpu", dtype="bfloat16")
    ref, _ = load_model("tiny-llama", device="cpu", dtype="float32")
    name = "model.layers.1.mlp.down_proj.weight"
    batches = _batches(2, ((2, 16),))
    lo = squared_grad_mean(model, [dict(model.named_parameters())[name]], batches, progress=False)
    hi = squared_grad_mean(ref, [dict(ref.named_parameters())[name]], batches, progress=False)
    assert lo.values[0].dtype == torch.float32 and torch.isfinite(lo.values[0]).all()
    corr = torch.corrcoef(torch.stack([lo.values[0].reshape(-1), hi.values[0].reshape(-1)]))[0, 1]
    assert corr > 0.9


def test_state_is_restored_and_bad_input_is_refused(llama):
    named = _params(llama, "layers.0.mlp.down_proj")
    p = named[0][1]
    p.requires_grad_(False)
    llama.train()
    try:
        squared_grad_mean(llama, named, _batches(), progress=False)
        assert llama.training and not p.requires_grad and p.grad is None
    finally:
        p.requires_grad_(True)
        llama.eval()
    with pytest.raises(NNError, match="unknown per-sample method 'fast'"):
        abs_grad_sum(llama, named, _batches(), method="fast")
    with pytest.raises(NNError, match="no tensors"):
        mean_gradient(llama, [], _batches())
    empty = [{"input_ids": torch.ones(1, 4, dtype=torch.long),
              "attention_mask": torch.zeros(1, 4, dtype=torch.long)}]
    with pytest.raises(NNError, match="no loss tokens"):
        abs_grad_sum(llama, named, empty)
    with pytest.raises(NNError, match="at least 1 probe"):
        hutchinson_diagonal(llama, named, _batches(), probes=0)
