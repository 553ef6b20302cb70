from __future__ import annotations

import json

import pytest
import torch

from nn_core.errors import NNError
from nn_core.model.loading import load_model
from nn_sensitivity import runner
from nn_sensitivity.runner import StudyConfig, calibration_batches, run_study

SMALL = {"model": "tiny-llama", "calib_blocks": 4, "block_len": 32, "batch_size": 2,
         "eval_tokens": 128, "eval_len": 64, "seeds": [0], "device": "cpu", "dtype": "float32"}


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_batches_are_grouped_before_they_are_sharded():
    calib = torch.arange(20 * 3).reshape(20, 3)
    blocks = [1, 4, 5, 8, 11, 12, 15, 19]
    single = calibration_batches(calib, blocks, 3, ws=1, rk=0)
    assert [b["input_ids"][:, 0].tolist() for b in single] == [[3, 12, 15], [24, 33, 36],
                                                                 [45, 57]]
    r0 = calibration_batches(calib, blocks, 3, ws=2, rk=0)
    r1 = calibration_batches(calib, blocks, 3, ws=2, rk=1)
    # the same batches, dealt to the ranks: nothing regrouped
    assert len(r0) + len(r1) == len(single)
    for got, want in zip(r0 + r1, single[0::2] + single[1::2], strict=True):
        assert torch.equal(got["input_ids"], want["input_ids"])
    with pytest.raises(NNError, match="3 calibration batches cannot be shared by 4 processes"):
        calibration_batches(calib, blocks, 3, ws=4, rk=0)


def test_per_layer_k_too_large_is_refused_before_scoring(monkeypatch, tmp_path):
    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before checking K")

    monkeypatch.setattr(runner, "score", no_scoring)
    model, tok = load_model("tiny-llama", device="cpu", dtype="float32")
    per_block = sum(p.numel() for n, p in model.named_parameters()
                    if n.startswith("model.layers.0.") and p.ndim == 2)
    cfg = StudyConfig(**SMALL, topk=[per_block + 1], mode="per-layer", out=str(tmp_path / "o"))
    with pytest.raises(NNError, match=f"K={per_block + 1} is larger than the {per_block} "
                                      "eligible weights in layer 0"):
        run_study(cfg, model=model, tokenizer=tok, echo=None)
    assert not (tmp_path / "o").exists()


def test_negative_seed_is_refused():
    with pytest.raises(NNError, match="seed -1 is negative"):
        StudyConfig(seeds=[0, -1]).check()


