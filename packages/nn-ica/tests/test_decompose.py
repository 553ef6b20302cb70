from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from nn_core.errors import NNError
from nn_ica.decompose import (
    decompose,
    match_columns,
    orient,
    select_channels,
    standardise_,
)


def mixed_sources(n=4000, p=60, seed=0, noise=0.05):
    rng = np.random.default_rng(seed)
    sources = np.stack([
        rng.laplace(size=n),
        rng.uniform(-1.0, 1.0, size=n),
        rng.exponential(size=n) - 1.0,
        np.sign(rng.normal(size=n)) * rng.normal(size=n) ** 2,
    ], axis=1)
    maps = rng.normal(size=(p, sources.shape[1]))
    x = sources @ maps.T + noise * rng.normal(size=(n, p))
    return sources, maps, torch.tensor(x, dtype=torch.float32)


@pytest.fixture(scope="module")
def synthetic():
    sources, maps, x = mixed_sources()
    stats = standardise_(x)
    maps = maps / stats.std[:, None]  # the maps of the standardised data
    results = {b: decompose(x.clone(), n_components=4, pca_components=8, backend=b, seed=0)
               for b in ("torch", "sklearn")}
    return sources, maps, results


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_recovers_mixed_non_gaussian_sources(synthetic, backend):
    sources, _, results = synthetic
    res = results[backend]
    assert res.converged
    _, corr = match_columns(sources, res.sources.astype(np.float64))
    assert corr.min() >= 0.95, corr


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_maps_match_true_mixing(synthetic, backend):
    _, maps, results = synthetic
    _, corr = match_columns(maps, results[backend].maps.astype(np.float64))
    assert corr.min() >= 0.95, corr


def test_backends_agree_in_order_and_sign(synthetic):
    _, _, results = synthetic
    a, b = results["torch"].maps, results["sklearn"].maps
    # same ordering rule and sign rule: column j pairs with column j, positively correlated
    for j in range(a.shape[1]):
        c = np.corrcoef(a[:, j], b[:, j])[0, 1]
        assert c >= 0.99, (j, c)
    np.testing.assert_allclose(results["torch"].components_variance,
                               results["sklearn"].components_variance, rtol=1e-2)
    np.testing.assert_allclose(results["torch"].explained_variance_ratio,
                               results["sklearn"].explained_variance_ratio, rtol=1e-3, atol=1e-6)


def test_components_ordered_by_variance_and_sum_to_explained(synthetic):
    _, _, results = synthetic
    var = results["torch"].components_variance
    assert np.all(np.diff(var) <= 0)
    # four sources generate nearly all of the (standardised) variance
    assert 0.95 < var.sum() <= 1.0 + 1e-6


