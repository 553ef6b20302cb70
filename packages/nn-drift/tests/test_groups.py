from __future__ import annotations

import numpy as np
import pytest
import torch

from nn_core.errors import NNError
from nn_drift.groups import make_groups, neuron_scores, summary
from nn_drift.scores import ParamMeta, ScoreTable, load_scores

PARAMS = [ParamMeta("m.layers.0.attn.q.weight", 0, "linear", (6, 10)),
          ParamMeta("m.layers.0.mlp.down.weight", 0, "linear", (6, 20)),
          ParamMeta("m.layers.1.mlp.c_proj.weight", 1, "conv1d", (20, 6)),  # GPT-2 (in, out)
          ]
META = {"model_id": "synthetic", "model_type": "llama", "num_layers": 2,
        "layers_path": "m.layers", "widths": {"mlp_act": 20, "mlp_out": 6, "resid": 6},
        "down_weights": {"0": "m.layers.0.mlp.down.weight", "1": "m.layers.1.mlp.c_proj.weight"}}


def _table(seed=0) -> ScoreTable:
    g = torch.Generator().manual_seed(seed)
    t = ScoreTable(PARAMS, dict(META))
    for ds in ("safety", "utility"):
        t.values[(ds, "snip")] = {p.name: torch.rand(p.shape, generator=g) for p in PARAMS}
    return t


def _rows(p: ParamMeta, s: torch.Tensor) -> np.ndarray:
    return (s.t() if p.kind == "conv1d" else s).numpy()


def _brute_row_top(p, s, frac):
    """{(row, col)} of the int(n_in * frac) largest entries of every output row."""
    m = _rows(p, s)
    k = int(m.shape[1] * frac)
    return {(i, j) for i in range(m.shape[0]) for j in np.argsort(-m[i], kind="stable")[:k]}


def _pairs(p, flat):
    if p.kind == "conv1d":  # (in, out): flat = col * n_out + row
        return {(int(f % p.shape[1]), int(f // p.shape[1])) for f in flat}
    return {(int(f // p.shape[1]), int(f % p.shape[1])) for f in flat}


def test_set_diff_per_row_matches_brute_force():
    t = _table()
    g = make_groups(t, ["set-diff", "snip-top", "utility-top"], k=0.2, q=0.5, p=0.3)
    for p in PARAMS:
        s, u = t.values[("safety", "snip")][p.name], t.values[("utility", "snip")][p.name]
        want = _brute_row_top(p, s, 0.5) - _brute_row_top(p, u, 0.3)
        got = _pairs(p, g["set-diff"].indices_numpy(p.name)) if p.name in g["set-diff"] else set()
        assert got == want and want
        assert _pairs(p, g["snip-top"].indices_numpy(p.name)) == _brute_row_top(p, s, 0.2)
        assert _pairs(p, g["utility-top"].indices_numpy(p.name)) == _brute_row_top(p, u, 0.2)


def test_set_diff_global_matches_brute_force():
    t = _table(1)
    g = make_groups(t, ["set-diff"], q=0.3, p=0.2, scope="global")["set-diff"]

    def top(ds, frac):
        allv = [(float(v), p.name, i) for p in PARAMS
                for i, v in enumerate(t.values[(ds, "snip")][p.name].reshape(-1).tolist())]
        allv.sort(key=lambda x: -x[0])
        return {(n, i) for _, n, i in allv[:round(frac * len(allv))]}

    want = top("safety", 0.3) - top("utility", 0.2)
    got = {(n, int(i)) for n in g.names() for i in g.indices_numpy(n)}
    assert got == want and want


def test_random_same_counts_per_matrix_and_seeded():
    t = _table()
    a = make_groups(t, ["set-diff", "random"], q=0.5, p=0.3, seed=3)
    b = make_groups(t, ["random"], q=0.5, p=0.3, seed=3)["random"]
    c = make_groups(t, ["random"], q=0.5, p=0.3, seed=4)["random"]
    assert a["random"].counts() == a["set-diff"].counts()
    assert a["random"] == b and a["random"] != c
    s = summary(a)
    assert s["sizes"]["set-diff"]["total"] == len(a["set-diff"])
    assert 0 <= s["jaccard"]["set-diff|random"] < 1


def test_neuron_groups():
    t = _table(2)
    ns = neuron_scores(t, "safety", "snip", "mlp_act")
    s0 = t.values[("safety", "snip")]["m.layers.0.mlp.down.weight"]
    s1 = t.values[("safety", "snip")]["m.layers.1.mlp.c_proj.weight"]
    torch.testing.assert_close(ns[0], s0.sum(0))
    torch.testing.assert_close(ns[1], s1.sum(1))  # conv1d: input channels are rows
    g = make_groups(t, ["set-diff", "random"], q=0.5, p=0.25, granularity="neurons")
    nu = neuron_scores(t, "utility", "snip", "mlp_act")
    for layer in (0, 1):
        ts = set(np.argsort(-ns[layer].numpy(), kind="stable")[:10].tolist())
        tu = set(np.argsort(-nu[layer].numpy(), kind="stable")[:5].tolist())
        assert set(g["set-diff"][layer, "mlp_act"].tolist()) == ts - tu
    assert g["random"].layer_counts() == g["set-diff"].layer_counts()
    out = make_groups(t, ["snip-top"], k=0.5, granularity="neurons", site="mlp_out")["snip-top"]
    assert out.sites == ("mlp_out",) and len(out[0, "mlp_out"]) == 3


def test_empty_and_bad_input():
    t = _table()
    for ds in ("safety", "utility"):
        t.values[(ds, "snip")] = t.values[("safety", "snip")]
    with pytest.raises(NNError, match="set-diff group is empty"):
        make_groups(t, ["set-diff"], q=0.1, p=0.2)
    with pytest.raises(NNError, match="unknown method"):
        make_groups(t, ["top"])
    with pytest.raises(NNError, match="no wanda scores"):
        make_groups(t, ["snip-top"], metric="wanda")


def test_top_storage_gives_the_same_groups(tmp_path):
    t = _table(5)
    t.save(tmp_path, store="top", fraction=0.5, mode="row")
    s = load_scores(tmp_path)
    a = make_groups(t, ["set-diff", "snip-top"], k=0.2, q=0.5, p=0.3)
    b = make_groups(s, ["set-diff", "snip-top"], k=0.2, q=0.5, p=0.3)
    assert a["set-diff"] == b["set-diff"] and a["snip-top"] == b["snip-top"]
    with pytest.raises(NNError, match="store full"):
        make_groups(s, ["snip-top"], k=0.6)
    with pytest.raises(NNError, match="store full"):
        make_groups(s, ["snip-top"], granularity="neurons")
