"""nn-eval on the real smollm2-135m: held-out pydoc perplexity, a random lesion, exact restore."""

from __future__ import annotations

import math

import torch

from nn_core.data import load_texts, split_texts, tokenize_texts
from nn_core.intervene.masks import mask_neurons
from nn_core.model.adapters import get_adapter
from nn_core.select.neuronset import NeuronSet
from nn_eval import evaluate_lm


def heldout_ids(tok, n_tokens=256):
    """A small, fixed slice of held-out pydoc: every held-out document, cut to ``n_tokens``."""
    _, held = split_texts(load_texts("pydoc"), 0.1, seed=0)
    return [x[:n_tokens] for x in tokenize_texts(tok, held)]


def random_lesion(model, fraction=0.1, seed=0):
    ad = get_adapter(model)
    width = ad.width("mlp_act")
    gen = torch.Generator().manual_seed(seed)
    k = round(fraction * width)
    entries = {(layer, "mlp_act"): torch.randperm(width, generator=gen)[:k].sort().values.tolist()
               for layer in range(ad.num_layers)}
    return NeuronSet.for_model(model, entries, method="random", parameters={"fraction": fraction})


def test_heldout_perplexity_lesion_and_exact_restore(smollm2):
    model, tok = smollm2
    data = heldout_ids(tok)
    assert len(data) >= 5 and max(len(x) for x in data) == 256  # longer than a window below
    ns = random_lesion(model)
    assert sum(ns.counts().values()) == round(0.1 * get_adapter(model).width("mlp_act")) * get_adapter(model).num_layers

    kw = dict(max_length=160, stride=120, batch_size=4)
    res = evaluate_lm(model, tok, data, intervention=lambda: mask_neurons(model, ns, "lesion"), **kw)
    base, lesioned = res["baseline"], res["intervened"]
    assert base["n_tokens"] == sum(len(x) - 1 for x in data) and base["n_skipped"] == 0
    assert math.isfinite(base["ppl"]) and base["ppl"] < 50
    assert lesioned["ppl"] > base["ppl"] and res["delta"]["nll"] > 0
    # With the lesion removed the model is bit-identical: every figure comes back exactly.
    assert evaluate_lm(model, tok, data, **kw) == base
