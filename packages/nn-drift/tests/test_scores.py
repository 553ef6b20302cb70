from __future__ import annotations

import numpy as np
import pytest
import torch

from nn_core.errors import NNError
from nn_drift.data import load_examples, response_batches
from nn_drift.scores import compute_scores, load_scores, storage_bytes


@pytest.fixture(scope="module")
def batches(tiny_llama):
    _, tok = tiny_llama
    return response_batches(tok, load_examples("safety", limit=3), batch_size=2, max_length=160)


def _direct_snip(model, batches, names):
    """|W| ⊙ Σ_x |∂ℓ_x/∂W| by a plain loop over rows, ℓ_x = mean NLL over response tokens."""
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(params[n]) for n in names}
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            ids, mask, lab = (b[k][i:i + 1] for k in ("input_ids", "attention_mask", "labels"))
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], lab[0, 1:], ignore_index=-100)
            grads = torch.autograd.grad(loss, [params[n] for n in names])
            for n, g in zip(names, grads, strict=True):
                acc[n] += g.abs()
    return {n: params[n].detach().abs() * acc[n] for n in names}


def test_snip_and_wanda_match_direct_computation(tiny_llama, batches):
    model, _ = tiny_llama
    table = compute_scores(model, {"safety": batches}, ("snip", "wanda"))
    names = [p.name for p in table.params]
    assert len(names) == 2 * 7  # q,k,v,o,gate,up,down in 2 blocks
    direct = _direct_snip(model, batches, names)
    for n in names:
        torch.testing.assert_close(table.values[("safety", "snip")][n], direct[n],
                                   rtol=1e-4, atol=1e-9)
    # Wanda: |W_ij| * sqrt(sum over real tokens of x_j^2), x the module's input
    down = "model.layers.1.mlp.down_proj.weight"
    mod = model.get_submodule("model.layers.1.mlp.down_proj")
    sq = torch.zeros(mod.in_features, dtype=torch.float64)

    def hook(_m, args):
        nonlocal sq
        x = args[0]
        keep = current_mask.bool()
        sq += (x[keep].double() ** 2).sum(0)

    h = mod.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for b in batches:
                current_mask = b["attention_mask"]
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        h.remove()
    want = mod.weight.detach().abs() * sq.sqrt().float()[None, :]
    torch.testing.assert_close(table.values[("safety", "wanda")][down], want, rtol=1e-5, atol=1e-8)


def test_snip_sums_per_sample_not_running_totals(tiny_llama, batches):
    """Duplicating every sample exactly doubles true per-sample sums; the anchor's
    un-zeroed gradients (Σ_t |Σ_{s≤t} g_s|) would give 3x for [x, x] (|g| + |2g|)."""
    model, tok = tiny_llama
    one = response_batches(tok, load_examples("safety", limit=1), batch_size=1, max_length=160)
    two = [one[0], one[0]]
    a = compute_scores(model, {"d": one}, ("snip",)).values[("d", "snip")]
    b = compute_scores(model, {"d": two}, ("snip",)).values[("d", "snip")]
    for n in a:
        torch.testing.assert_close(b[n], 2 * a[n], rtol=1e-5, atol=1e-10)
    # and two different samples give Σ|g_x|, which is not |g_1| + |g_1 + g_2|
    ex = load_examples("safety", limit=2)
    bx = response_batches(tok, ex, batch_size=2, max_length=160)
    s = compute_scores(model, {"d": bx}, ("snip",)).values[("d", "snip")]
    n = "model.layers.0.mlp.up_proj.weight"
    params = dict(model.named_parameters())
    g = []
    for e in ex:
        bb = response_batches(tok, [e], batch_size=1, max_length=160)[0]
        logits = model(input_ids=bb["input_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], bb["labels"][0, 1:], ignore_index=-100)
        g.append(torch.autograd.grad(loss, params[n])[0])
    w = params[n].detach().abs()
    torch.testing.assert_close(s[n], w * (g[0].abs() + g[1].abs()), rtol=1e-4, atol=1e-10)
    running = w * (g[0].abs() + (g[0] + g[1]).abs())
    assert not torch.allclose(s[n], running, rtol=1e-3)


def test_storage_top_row_global_and_full(tiny_llama, batches, tmp_path):
    model, _ = tiny_llama
    table = compute_scores(model, {"safety": batches}, ("wanda",))
    vals = table.values[("safety", "wanda")]
    (tmp_path / "top").mkdir()
    table.save(tmp_path / "top", store="top", fraction=0.25, mode="row")
    t = load_scores(tmp_path / "top")
    ws = t.sparse[("safety", "wanda")]
    n = "model.layers.0.self_attn.q_proj.weight"
    idx = ws.indices_numpy(n)
    rows = idx // 64
    assert np.all(np.bincount(rows, minlength=64) == 16)  # int(64 * 0.25) per output row
    v = vals[n]
    thresh = torch.topk(v, 16, dim=1).values[:, -1]
    chosen = v.reshape(-1)[torch.from_numpy(idx)]
    assert bool((chosen >= thresh[torch.from_numpy(rows)]).all())
    (tmp_path / "glob").mkdir()
    table.save(tmp_path / "glob", store="top", fraction=0.01, mode="global")
    g = load_scores(tmp_path / "glob").sparse[("safety", "wanda")]
    allv = torch.cat([x.reshape(-1) for x in vals.values()])
    k = round(0.01 * allv.numel())
    assert len(g) == k
    assert min(float(g.scores(nm).min()) for nm in g.names()) >= float(torch.topk(allv, k).values[-1])
    (tmp_path / "full").mkdir()
    table.save(tmp_path / "full", store="full")
    f = load_scores(tmp_path / "full").values[("safety", "wanda")]
    for nm, x in vals.items():
        torch.testing.assert_close(f[nm], x, rtol=1e-3, atol=float(x.max()) * 1e-3)
    assert storage_bytes(tmp_path / "glob") < storage_bytes(tmp_path / "top") < \
        2 * storage_bytes(tmp_path / "full") + 10**6


def test_bad_input(tiny_llama, batches, tmp_path):
    model, _ = tiny_llama
    with pytest.raises(NNError, match="unknown metric"):
        compute_scores(model, {"s": batches}, ("fisher",))
    with pytest.raises(NNError, match="nn-drift score"):
        load_scores(tmp_path)