def test_bit_flip_to_inf_is_recorded_not_fatal_and_weights_restored(tmp_path):
    model, tok = load_model("tiny-llama", device="cpu", dtype="float32")
    before = {n: p.detach().view(torch.int32).clone() for n, p in model.named_parameters()}
    out = tmp_path / "flip"
    summary = run_study(StudyConfig(**SMALL, topk=[5, 20], perturb="bit_flip", bit=30,
                                    stability=False, out=str(out)),
                        model=model, tokenizer=tok, progress=False, echo=None)
    assert all(torch.equal(before[n], p.detach().view(torch.int32))
               for n, p in model.named_parameters())
    text = (out / "perturbation_results.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    res = json.loads(text)
    top = [r for r in res["results"] if r["selection"] == "top_k"]
    assert len(top) == 2
    for r in top:
        assert r["non_finite"] is True
        assert r["ppl"] is None and r["nll"] is None and r["token_acc"] is None
        assert r["delta"] == {"ppl": None, "nll": None, "token_acc": None}
    for r in res["results"]:
        if not r["non_finite"]:
            assert r["delta"]["ppl"] == pytest.approx(r["ppl"] - res["baseline"]["ppl"])
    assert (out / "plots" / "delta_ppl_vs_k.png").read_bytes()[:4] == b"\x89PNG"
    table = runner.format_summary(summary)
    assert "non-finite" in table


def test_reused_output_folder_is_replaced_whole_and_kept_on_failure(monkeypatch, tmp_path):
    model, tok = load_model("tiny-llama", device="cpu", dtype="float32")
    out = tmp_path / "shared"

    def study(topk):
        return StudyConfig(**SMALL, topk=topk, metric="magnitude", controls=["random_k"],
                           stability=False, out=str(out))

    run_study(study([3, 7]), model=model, tokenizer=tok, progress=False, echo=None)
    first = _tree(out)
    assert "rankings/top_k_k7.safetensors" in first
    run_study(study([4]), model=model, tokenizer=tok, progress=False, echo=None)
    second = _tree(out)
    assert {"rankings/top_k_k3.safetensors", "rankings/top_k_k7.safetensors",
            "rankings/random_k_k7.safetensors"}.isdisjoint(second)
    assert "rankings/top_k_k4.safetensors" in second
    assert {r["k"] for r in json.loads(second["perturbation_results.json"])["results"]} == {4}

    from nn_sensitivity import plots

    def broken(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(plots, "delta_ppl_vs_k", broken)
    with pytest.raises(RuntimeError, match="plotting failed"):
        run_study(study([9]), model=model, tokenizer=tok, progress=False, echo=None)
    assert _tree(out) == second  # the earlier complete results, byte for byte
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]  # no temporary folder left


def test_random_k_is_drawn_several_times_and_reported_with_its_spread(tmp_path):
    import numpy as np

    from nn_core.select.weightset import WeightSet

    model, tok = load_model("tiny-llama", device="cpu", dtype="float32")
    out = tmp_path / "draws"
    summary = run_study(StudyConfig(**SMALL, topk=[3, 40], metric="magnitude",
                                    controls=["random_k"], random_draws=3, stability=False,
                                    out=str(out)),
                        model=model, tokenizer=tok, progress=False, echo=None)
    res = json.loads((out / "perturbation_results.json").read_text())
    assert res["random_draws"] == 3
    rnd = [r for r in res["results"] if r["selection"] == "random_k"]
    assert [r["k"] for r in rnd] == [3, 40]
    for r in rnd:
        assert r["n_draws"] == 3 and [d["seed"] for d in r["draws"]] == [0, 1, 2]
        ppl = np.array([d["delta"]["ppl"] for d in r["draws"]])
        sp = r["spread"]["delta"]["ppl"]
        assert sp["mean"] == pytest.approx(ppl.mean()) == pytest.approx(r["delta"]["ppl"])
        assert sp["sd"] == pytest.approx(ppl.std(ddof=1))
        assert sp["min"] == pytest.approx(ppl.min()) and sp["max"] == pytest.approx(ppl.max())
        assert r["ppl"] == pytest.approx(np.mean([d["ppl"] for d in r["draws"]]))
    # the draws are different selections of the same size, all saved
    sets = [WeightSet.load(out / "rankings" / name) for name in
            ("random_k_k40.safetensors", "random_k_k40_draw1.safetensors",
             "random_k_k40_draw2.safetensors")]
    keys = [{(n, int(i)) for n in s.names() for i in s.indices(n)} for s in sets]
    assert all(len(k) == 40 for k in keys) and keys[0] != keys[1] != keys[2]
    # different weights perturbed give different damage: the spread is real
    assert rnd[1]["spread"]["delta"]["ppl"]["sd"] > 0
    assert "mean of 3 draws" in runner.format_summary(summary)
    top = [r for r in res["results"] if r["selection"] == "top_k"]
    assert all("draws" not in r for r in top)


def test_study_defaults_per_sample_fisher_and_five_random_draws():
    cfg = StudyConfig(metric="grad_squared").check()
    assert cfg.metric_options() == {"per_sample": True} and cfg.random_draws == 5
    with pytest.raises(NNError, match="--random-draws must be at least 1"):
        StudyConfig(random_draws=0).check()
