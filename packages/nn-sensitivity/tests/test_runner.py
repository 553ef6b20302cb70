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
