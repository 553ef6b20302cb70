"""nn-sensitivity on the real smollm2-135m: the top-K by grad_x_weight matters more than
controls of the same size."""

from __future__ import annotations

import torch


def test_sign_flip_of_top_k_hurts_more_than_controls(smollm2):
    from nn_core.data import load_texts, split_texts, token_blocks
    from nn_eval import evaluate_lm
    from nn_sensitivity import perturbed, score, select

    model, tok = smollm2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train, heldout = split_texts(load_texts("pydoc"), 0.2, seed=0)
    calib = token_blocks(tok, train, 128, n_blocks=4, seed=0)
    batches = [{"input_ids": calib[i:i + 2]} for i in range(0, 4, 2)]
    held = token_blocks(tok, heldout, 256)[:4]  # 1020 scored tokens: the contrast is large

    s = score(model, batches, "grad_x_weight")
    sets = {kind: select(s, 100, kind, seed=0) for kind in ("top_k", "random_k", "bottom_k")}
    assert all(len(ws) == 100 for ws in sets.values())
    assert len(sets["top_k"] & sets["bottom_k"]) == 0

    def ppl():
        return evaluate_lm(model, tok, held, max_length=256, stride=255, batch_size=4)["ppl"]

    base = ppl()
    delta = {}
    for kind, ws in sets.items():
        with perturbed(model, ws, "sign_flip"):
            delta[kind] = ppl() - base
    for n, p in model.named_parameters():  # restored exactly
        assert torch.equal(p, before[n]), n
    assert delta["top_k"] > delta["random_k"] and delta["top_k"] > delta["bottom_k"]
    assert delta["top_k"] > 0.01 * base, delta
