"""nn-ica on the real smollm2-135m: the default method (canica: spatial ICA per layer,
|z| > 3.6) at small settings, and a key-network lesion that hurts more than random."""

from __future__ import annotations

import statistics

import pytest

from nn_ica.build import BuildConfig, build_templates
from nn_ica.evaluate import evaluate_components, heldout_texts, n_site_channels


@pytest.fixture(scope="module")
def templates(smollm2):
    model, tok = smollm2
    cfg = BuildConfig(samples=32, max_length=128, max_tokens=2048, pca_components=50, seed=0)
    assert cfg.method == "canica"  # the default
    return build_templates(model, tok, ["pydoc"], cfg)


def test_templates_from_pydoc(smollm2, templates, tmp_path):
    from nn_ica.templates import Templates

    model, _ = smollm2
    m = templates.metadata
    assert m["model_id"] == "smollm2-135m" and m["site"] == "mlp_act" and m["width"] == 1536
    assert m["layers"] == list(range(30)) and m["n_tokens"] == 2048 and m["method"] == "canica"
    k = m["ica"]["n_components"]
    assert len(templates) == 30 * k
    for c in templates.components:  # per-layer maps: each network lies in its own layer
        assert set(c.neurons) <= {c.extra["layer"]}
    frac = len(templates.neuronset()) / n_site_channels(model, templates)
    assert 0 < frac < 0.2  # |z| > 3.6 keeps a small part of the neurons
    back = Templates.load(templates.save(tmp_path / "t.json"))
    assert back.ids == templates.ids


def test_key_network_lesion_beats_random_lesions(smollm2, templates):
    model, tok = smollm2
    texts = heldout_texts(["pydoc"], heldout_fraction=templates.metadata["heldout_fraction"],
                          limit=8, seed=0)
    rep = evaluate_components(model, tok, templates, templates.ids, texts, mode="lesion",
                              n_random=3, max_length=128, batch_size=4)
    random_mean = statistics.fmean(rep["random"]["delta_ppl"])
    print(f"ΔPPL key networks {rep['delta_ppl']:.3f}; random {rep['random']['delta_ppl']}")
    assert rep["delta_ppl"] > random_mean
