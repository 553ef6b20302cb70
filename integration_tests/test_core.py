from __future__ import annotations

import json

import torch

from nn_core.intervene.masks import mask_neurons
from nn_core.model.adapters import get_adapter
from nn_core.select.neuronset import NeuronSet


def test_loads_from_the_embedded_package(smollm2):
    model, tok = smollm2
    ad = get_adapter(model)
    assert model.config.name_or_path == "smollm2-135m"
    assert ad.num_layers == 30
    assert ad.widths() == {"mlp_act": 1536, "mlp_out": 576, "resid": 576}
    assert tok.chat_template


def test_sites_cli_lists_30_layers(capsys):
    from nn_core.cli import main

    assert main(["sites", "smollm2-135m", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_layers"] == 30
    assert info["widths"]["mlp_act"] == 1536 and info["widths"]["mlp_out"] == 576


def test_lesion_of_20_percent_changes_distribution_and_restores(smollm2):
    model, tok = smollm2
    ad = get_adapter(model)
    text = "The for statement is used to iterate over the elements of a sequence"
    batch = tok(text, return_tensors="pt")
    with torch.no_grad():
        base = model(**batch).logits[0, -1]
    full = NeuronSet.for_model(model, {(i, "mlp_act"): range(ad.intermediate_size) for i in range(ad.num_layers)})
    # random_like draws the same count per layer: 20 % of 1536 channels in every layer
    lesion = NeuronSet.for_model(model, {(i, "mlp_act"): range(int(0.2 * ad.intermediate_size))
                                         for i in range(ad.num_layers)}).random_like(seed=0)
    assert lesion.layer_counts("mlp_act") == {i: 307 for i in range(30)}
    assert len(lesion & full) == len(lesion)
    with mask_neurons(model, lesion, "lesion"), torch.no_grad():
        lesioned = model(**batch).logits[0, -1]
    p, q = base.log_softmax(-1), lesioned.log_softmax(-1)
    kl = torch.sum(p.exp() * (p - q)).item()
    assert kl > 1e-3
    with torch.no_grad():
        after = model(**batch).logits[0, -1]
    assert torch.equal(after, base)
