from __future__ import annotations

import numpy as np
import pytest
import torch

from nn_core.errors import NNError
from nn_core.select.weightset import WeightSet
from nn_sensitivity.metrics import Scores, score
from nn_sensitivity.params import ParamInfo
from nn_sensitivity.rank import bottom_k, check_controls, random_k, select, top_k


def _synthetic(shapes, seed=0, layers=None) -> Scores:
    g = torch.Generator().manual_seed(seed)
    params, values = [], {}
    for j, shape in enumerate(shapes):
        layer = layers[j] if layers else j
        name = f"model.layers.{layer}.m{j}.weight"
        params.append(ParamInfo(name, name.removesuffix(".weight"), layer, "linear", shape))
        values[name] = torch.rand(shape, generator=g)
    return Scores("synthetic", params, values, {"model": {"model_id": "synthetic"}})


def _flatten_sort(s: Scores, k: int, largest=True) -> set[tuple[str, int]]:
    keys = [(p.name, i) for p in s.params for i in range(p.numel)]
    flat = torch.cat([s[p.name].reshape(-1) for p in s.params])
    idx = torch.topk(flat, k, largest=largest).indices.tolist()
    return {keys[i] for i in idx}


def _keys(r) -> set[tuple[str, int]]:
    return {(r.params[int(p)].name, int(f)) for p, f in zip(r.pos, r.flat, strict=True)}


def test_global_top_and_bottom_k_match_flatten_and_sort():
    s = _synthetic([(30, 40), (7, 5), (100, 3), (1, 1)])
    for k in (1, 17, 500, 1336):
        r = top_k(s, k)
        assert len(r) == k and _keys(r) == _flatten_sort(s, k)
        assert np.all(np.diff(r.score) <= 0)
        b = bottom_k(s, k)
        assert len(b) == k and _keys(b) == _flatten_sort(s, k, largest=False)
        assert np.all(np.diff(b.score) >= 0)
    r = top_k(s, 10)
    for j in range(10):
        name = r.params[int(r.pos[j])].name
        assert s[name].reshape(-1)[int(r.flat[j])] == pytest.approx(float(r.score[j]))


def test_per_layer_top_k_is_k_per_decoder_block():
    s = _synthetic([(10, 10), (10, 4), (20, 5), (3, 3)], layers=[0, 0, 1, 1])
    r = top_k(s, 12, "per-layer")
    assert len(r) == 24
    for layer, members in ((0, [0, 1]), (1, [2, 3])):
        sub = _synthetic([(10, 10), (10, 4), (20, 5), (3, 3)], layers=[0, 0, 1, 1])
        sub.params = [sub.params[j] for j in members]
        expect = _flatten_sort(sub, 12)
        got = {k for k in _keys(r) if k[0].startswith(f"model.layers.{layer}.")}
        assert got == expect
    assert set(top_k(s, 5, "per-layer").to_weightset().layer_counts().values()) == {5}
    b = bottom_k(s, 3, "per-layer")
    assert b.to_weightset().layer_counts() == {0: 3, 1: 3}


def test_prefix_is_the_smaller_k():
    s = _synthetic([(30, 40), (7, 5)])
    big = top_k(s, 200)
    assert _keys(big.prefix(20)) == _keys(top_k(s, 20))
    pl = top_k(s, 30, "per-layer").prefix(4)
    assert _keys(pl) == _keys(top_k(s, 4, "per-layer"))
    with pytest.raises(NNError, match="larger than this ranking"):
        big.prefix(201)


def test_random_k_is_same_size_seeded_and_uniform():
    s = _synthetic([(50, 20), (10, 10), (1, 100)])
    a, b, c = random_k(s, 300, seed=1), random_k(s, 300, seed=1), random_k(s, 300, seed=2)
    assert len(a) == 300 and len(_keys(a)) == 300
    assert _keys(a) == _keys(b) and _keys(a) != _keys(c)
    # scores carried are the real scores of the drawn weights
    for j in range(20):
        name = a.params[int(a.pos[j])].name
        assert s[name].reshape(-1)[int(a.flat[j])] == pytest.approx(float(a.score[j]))
    # uniform over the concatenated index space: tensor shares follow tensor sizes
    counts = np.zeros(3)
    for seed in range(200):
        r = random_k(s, 100, seed=seed)
        counts += np.bincount(r.pos, minlength=3)
    share = counts / counts.sum()
    np.testing.assert_allclose(share, [1000 / 1200, 100 / 1200, 100 / 1200], atol=0.01)
    # prefixes of the draw are themselves uniform samples of the smaller size
    assert len(a.prefix(10)) == 10 and _keys(a.prefix(10)) <= _keys(a)


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1 % point of chi-square(df) (Wilson-Hilferty approximation)."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def _chi2_uniform(counts: np.ndarray, draws: int, k: int) -> float:
    """Pearson's statistic of per-index selection counts against uniform k-of-n draws,
    scaled by 1/(1 - k/n) (without replacement each count has variance D p (1 - p))."""
    n = counts.size
    expected = draws * k / n
    return float(((counts - expected) ** 2 / expected).sum() / (1 - k / n))


