from __future__ import annotations

import math

import numpy as np
import pytest

from nn_core.errors import NNError
from nn_core.select.formats import neuronset_from_loki
from nn_kva_loki.kva_file import read_kva
from nn_kva_loki.select import (
    check_quota,
    lowest_k_mask,
    minmax,
    per_layer_k,
    select_channels,
    select_from_arrays,
)


# ------------------------------------------------------------------ brute-force reference
def _z_row(values: list[float], score: str) -> list[float]:
    s = [abs(float(v)) if score == "abs" else float(v) for v in values]
    lo, hi = min(s), max(s)
    return [0.0 if hi == lo else (v - lo) / (hi - lo) for v in s]


def brute_force(data: np.ndarray, quota: float, strategy: str, score: str) -> list[list[int]]:
    """Per sample, per layer, in plain Python: the docstring's definition, nothing vectorised."""
    n, L, H = data.shape
    counts = [[0] * H for _ in range(L)]
    zsum = [[0.0] * H for _ in range(L)]
    k = math.floor(quota / 100 * H + 0.5) if strategy == "layer-balanced" else None
    for i in range(n):
        for layer in range(L):
            z = _z_row(data[i, layer].tolist(), score)
            for c in range(H):
                zsum[layer][c] += z[c]
            if k is not None:
                for _, c in sorted((z[c], c) for c in range(H))[:k]:
                    counts[layer][c] += 1
    if strategy == "layer-balanced":
        return [sorted(sorted(range(H), key=lambda c, la=layer: (-counts[la][c], zsum[la][c], c))[:k])
                for layer in range(L)]
    total = math.floor(quota / 100 * L * H + 0.5)
    chosen = sorted((zsum[layer][c], layer, c) for layer in range(L) for c in range(H))[:total]
    return [sorted(c for _, lay, c in chosen if lay == layer) for layer in range(L)]


