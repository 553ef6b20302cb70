"""nn-ica on the real smollm2-135m: templates from pydoc, and a lesion that matters."""

from __future__ import annotations

import statistics

import pytest

from nn_ica.build import BuildConfig, build_templates
from nn_ica.evaluate import evaluate_components, heldout_texts


@pytest.fixture(scope="module")
def templates(smollm2):
    model, tok = smollm2
    cfg = BuildConfig(samples=32, max_length=128, max_tokens=2048, pca_components=50, components=10,
                      seed=0)
    return build_templates(model, tok, ["pydoc"], cfg)


def test_templates_from_pydoc(templates, tmp_path):
    from nn_ica.templates import Templates

    m = templates.metadata
    assert m["model_id"] == "smollm2-135m" and m["site"] == "mlp_act" and m["width"] == 1536
    assert m["layers"] == list(range(30)) and m["n_tokens"] == 2048
    assert len(templates) == 10 and isinstance(m["ica"]["converged"], bool)
    sizes = [c.size for c in templates.components]
    assert all(abs(s - 0.02 * 30 * 1536) <= 2 for s in sizes)  # 98th percentile: 2 % each
    back = Templates.load(templates.save(tmp_path / "t.json"))
    assert back.ids == templates.ids


def test_largest_component_lesion_beats_random_lesions(smollm2, templates):
    model, tok = smollm2
    texts = heldout_texts(["pydoc"], heldout_fraction=templates.metadata["heldout_fraction"],
                          limit=12, seed=0)
    rep = evaluate_components(model, tok, templates, [templates.largest()], texts, mode="lesion",
                              n_random=5, max_length=128, batch_size=4)
    random_mean = statistics.fmean(rep["random"]["delta_ppl"])
    print(f"ΔPPL largest component {rep['delta_ppl']:.3f}; random {rep['random']['delta_ppl']}")
    assert rep["delta_ppl"] > random_mean
    assert rep["delta_ppl"] > 0