def test_random_k_selects_every_index_equally_often():
    # tensors of uneven sizes, including a single weight and a single row
    s = _synthetic([(7, 9), (1, 1), (5, 4), (1, 13)])
    n = 63 + 1 + 20 + 13
    draws, k = 3000, 12
    counts = np.zeros(n)
    first = np.zeros(n)
    offsets = np.cumsum([0] + [p.numel for p in s.params])[:-1]
    for seed in range(draws):
        r = random_k(s, k, seed=seed)
        flat = offsets[r.pos] + r.flat
        assert np.unique(flat).size == k  # without replacement
        counts += np.bincount(flat, minlength=n)
        first += np.bincount(flat[:3], minlength=n)  # the K=3 prefix
    crit = _chi2_critical(n - 1)
    assert _chi2_uniform(counts, draws, k) < crit
    assert _chi2_uniform(first, draws, 3) < crit
    # the test has power: a draw that never picks one index is rejected
    biased = counts.copy()
    biased[5] = 0
    assert _chi2_uniform(biased, draws, k) > crit
    # per-layer mode: uniform inside each block
    pl = _synthetic([(4, 5), (2, 3), (3, 3)], layers=[0, 0, 1])
    c0 = np.zeros(26)
    c1 = np.zeros(9)
    for seed in range(1500):
        r = random_k(pl, 4, "per-layer", seed=seed)
        for p, f in zip(r.pos, r.flat, strict=True):
            if p == 2:
                c1[f] += 1
            else:
                c0[(0 if p == 0 else 20) + f] += 1
    assert _chi2_uniform(c0, 1500, 4) < _chi2_critical(25)
    assert _chi2_uniform(c1, 1500, 4) < _chi2_critical(8)


def test_random_k_per_layer_draws_within_each_block():
    s = _synthetic([(10, 10), (10, 4), (20, 5), (3, 3)], layers=[0, 0, 1, 1])
    r = random_k(s, 7, "per-layer", seed=0)
    assert r.to_weightset().layer_counts() == {0: 7, 1: 7}


def test_k_larger_than_eligible_and_bad_mode():
    s = _synthetic([(3, 3), (2, 2)], layers=[0, 1])
    with pytest.raises(NNError, match="larger than the 13 eligible weights"):
        top_k(s, 14)
    with pytest.raises(NNError, match="larger than the 4 weights in layer 1"):
        random_k(s, 5, "per-layer")
    with pytest.raises(NNError, match="unknown ranking mode 'layer'"):
        top_k(s, 2, "layer")
    with pytest.raises(NNError, match="positive integer"):
        top_k(s, 0)
    with pytest.raises(NNError, match="unknown control 'top_k'.*random_k, bottom_k"):
        check_controls("random_k,top_k")
    assert check_controls("random_k,bottom_k") == ["random_k", "bottom_k"]


def test_select_returns_weightsets_that_validate(llama, batches):
    model, _ = llama
    s = score(model, batches, "grad_x_weight")
    top = select(s, 50)
    assert isinstance(top, WeightSet) and len(top) == 50 and top.has_scores
    top.validate(model)
    for kind in ("random_k", "bottom_k"):
        ctrl = select(s, 50, kind, seed=0)
        assert len(ctrl) == 50
        ctrl.validate(model)
    assert top.meta["parameters"]["metric"] == "grad_x_weight"
    # scores stored in the set are the metric's scores at those indices
    name = top.names()[0]
    torch.testing.assert_close(top.scores(name), s[name].reshape(-1)[top.indices(name)])
    # every top-K score is at least every bottom-K score, over all tensors together
    bottom = select(s, 50, "bottom_k")
    top_min = min(float(top.scores(n).min()) for n in top.names())
    bottom_max = max(float(bottom.scores(n).max()) for n in bottom.names())
    assert top_min >= bottom_max and top_min > 0
    rows = top_k(s, 50).rows(5)
    assert [r["rank"] for r in rows] == [0, 1, 2, 3, 4]
    shape = dict(model.named_parameters())[rows[0]["name"]].shape
    i, j = np.unravel_index(rows[0]["flat_index"], shape)
    assert rows[0]["index"] == f"({i}, {j})" and rows[0]["layer"] in (0, 1)