def _tied(shape, seed):
    """Attributions with many ties: a few integer levels, some constant rows, signs mixed."""
    rng = np.random.default_rng(seed)
    data = rng.integers(-3, 4, size=shape).astype(np.float32)
    data[0, 0] = 2.0  # a constant row
    data[1 % shape[0], -1, : shape[2] // 2] = data[1 % shape[0], -1, shape[2] // 2:][::-1]
    return data


@pytest.mark.parametrize("strategy", ["layer-balanced", "global"])
@pytest.mark.parametrize("score", ["signed", "abs"])
@pytest.mark.parametrize("kind", ["normal", "tied"])
@pytest.mark.parametrize("quota", [5, 12.5, 30, 100])
def test_matches_brute_force(strategy, score, kind, quota):
    shape = (23, 4, 16)
    data = (np.random.default_rng(int(quota * 10)).standard_normal(shape).astype(np.float32) if kind == "normal"
            else _tied(shape, int(quota * 10)))
    want = brute_force(data, quota, strategy, score)
    kept, *_ = select_from_arrays(iter([data]), 4, 16, quota=quota, strategy=strategy, score=score)
    assert [x.tolist() for x in kept] == want


def test_chunk_size_does_not_change_the_result(tmp_path, make_kva):
    data = np.random.default_rng(1).standard_normal((37, 3, 16)).astype(np.float32)
    data[:, :, 5] = data[:, :, 6]  # equal channels: ties decided by the sums
    path = make_kva(tmp_path / "kva.h5", data)
    for strategy in ("layer-balanced", "global"):
        ref = select_channels(path, 25, strategy=strategy, chunk_size=1000)
        for chunk in (1, 3, 8, 37):
            sel = select_channels(path, 25, strategy=strategy, chunk_size=chunk)
            assert sel.neuronset == ref.neuronset
            np.testing.assert_array_equal(sel.counts, ref.counts)
            np.testing.assert_array_equal(sel.mean_z, ref.mean_z)  # bit-identical


def test_layer_balanced_counts_and_frequencies(tmp_path, make_kva):
    data = np.random.default_rng(2).standard_normal((10, 3, 16)).astype(np.float32)
    data[:, 1, 7] = -50.0  # always the lowest signed score of layer 1
    sel = select_channels(make_kva(tmp_path / "kva.h5", data), 25)
    assert sel.k == 4 and all(len(sel.neuronset.indices(layer, "mlp_out")) == 4 for layer in range(3))
    assert sel.counts.sum() == 10 * 3 * 4  # k chosen per sample and layer
    assert sel.counts[1, 7] == 10 and sel.frequencies[1, 7] == 1.0
    assert 7 in sel.neuronset.indices(1, "mlp_out").tolist()


def test_signed_and_abs_differ_as_documented():
    rng = np.random.default_rng(3)
    data = rng.uniform(0.5, 1.0, size=(12, 1, 16)).astype(np.float32)
    data[:, 0, 3] = -5.0   # strongly negative: lowest signed, highest |A|
    data[:, 0, 9] = 0.0    # no effect: lowest |A|
    signed, *_ = select_from_arrays([data], 1, 16, quota=6.25, score="signed")
    absval, *_ = select_from_arrays([data], 1, 16, quota=6.25, score="abs")
    assert signed[0].tolist() == [3] and absval[0].tolist() == [9]


def test_global_spends_the_quota_over_all_layers():
    data = np.random.default_rng(4).standard_normal((9, 3, 16)).astype(np.float32)
    data[:, 2, :] -= np.linspace(0, 1, 16)[::-1]  # make layer 2 differ in shape only
    data[:, 0, :] = np.arange(16)  # layer 0: z = c/15 exactly; channels 0.. are the lowest
    kept, counts, mean_z, n, k = select_from_arrays([data], 3, 16, quota=20, strategy="global")
    assert k == round(0.2 * 48 + 1e-9) == 10 and sum(len(x) for x in kept) == 10
    assert counts.sum() == 0 and n == 9
    assert kept[0].tolist() == list(range(len(kept[0])))
    np.testing.assert_allclose(mean_z[0], np.arange(16) / 15)


def test_lowest_k_mask_breaks_ties_by_index():
    z = np.array([[0.5, 0.0, 0.5, 0.5, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = lowest_k_mask(z, 3)
    assert mask[0].tolist() == [True, True, True, False, False]
    assert mask[1].tolist() == [True, True, True, False, False]
    assert lowest_k_mask(z, 5).all()


def test_minmax_bounds_and_constant_rows():
    s = np.array([[2.0, 4.0, 3.0], [7.0, 7.0, 7.0]])
    np.testing.assert_array_equal(minmax(s.copy()), [[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]])


def test_quota_validation_and_rounding():
    for bad in (0, -1, 100.5, float("nan"), float("inf"), "abc", None, True):
        with pytest.raises(NNError):
            check_quota(bad)
    assert check_quota("12.5") == 12.5 and check_quota(100) == 100.0
    # round half up: 25% of 10 = 2.5 -> 3; 15% -> 1.5 -> 2; 14% -> 1.4 -> 1
    assert [per_layer_k(q, 10) for q in (25, 15, 14, 100)] == [3, 2, 1, 10]
    with pytest.raises(NNError, match="rounds to 0"):
        per_layer_k(1, 10)
    with pytest.raises(NNError, match="rounds to 0"):
        select_from_arrays([np.zeros((1, 1, 10))], 1, 10, quota=1, strategy="global")
    with pytest.raises(NNError, match="strategy"):
        select_from_arrays([np.zeros((1, 1, 10))], 1, 10, quota=50, strategy="random")
    with pytest.raises(NNError, match="score"):
        select_from_arrays([np.zeros((1, 1, 10))], 1, 10, quota=50, score="square")


def test_non_finite_and_empty_input_are_refused():
    data = np.zeros((4, 2, 8), dtype=np.float32)
    data[2, 1, 3] = np.nan
    with pytest.raises(NNError, match="sample 2 holds non-finite"):
        select_from_arrays([data[:1], data[1:]], 2, 8, quota=50)
    with pytest.raises(NNError, match="no complete sample"):
        select_from_arrays([], 2, 8, quota=50)


def test_neuronset_meta_positions_and_model(tmp_path, make_kva):
    from nn_core.model.adapters import model_signature
    from nn_core.model.loading import load_model

    model, _ = load_model("tiny-llama", device="cpu", dtype="float32")
    sig = model_signature(model)
    L, H = sig["num_layers"], sig["widths"]["mlp_out"]
    data = np.random.default_rng(5).standard_normal((6, L, H)).astype(np.float32)
    path = make_kva(tmp_path / "kva.h5", data, signature=sig)
    sel = select_channels(path, 10, score="abs")
    ns = sel.neuronset
    ns.validate(model)  # made without the model, fits it
    meta = ns.meta
    assert meta["model_id"] == sig["model_id"] and meta["num_layers"] == L and meta["sites"] == ["mlp_out"]
    p = meta["parameters"]
    assert (p["quota"], p["strategy"], p["score"], p["source"]) == (10.0, "layer-balanced", "abs", str(path))
    assert p["kva"]["dataset"] == "synthetic" and p["num_samples"] == 6
    paths = sel.save(tmp_path / "out", plot=True)
    positions = sel.positions()
    assert len(positions) == L and all(len(x) == per_layer_k(10, H) for x in positions)
    back = neuronset_from_loki(paths["positions"], model=model)  # the LoKI file loads as LoKI's own would
    assert back == ns
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with np.load(paths["frequencies"]) as z:
        np.testing.assert_array_equal(z["counts"], sel.counts)


def test_interrupted_file_needs_allow_incomplete(tmp_path, make_kva):
    data = np.random.default_rng(6).standard_normal((5, 3, 16)).astype(np.float32)
    path = make_kva(tmp_path / "kva.h5", data, finish=False)
    with pytest.raises(NNError, match="interrupted.*--allow-incomplete"):
        select_channels(path, 10)
    sel = select_channels(path, 10, allow_incomplete=True)
    assert sel.num_samples == 5 and sel.parameters["complete"] is False
    with read_kva(path) as kva:
        assert select_channels(kva, 10, allow_incomplete=True).neuronset == sel.neuronset
