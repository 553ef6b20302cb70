from __future__ import annotations

import numpy as np
import pytest
import torch

from nn_core.errors import NNError
from nn_core.intervene.hooks import capture
from nn_core.intervene.masks import mask_neurons
from nn_core.model.adapters import model_signature
from nn_core.model.loading import load_model
from nn_ica.evaluate import evaluate_components
from nn_ica.templates import Component, Templates

TEXTS = [f"Evaluation text {i}: some words about topic {i % 3} and more words." for i in range(6)]


def templates_for(model, site="mlp_act"):
    comps = [Component(0, {0: np.array([1, 4, 9])}, variance=0.2),  # nothing in layer 1
             Component(1, {0: np.array([2]), 1: np.array([3, 5])}, variance=0.1)]
    return Templates({**model_signature(model), "site": site}, comps)


def site_values(model, site, mask=None):
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4, 5, 6]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    refs = [(0, site), (1, site)]
    if mask is None:
        return capture(model, refs, [batch])
    with mask:
        return capture(model, refs, [batch])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("site", ["mlp_act", "mlp_out"])
def test_component_masks_both_modes(arch, site):
    model, _ = load_model(f"tiny-{arch}")
    t = templates_for(model, site)
    ns = t.neuronset([0], model=model)
    plain = site_values(model, site)
    les = site_values(model, site, mask_neurons(model, ns, "lesion"))
    pre = site_values(model, site, mask_neurons(model, ns, "preserve"))
    sel = [1, 4, 9]
    others = [i for i in range(plain[0, site].shape[1]) if i not in sel]
    # lesion: selected channels zero, every other channel of layer 0 bit-identical
    assert torch.all(les[0, site][:, sel] == 0)
    assert torch.equal(les[0, site][:, others], plain[0, site][:, others])
    # preserve: only the selected channels pass in layer 0 ...
    assert torch.equal(pre[0, site][:, sel], plain[0, site][:, sel])
    assert torch.all(pre[0, site][:, others] == 0)
    # ... and layer 1, where the component has no channel, is fully masked
    assert torch.all(pre[1, site] == 0)
    assert plain[1, site].abs().sum() > 0


def test_evaluate_components_reports_controls():
    model, tok = load_model("tiny-llama")
    t = templates_for(model)
    rep = evaluate_components(model, tok, t, [1], TEXTS, mode="lesion", n_random=3, max_length=32)
    assert rep["n_neurons"] == 3 and rep["layer_counts"] == {"0": 1, "1": 2}
    assert rep["delta_ppl"] == pytest.approx(rep["intervened"]["ppl"] - rep["baseline"]["ppl"])
    r = rep["random"]
    assert len(r["delta_ppl"]) == 3 and len(set(r["ppl"])) == 3  # different random sets
    assert r["mean"] == pytest.approx(np.mean(r["delta_ppl"]))
    assert r["std"] == pytest.approx(np.std(r["delta_ppl"], ddof=1))
    assert rep["excess"] == pytest.approx(rep["delta_ppl"] - r["mean"])
    # hooks are gone afterwards: a fresh evaluation equals the baseline
    from nn_core.data import tokenize_texts
    from nn_eval import evaluate_lm

    data = tokenize_texts(tok, TEXTS, max_length=32)  # each text's first 32 tokens
    assert evaluate_lm(model, tok, data, max_length=32)["ppl"] == pytest.approx(rep["baseline"]["ppl"])
    pre = evaluate_components(model, tok, t, [0], TEXTS, mode="preserve", n_random=1, max_length=32)
    assert pre["delta_ppl"] != 0


def test_evaluate_rejects_other_model_and_unknown_ids():
    model, tok = load_model("tiny-llama")
    t = templates_for(model)
    with pytest.raises(NNError, match=r"component id\(s\) 5"):
        evaluate_components(model, tok, t, [5], TEXTS)
    other, otok = load_model("tiny-gpt2")
    with pytest.raises(NNError, match="'tiny-llama'.*'tiny-gpt2'"):
        evaluate_components(other, otok, t, [0], TEXTS)


def test_rank_components_matches_single_evaluations_and_orders_by_score():
    from nn_ica.evaluate import rank_components

    model, tok = load_model("tiny-llama")
    # component 2: half of layer 0 (a large lesion); 0 and 1 small
    comps = [Component(0, {0: np.array([1, 4, 9])}), Component(1, {1: np.array([3, 5])}),
             Component(2, {0: np.arange(0, 128, 2)}), Component(3, {})]
    t = Templates({**model_signature(model), "site": "mlp_act"}, comps)
    rank = rank_components(model, tok, t, TEXTS, n_random=2, max_length=32, batch_size=2)
    assert rank["n_channels"] == 2 * 128
    rows = {r["id"]: r for r in rank["rows"]}
    assert [r["id"] for r in rank["rows"]][-1] == 3 and rows[3]["size"] == 0  # empty: last
    scores = [r["score"] for r in rank["rows"]]
    assert scores == sorted(scores, reverse=True)
    for cid in (0, 1, 2):
        one = evaluate_components(model, tok, t, [cid], TEXTS, n_random=2, max_length=32, batch_size=2)
        r = rows[cid]
        assert r["size"] == one["n_neurons"] and r["fraction"] == one["n_neurons"] / 256
        assert r["delta_ppl"] == pytest.approx(one["delta_ppl"], rel=1e-6, abs=1e-9)
        assert r["random_mean"] == pytest.approx(one["random"]["mean"], rel=1e-6, abs=1e-9)
        assert r["random_std"] == pytest.approx(one["random"]["std"], rel=1e-6, abs=1e-9)
        if r["random_std"]:
            assert r["z"] == pytest.approx((r["delta_ppl"] - r["random_mean"]) / r["random_std"])
            assert r["score"] == r["z"]


def test_pick_fraction_takes_the_rank_prefix_nearest_the_target():
    from nn_ica.evaluate import pick_fraction

    comps = [Component(0, {0: np.arange(10)}), Component(1, {0: np.arange(5, 20)}),  # overlaps 0
             Component(2, {1: np.arange(30)})]
    t = Templates({"site": "mlp_act", "num_layers": 2, "widths": {"mlp_act": 100}}, comps)
    assert pick_fraction(t, [0, 1, 2], 0.10, 200) == ([0, 1], 20 / 200)  # union 20 channels, not 25
    assert pick_fraction(t, [2, 0, 1], 0.10, 200) == ([2], 30 / 200)  # 0.15 beats 0.20
    assert pick_fraction(t, [0, 1, 2], 0.90, 200) == ([0, 1, 2], 50 / 200)  # all, short of F
    assert pick_fraction(t, [1, 0], 0.01, 200) == ([1], 15 / 200)  # never empty
    with pytest.raises(NNError, match="preserve-fraction"):
        pick_fraction(t, [0], 1.0, 200)
