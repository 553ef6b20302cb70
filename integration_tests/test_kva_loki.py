"""LoKI on the real smollm2-135m, as the issue's flow: analyse 8 samples, select 5 %, create,
train 20 steps, restore, compare to LoRA.

Positions: KVA of 8 samples of nn-eval's synthetic suite (`analyse`, fast engine,
riemann_trapezoid with 2 steps to stay small), then `select_channels` layer-balanced at
5 % (29 of each layer's 576 down-projection rows). Asserted: logits unchanged by
conversion, only the active rows move in training (frozen rows and every other tensor
bit-identical to the base), restore gives a plain model, the LoRA control's budget is the
closest rank. Reported (printed, not asserted): general perplexity change of LoKI and of
LoRA on held-out pydoc text.
"""

from __future__ import annotations

import copy

import torch


def test_loki_select_create_train_restore_vs_lora(smollm2, tmp_path):
    import time

    from torch import nn

    from nn_core.intervene.surgery import split_modules
    from nn_core.model.adapters import get_adapter
    from nn_core.train import SFTConfig
    from nn_kva_loki import KVASettings, analyse, load_samples, select_channels
    from nn_kva_loki.evaluate import EvalSettings, general_texts, model_metrics, train_lora_control
    from nn_kva_loki.loki import (
        active_parameters,
        create_loki,
        load_loki,
        lora_rank_for_budget,
        restore,
    )
    from nn_kva_loki.train import load_task_data, train_loki

    base, tok = smollm2
    sd0 = {k: v.clone() for k, v in base.state_dict().items()}
    ad = get_adapter(base)
    L, H, inter = ad.num_layers, ad.width("mlp_out"), ad.width("mlp_act")

    # KVA on 8 samples (fast engine, 2 steps), layer-balanced 5 %
    t0 = time.perf_counter()
    samples, label = load_samples("synthetic", tok, limit=8)
    assert len(samples) == 8
    kva = tmp_path / "kva.h5"
    analyse(base, tok, samples, kva, settings=KVASettings(steps=2, dataset=label), batch_size=4,
            progress=False)
    sel = select_channels(kva, 5.0)
    positions = sel.positions()
    t_kva = time.perf_counter() - t0
    k = round(0.05 * H)
    assert sel.num_samples == 8 and sel.k == k
    assert len(positions) == L and all(len(p) == k for p in positions)
    assert all(torch.equal(v, sd0[n]) for n, v in base.state_dict().items())  # analysis changed nothing

    model = copy.deepcopy(base)
    create_loki(model, positions)
    assert active_parameters(model) == L * k * inter
    ids = tok(["The quick brown fox jumps over the lazy dog."], return_tensors="pt")
    with torch.no_grad():
        assert (model(**ids).logits - base(**ids).logits).abs().max().item() <= 1e-6

    train, _ = load_task_data("task:reverse_words", n_train=40, n_eval=0)
    cfg = SFTConfig(output_dir=str(tmp_path / "loki"), method="full", max_steps=20, batch_size=2,
                    max_length=96, learning_rate=1e-3, weight_decay=0.1, logging_steps=5, save_steps=1000)
    result = train_loki(model, tok, train, cfg, model_spec="smollm2-135m")
    assert result.global_step == 20
    trained, _ = load_loki(result.saved, device="cpu", dtype="float32")
    restore(trained)
    # a plain model again: no split layer, no LoKI marker, every parameter trainable
    assert not split_modules(trained) and type(get_adapter(trained).down_proj(0)) is nn.Linear
    assert not hasattr(trained.config, "loki_format") and not hasattr(trained.config, "target_pos")
    assert all(p.requires_grad for p in trained.parameters())
    sd = trained.state_dict()
    assert list(sd) == list(sd0)
    for name, w0 in sd0.items():
        if name.endswith("mlp.down_proj.weight"):
            layer = int(name.split(".")[2])
            rows = torch.zeros(H, dtype=torch.bool)
            rows[positions[layer]] = True
            assert torch.equal(sd[name][~rows], w0[~rows]), name
            assert not torch.equal(sd[name][rows], w0[rows]), name
        else:
            assert torch.equal(sd[name], w0), name

    budget = L * k * inter
    rank, expected = lora_rank_for_budget(base, budget)
    lora_cfg = SFTConfig(output_dir=str(tmp_path / "lora-base"), max_steps=20, batch_size=2, max_length=96,
                         learning_rate=1e-3, weight_decay=0.1, logging_steps=5, save_steps=1000)
    lora_res, r, counted = train_lora_control(copy.deepcopy(base), tok, train, lora_cfg, budget,
                                              output_dir=str(tmp_path / "lora"), resume=False)
    assert r == rank and counted == expected

    settings = EvalSettings(general_samples=6, max_length=256, batch_size=6, exact_match=False)
    texts = [t[:1000] for t in general_texts(settings)]  # ~250 tokens each: one window
    ppl = {name: model_metrics(m, tok, [], texts, settings)["general_ppl"]
           for name, m in (("base", base), ("loki", trained), ("lora", lora_res.model))}
    print(f"\nKVA (8 samples, 2 steps) + select 5 %: {t_kva:.1f} s; "
          f"LoKI: {budget} trainable, general PPL {ppl['base']:.3f} -> {ppl['loki']:.3f} "
          f"(Δ {ppl['loki'] - ppl['base']:+.4f}); LoRA r={r}: {counted} trainable, -> {ppl['lora']:.3f} "
          f"(Δ {ppl['lora'] - ppl['base']:+.4f})")
    assert all(v is not None and v == v for v in ppl.values())