def test_standardise_guards_zero_variance_columns():
    x = torch.randn(100, 5)
    x[:, 2] = 3.0  # dead channel
    stats = standardise_(x)
    assert stats.zero_variance.tolist() == [False, False, True, False, False]
    assert torch.isfinite(x).all()
    assert torch.all(x[:, 2] == 0)
    torch.testing.assert_close(x[:, [0, 1, 3, 4]].mean(0), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(x[:, [0, 1, 3, 4]].std(0), torch.ones(4), atol=1e-5, rtol=0)


def test_standardise_rejects_non_finite():
    x = torch.randn(50, 4)
    x[3, 1] = float("nan")
    with pytest.raises(NNError, match="non-finite"):
        standardise_(x)


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_fewer_tokens_than_components_is_an_error(backend):
    x = torch.randn(6, 40)
    with pytest.raises(NNError, match="fewer than --pca-components"):
        decompose(x, n_components=4, pca_components=10, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_non_convergence_is_reported_and_warned(backend):
    _, _, x = mixed_sources(n=1500, p=20, seed=1, noise=0.5)
    standardise_(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = decompose(x, n_components=4, pca_components=6, backend=backend, max_iter=1, tol=1e-12)
    assert not res.converged
    assert res.ica_metadata()["converged"] is False
    assert any("did not converge" in str(w.message) for w in caught)


def test_sign_rule_positive_skew_then_largest_loading():
    rng = np.random.default_rng(0)
    heavy = rng.exponential(size=(500, 1))  # positive skew
    maps = np.concatenate([-heavy, heavy], axis=1)
    sources = rng.normal(size=(10, 2))
    mixing = np.eye(2)
    unmixing = np.eye(2)
    m, s, mx, um = orient(maps, sources, mixing, unmixing)
    assert np.array_equal(m, np.concatenate([heavy, heavy], axis=1))
    assert np.array_equal(s[:, 0], -sources[:, 0]) and np.array_equal(s[:, 1], sources[:, 1])
    assert um[0, 0] == -1 and mx[0, 0] == -1
    # symmetric map (zero third moment): the largest |loading| decides
    sym = np.array([[1.0], [-1.0], [3.0], [-3.0], [0.5], [-0.5], [0.0]])
    sym[3, 0] = -3.5  # now skew is negative and the largest |A| is negative
    m, *_ = orient(sym, np.ones((1, 1)), np.eye(1), np.eye(1))
    assert m[3, 0] == 3.5
    exact = np.array([[2.0], [-2.0], [-4.0], [4.0]])  # zero skew, tie broken by argmax (first -4)
    m, *_ = orient(exact, np.ones((1, 1)), np.eye(1), np.eye(1))
    assert m[np.abs(m[:, 0]).argmax(), 0] > 0


def test_threshold_selects_top_percentile_and_never_zero_loadings():
    maps = np.zeros((1000, 2))
    maps[:, 0] = np.arange(1000) - 500.0  # |A| 0..500
    maps[:990, 1] = 0.0
    maps[990:, 1] = np.arange(1, 11)
    picked, thr = select_channels(maps, 98.0)
    absmap = np.abs(maps[:, 0])
    expected = np.flatnonzero(absmap >= np.percentile(absmap, 98.0))
    assert np.array_equal(picked[0], expected)
    assert 19 <= picked[0].size <= 21
    # component 1: percentile of |A| is 0, but zero loadings are never selected
    assert thr[1] == 0.0
    assert np.array_equal(picked[1], np.arange(990, 1000))
    with pytest.raises(NNError, match="percentile"):
        select_channels(maps, 100.0)


def sparse_networks(n=3000, p=600, n_nets=4, size=15, seed=0, noise=1.0):
    """Four disjoint few-channel networks (15 of 600 neurons each, 2.5 %), each driven by
    its own heavy-tailed source, in unit Gaussian noise on every neuron."""
    rng = np.random.default_rng(seed)
    chans = rng.permutation(p)[: n_nets * size].reshape(n_nets, size)
    src = rng.laplace(size=(n, n_nets)) * 2.0
    x = noise * rng.normal(size=(n, p))
    for j in range(n_nets):
        x[:, chans[j]] += src[:, [j]] * rng.uniform(0.8, 1.2, size=size)
    return [set(c.tolist()) for c in chans], torch.tensor(x, dtype=torch.float32)


def best_ious(true_sets, picked):
    """For every true network, the IoU of the best-matching thresholded component."""
    return [max(len(t & set(c.tolist())) / len(t | set(c.tolist())) for c in picked) for t in true_sets]


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_spatial_ica_recovers_sparse_networks(backend):
    from nn_ica.decompose import select_z, spatial_ica

    true_sets, x = sparse_networks()
    stats = standardise_(x)
    res = spatial_ica(x, n_components=4, pca_components=20, backend=backend, seed=0,
                      dead=stats.zero_variance)
    assert res.converged and res.z.shape == (600, 4)
    picked = select_z(res.z, 3.6)
    ious = best_ious(true_sets, picked)
    assert min(ious) >= 0.9, ious
    # noise neurons are (almost) never selected: |z| > 3.6 has tail mass ~3e-4 under a Gaussian
    noise = set(range(600)) - set().union(*true_sets)
    assert sum(len(noise & set(c.tolist())) for c in picked) <= 4


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_temporal_ica_recovers_sparse_networks(backend):
    true_sets, x = sparse_networks(seed=1)
    standardise_(x)
    res = decompose(x, n_components=4, pca_components=20, backend=backend, seed=0)
    picked, _ = select_channels(res.maps, 100.0 * (1 - 15 / 600))  # top 2.5 %: the true size
    ious = best_ious(true_sets, picked)
    assert min(ious) >= 0.9, ious


def test_select_z_uses_both_tails_and_rejects_bad_threshold():
    from nn_ica.decompose import select_z

    z = np.array([[0.0, 4.0], [-3.7, 0.1], [3.59, -5.0], [3.61, 0.0]])
    picked = select_z(z, 3.6)
    assert picked[0].tolist() == [1, 3] and picked[1].tolist() == [0, 2]
    with pytest.raises(NNError, match="z-threshold"):
        select_z(z, 0.0)
