from __future__ import annotations

import pytest
import torch

from nn_core.errors import NNError
from nn_core.model.loading import load_model
from nn_ica.build import BuildConfig, build_templates, capture_matrix

TEXTS = [f"Sample text number {i}: the quick brown fox {i * 7} jumps over {i % 5} lazy dogs." for i in range(48)]
SMALL = dict(method="fnsft", samples=48, max_tokens=600, pca_components=12, components=4, heldout_fraction=0.0)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


@pytest.mark.parametrize("site,width", [("mlp_act", 128), ("mlp_out", 64)])
def test_build_records_metadata_and_valid_components(tiny, site, width):
    model, tok = tiny
    t = build_templates(model, tok, texts=TEXTS, config=BuildConfig(site=site, **SMALL))
    m = t.metadata
    assert m["site"] == site and m["width"] == width and m["layers"] == [0, 1]
    assert m["model_id"] == "tiny-llama" and m["num_layers"] == 2
    assert m["n_tokens"] == 600 and m["n_tokens_seen"] > 600
    assert m["matrix"]["shape"] == [600, 2 * width] and m["matrix"]["bytes"] == 600 * 2 * width * 4
    assert len(m["pca"]["explained_variance_ratio"]) == 12
    assert set(m["ica"]) >= {"converged", "n_iter", "max_iter", "tol"}
    assert m["backend"] == "torch" and m["seed"] == 0
    assert t.ids == [0, 1, 2, 3]
    expected = round(2 * width * 0.02)
    for c in t.components:
        assert abs(c.size - expected) <= 1  # 2 % of the columns, ties aside
        for layer, idx in c.neurons.items():
            assert layer in (0, 1) and int(idx.max()) < width
    variances = [c.variance for c in t.components]
    assert variances == sorted(variances, reverse=True)
    t.check(model, site=site)


def test_layer_range_and_determinism(tiny):
    model, tok = tiny
    cfg = BuildConfig(layers=[1], **SMALL)
    a = build_templates(model, tok, texts=TEXTS, config=cfg)
    b = build_templates(model, tok, texts=TEXTS, config=cfg)
    assert a.metadata["layers"] == [1]
    assert all(set(c.neurons) <= {1} for c in a.components)
    assert [c.to_dict()["neurons"] for c in a.components] == [c.to_dict()["neurons"] for c in b.components]


def test_capture_excludes_padding_and_bounds_memory(tiny):
    model, _ = tiny
    seqs = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34]]
    full = capture_matrix(model, seqs, max_tokens=10_000, batch_size=3, pad_id=257)
    assert full.n_tokens == 15 and full.n_tokens_seen == 15
    single = [capture_matrix(model, [s], max_tokens=10_000, batch_size=1).x for s in seqs]
    torch.testing.assert_close(full.x, torch.cat(single), atol=1e-5, rtol=1e-4)
    sub = capture_matrix(model, seqs, max_tokens=6, batch_size=3, seed=3)
    assert sub.x.shape == (6, 256) and sub.nbytes == 6 * 256 * 4
    # every kept row is one of the real-token rows
    dist = torch.cdist(sub.x, full.x).min(1).values
    assert float(dist.max()) < 1e-3


def test_fewer_tokens_than_components(tiny):
    model, tok = tiny
    cfg = BuildConfig(samples=2, max_length=4, max_tokens=600, pca_components=12, components=4,
                      heldout_fraction=0.0)
    with pytest.raises(NNError, match="tokens captured, fewer than"):
        build_templates(model, tok, texts=TEXTS[:2], config=cfg)


def test_non_finite_activations_name_the_layer():
    model, tok = load_model("tiny-llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NNError, match="non-finite activations at layer 1"):
        build_templates(model, tok, texts=TEXTS, config=BuildConfig(**SMALL))


def test_bad_settings():
    with pytest.raises(NNError, match="must be at least --components"):
        BuildConfig(pca_components=5, components=10).check()
    with pytest.raises(NNError, match="mlp_act or mlp_out"):
        BuildConfig(site="resid").check()
    with pytest.raises(NNError, match="must exceed --pca-components"):
        BuildConfig(max_tokens=50, pca_components=100).check()


@pytest.mark.parametrize("kw,msg", [
    (dict(seed=-1), "--seed must be 0 or more"),
    (dict(percentile=100.0), r"--percentile must be in \[0, 100\)"),
    (dict(percentile=-0.5), r"--percentile must be in \[0, 100\)"),
    (dict(tol=0.0), "--tol must be positive"),
    (dict(max_iter=0), "--max-iter must be at least 1"),
])
def test_bad_numbers_rejected_before_any_work(kw, msg):
    """Rejected by check(), i.e. before capture/PCA/ICA: no model is needed to see it."""
    with pytest.raises(NNError, match=msg):
        BuildConfig(**kw).check()


@pytest.mark.parametrize("layout", ["per-layer", "concat"])
def test_canica_build_spatial_maps_thresholded_by_z(tiny, layout):
    from nn_ica.decompose import select_z, spatial_ica, standardise_

    model, tok = tiny
    cfg = BuildConfig(layout=layout, **{**SMALL, "method": "canica", "pca_components": 20})
    t = build_templates(model, tok, texts=TEXTS, config=cfg)
    m = t.metadata
    assert m["method"] == "canica" and m["z_threshold"] == 3.6 and m["ica"]["layout"] == layout
    n_blocks = 2 if layout == "per-layer" else 1
    assert len(t) == 4 * n_blocks and t.ids == list(range(4 * n_blocks))
    if layout == "per-layer":
        for c in t.components:
            assert set(c.neurons) <= {c.extra["layer"]} and c.extra["map"] == c.id % 4
    # the same selection, recomputed from the captured matrix of layer 0 / all layers
    from nn_core.data import tokenize_texts

    ids = tokenize_texts(tok, TEXTS[: cfg.samples], max_length=cfg.max_length)
    mat = capture_matrix(model, ids, max_tokens=600, seed=0, pad_id=tok.pad_token_id or 0)
    x = mat.x[:, :128] if layout == "per-layer" else mat.x
    stats = standardise_(x)
    res = spatial_ica(x, n_components=4, pca_components=20, seed=0, dead=stats.zero_variance)
    want = select_z(res.z, 3.6)
    for j in range(4):
        got = [lay * 128 + ch for lay, arr in t.components[j].neurons.items() for ch in arr.tolist()]
        assert sorted(got) == want[j].tolist()


def test_canica_subsets_union_and_bad_settings(tiny):
    model, tok = tiny
    base = {**SMALL, "method": "canica", "pca_components": 20}
    one = build_templates(model, tok, texts=TEXTS, config=BuildConfig(**base))
    two = build_templates(model, tok, texts=TEXTS, config=BuildConfig(subsets=2, **base))
    assert two.metadata["ica"]["subsets"] == 2 and two.metadata["ica"]["n_runs"] == 4
    assert len(two) == len(one)
    with pytest.raises(NNError, match="--subsets"):
        BuildConfig(subsets=0, **base).check()
    with pytest.raises(NNError, match="tokens each"):
        BuildConfig(subsets=40, **base).check()
    with pytest.raises(NNError, match="--method"):
        BuildConfig(method="pca").check()
    with pytest.raises(NNError, match="--layout"):
        BuildConfig(layout="rows").check()