def test_kva_fast_engine_equals_captum_on_smollm2(smollm2):
    """KVA on the real model: the KV-cached all-layers engine computes the same quantity as
    Captum's IntegratedGradients (layer by layer) for 3 short prompts. In float64 the two
    agree to 1e-5 of the largest attribution (measured 7.8e-8: the float32 output cast);
    in float32 they differ by about 1.1e-4 (rounding through 30 layers taken in a different
    order: one cached query vs the full sequence), checked at 1e-3 for a left-padded batch."""
    import copy

    import numpy as np

    from nn_kva_loki.kva import Sample, attribute, encode_samples

    model, tok = smollm2
    prompts = ["The capital of France is", "Water boils at a temperature of",
               "Question: What is 2 + 3?\nAnswer:"]
    enc = encode_samples(tok, [Sample(f"p{i}", p) for i, p in enumerate(prompts)])
    assert len({len(e.ids) for e in enc}) > 1
    kw = dict(method="riemann_trapezoid", steps=7, pad_id=tok.pad_token_id)

    # float32, as users run it: a left-padded batch of the three against Captum
    batched, tok_fast, prob_fast = attribute(model, enc, engine="fast", **kw)
    ref, tok_ref, prob_ref = attribute(model, enc, engine="captum", **kw)
    assert batched.shape == (3, 30, 576)
    np.testing.assert_array_equal(tok_fast, tok_ref)
    np.testing.assert_allclose(prob_fast, prob_ref, rtol=1e-5)
    scale = float(np.abs(ref).max())
    assert scale > 0
    rel32 = float(np.abs(batched - ref).max()) / scale
    print(f"KVA fast (left-padded batch) vs captum, float32: max relative difference {rel32:.2e}")
    assert rel32 <= 1e-3

    # float64: the engines are the same computation
    m64 = copy.deepcopy(model).double()
    fast64 = np.concatenate([attribute(m64, [e], engine="fast", **kw)[0] for e in enc])
    ref64 = attribute(m64, enc, engine="captum", **kw)[0]
    rel64 = float(np.abs(fast64 - ref64).max()) / float(np.abs(ref64).max())
    print(f"KVA fast vs captum, float64: max relative difference {rel64:.2e}")
    assert rel64 <= 1e-5
