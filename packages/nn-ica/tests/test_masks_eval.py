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
